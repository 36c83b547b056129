"""`nearfar`: train, evaluate, inspect and explain contrastive encoders.

    nearfar train [RECIPE.toml] [--set key=value ...] [--run-dir DIR] [--resume]
    nearfar eval RUN_DIR [--protocols knn,clustering,...] [--data-source folder --data-path DIR]
    nearfar card [show] RUN_DIR [--json] | card check RUN_DIR | card export RUN_DIR
    nearfar views [RECIPE.toml] [--out pairs.png]

Errors a user can cause are printed as one line (`nearfar: error: ...`) with exit
status 2, never as a traceback from deep inside torch.
"""

from __future__ import annotations

import argparse
import json
import sys


class CommandError(Exception):
    """An error a user can act on; printed without a traceback."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from nearfar.card import CardError
    from nearfar.data import ImageReadError
    from nearfar.train.checkpoint import CheckpointError
    from nearfar.train.guards import EmbeddingCollapse, TrainingDiverged

    return (CommandError, ValueError, FileNotFoundError, CheckpointError, TrainingDiverged,
            EmbeddingCollapse, ImageReadError, CardError)


#: protocol settings worth printing next to a number, per protocol name
_SHOWN_SETTINGS = {"knn": ("k", "temperature"), "linear_probe": ("epochs", "optimizer"),
                   "clustering": ("k", "n_init", "seed"), "rank": ("tol", "eps"),
                   "hubness": ("k",), "geometry": ("alpha", "t", "n_items_used"),
                   "retrieval": ("direction", "k")}


def _protocol_words(p: dict) -> str:
    name = p.get("name", "protocol not stated")
    shown = [f"{key}={p[key]}" for key in _SHOWN_SETTINGS.get(name, ()) if key in p]
    if "n_train" in p or "n_test" in p:
        shown.append(f"{p.get('n_train')} train / {p.get('n_test')} test")
    return f"{name}: {', '.join(shown)}" if shown else str(name)


def _print_results(results: list[dict]) -> None:
    if not results:
        print("no held-out results (no labels, and no label-free protocol applied)")
    for r in results:
        p = r.get("protocol") or {}
        print(f"  {r['metric']:<28} {r['value']:9.4f}  [{_protocol_words(p)}]")


def cmd_train(args: argparse.Namespace) -> int:
    from nearfar.api import train

    overrides = list(args.set) + ([f'device="{args.device}"'] if args.device else [])
    run = train(args.recipe, overrides=overrides, run_dir=args.run_dir, resume=args.resume,
                progress=False if args.no_progress else None)
    from nearfar.train.launch import launch_env

    env = launch_env()
    if env is not None and env.rank != 0:
        return 0    # under torchrun, process 0 reports for all
    fit = run.fit
    procs = f", {fit['world_size']} processes" if fit.get("world_size", 1) > 1 else ""
    print(f"trained {fit['step']} steps in {fit['train_time_s']:.1f} s "
          f"({fit['images_per_s']:.0f} images/s{procs}, {fit['stopped']}); final loss "
          f"{fit['final_loss']:.4f}")
    print("held-out evaluation (frozen encoder):")
    _print_results(run.results)
    print(f"run directory: {run.run_dir}  (card: {run.run_dir / 'card.md'})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from nearfar.api import evaluate_run

    data = None
    if args.data_source or args.data_path:
        data = {"source": args.data_source or "folder", "path": args.data_path or ""}
    results = evaluate_run(args.run_dir, data=data, device=args.device,
                           protocols=args.protocols)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"evaluation of {args.run_dir}:")
        _print_results(results)
    return 0


CARD_ACTIONS = ("show", "check", "export")


def cmd_card(args: argparse.Namespace) -> int:
    from nearfar.card import check_card, export_huggingface, read_card, render_markdown

    action = getattr(args, "card_action", None) or "show"
    if action == "check":
        card = read_card(args.run_dir)
        problems = check_card(card, args.run_dir)
        if problems:
            print(f"{args.run_dir}: card check failed, {len(problems)} problem(s):")
            for line in problems:
                print(f"  - {line}")
            return 1
        n_audits = len(card.get("audits") or [])
        print(f"{args.run_dir}: ok (every source-discipline field stated, schema valid, "
              f"{n_audits} attached audit(s) match their sha256)")
        return 0
    if action == "export":
        path = export_huggingface(args.run_dir, args.out)
        print(f"wrote a Hugging Face model card ({args.format}) to {path}")
        return 0
    card = read_card(args.run_dir)
    print(json.dumps(card, indent=2) if args.json else render_markdown(card))
    return 0


def _card_argv(argv: list[str]) -> list[str]:
    """`nearfar card RUN_DIR [--json]` (no sub-command) is `nearfar card show RUN_DIR`."""
    if len(argv) >= 2 and argv[0] == "card" and argv[1] not in (*CARD_ACTIONS, "-h", "--help"):
        return ["card", "show", *argv[1:]]
    return argv


def cmd_views(args: argparse.Namespace) -> int:
    import torch

    from nearfar.api import as_recipe, build_views, load_source
    from nearfar.views import save_pair_grid

    rec = as_recipe(args.recipe, args.set)
    ds = load_source(rec["data"])
    if getattr(ds, "images", None) is None:
        raise CommandError(f"views: the recipe's data ({rec['data']['source']}) has no images "
                           f"to draw views of (text pairs are positives as given)")
    g = torch.Generator().manual_seed(rec["seed"])
    views = build_views(rec["views"])
    if views is None:
        raise CommandError(f"views: the recipe makes no views (views.preset = "
                           f"{rec['views']['preset']!r}): its positives come from the data "
                           f"itself")
    idx = torch.randperm(len(ds), generator=g)[: args.pairs]
    x = ds.images[idx].float() / 255.0
    v1, v2 = views(x, g)
    path = save_pair_grid(v1, v2, args.out, nrow=args.nrow, max_pairs=args.pairs)
    print(f"wrote {args.pairs} positive pairs to {path}")
    print(json.dumps(views.describe(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nearfar",
        description="Contrastive representation learning: train, evaluate and document "
                    "encoders.")
    from nearfar import __version__

    parser.add_argument("--version", action="version", version=f"nearfar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def recipe_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("recipe", nargs="?", default=None,
                       help="a TOML recipe (default: the packaged SimCLR on MNIST-5k recipe)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe key, e.g. --set trainer.steps=200 (repeatable)")

    p = sub.add_parser("train", help="train an encoder from a recipe, evaluate it, write its card",
                       description="Train the encoder a recipe describes, evaluate it on the "
                                   "held-out split (kNN, linear probe) and write card.json / "
                                   "card.md in the run directory.")
    recipe_args(p)
    p.add_argument("--run-dir", default=None, help="output directory (default runs/NAME-TIME)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its latest checkpoint, exactly")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default=None,
                   help="auto | cpu | cuda | cuda:N (default: the recipe's; auto: CUDA if any)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run on frozen features",
                       description="Evaluation protocols on a run's frozen encoder, on its "
                                   "own held-out split or on another dataset or folder: kNN, "
                                   "linear probe, k-means clustering (NMI/AMI), effective rank "
                                   "(RankMe), hubness, alignment/uniformity (geometry), "
                                   "label retrieval (recall@k, MRR, nDCG). Every number is "
                                   "printed with its protocol.")
    p.add_argument("run_dir", help="a run directory made by `nearfar train`")
    p.add_argument("--data-source", default=None,
                   help="mnist5k | digits | folder | manifest (default: the run's own data)")
    p.add_argument("--data-path", default=None, help="folder or manifest path")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--protocols", default=None, metavar="LIST",
                   help="comma-separated: knn,linear_probe,clustering,rank,hubness,geometry,"
                        "retrieval (default: all but retrieval, as `nearfar train` runs)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("card", help="show, check or export a run's card",
                       description="The card of a run: `show` (markdown or --json; also "
                                   "`nearfar card RUN_DIR`), `check` (exit 1 naming each "
                                   "missing or invalid field and each changed audit), "
                                   "`export --format huggingface` (a model-card README.md).")
    card_sub = p.add_subparsers(dest="card_action", metavar="ACTION")
    q = card_sub.add_parser("show", help="print the card (markdown, or --json)")
    q.add_argument("run_dir", help="a run directory made by `nearfar train`")
    q.add_argument("--json", action="store_true", help="print card.json instead of markdown")
    q.set_defaults(func=cmd_card)
    q = card_sub.add_parser(
        "check", help="exit 1 naming each missing / invalid field or changed audit",
        description="Validate card.json against the card JSON Schema: every source-discipline "
                    "field (objective, positive and negative construction, modality, encoder "
                    "+ weights sha256, dataset + data sha256, benchmark, evaluation protocol, "
                    "every result's protocol, uses) and every attached audit's sha256. Prints "
                    "`ok` and exits 0, or names each problem and exits 1.")
    q.add_argument("run_dir", help="a run directory (or its card.json)")
    q.set_defaults(func=cmd_card)
    q = card_sub.add_parser("export", help="write the card in another format (huggingface)")
    q.add_argument("run_dir", help="a run directory made by `nearfar train`")
    q.add_argument("--format", choices=["huggingface"], default="huggingface",
                   help="huggingface: README.md with a model-index YAML block (default)")
    q.add_argument("--out", default=None, help="output file (default RUN_DIR/README.md)")
    q.set_defaults(func=cmd_card)
    p.set_defaults(func=lambda _args: (p.print_help(), 0)[1])

    p = sub.add_parser("views", help="save a PNG grid of the positive pairs a recipe makes",
                       description="Draw positive pairs from the recipe's view pipeline and save "
                                   "them as a PNG grid: what 'the same' means for this run.")
    recipe_args(p)
    p.add_argument("--out", default="views.png", help="output PNG (default views.png)")
    p.add_argument("--pairs", type=int, default=32, help="number of pairs (default 32)")
    p.add_argument("--nrow", type=int, default=8, help="pairs per row (default 8)")
    p.set_defaults(func=cmd_views)
    from nearfar.index.cli import register as register_index
    register_index(sub)
    from nearfar.serve.cli import register as register_serve
    register_serve(sub)
    from nearfar.audit.cli import register as register_audit
    register_audit(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_card_argv(list(sys.argv[1:] if argv is None else argv)))
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `nearfar card RUN | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("nearfar: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        print(f"nearfar: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
