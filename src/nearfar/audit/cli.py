"""`nearfar audit RUN_DIR --group-by COLUMN [...]`: every audit of a run's encoder.

    nearfar audit runs/x --group-by group --subject-by subject --sensitive sex --shift noise
    nearfar audit runs/x --data-source manifest --data-path faces.csv --group-by site \\
        --target-fmr 1e-4 --out audits/x --no-html

Writes audit.json (and audit.html) to --out (default RUN_DIR, where `nearfar index build`
finds T*); prints the flags. Exit status 0, or 1 with --fail-on-flag when anything is
flagged; user errors are one line with exit status 2.
"""

from __future__ import annotations

import argparse


def cmd_audit(args: argparse.Namespace) -> int:
    from nearfar.audit.run import audit_run

    data = None
    if args.data_source or args.data_path:
        data = {"source": args.data_source or "folder", "path": args.data_path or ""}
    shift_data = None
    if args.shift_source or args.shift_path:
        shift_data = {"source": args.shift_source or "folder", "path": args.shift_path or ""}
    paths, record = audit_run(args.run_dir, group_by=args.group_by, data=data, split=args.split,
                              subject_by=args.subject_by, sensitive=args.sensitive,
                              shift=args.shift, shift_data=shift_data,
                              target_fmr=args.target_fmr, out=args.out, html=args.html,
                              k=args.k, n_boot=args.bootstrap, seed=args.seed,
                              device=args.device)
    print(f"audit of {args.run_dir}: {record['n_items']} items, groups by "
          f"{args.group_by!r}: {', '.join(record['groups'])}")
    sections = record["sections"]
    if "subgroup" in sections:
        m = sections["subgroup"]["metrics"]["knn_correct"]
        b = m["between_groups"]
        print(f"  kNN top-1 {m['overall']['value']:.4f}; best {b['best']} / worst {b['worst']}, "
              f"gap {b['max_gap']:.4f}")
    if record.get("t_star") is not None:
        th = sections["threshold"]
        print(f"  T* = {th['t_star']:.4f} at FMR {th['target_fmr']:g} (FNMR "
              f"{th['fnmr_at_t_star']:.4f})")
    if "leakage" in sections:
        lk = sections["leakage"]
        print(f"  leakage of {args.sensitive!r}: probe {lk['probe_accuracy']:.4f}, majority "
              f"{lk['majority_baseline']:.4f}, control {lk['control_accuracy']:.4f}")
    if "prompts" in sections:
        pr = sections["prompts"]
        print(f"  zero-shot over {len(pr['templates'])} templates: mean {pr['mean']:.4f}, std "
              f"{pr['std']:.4f}, range {pr['range']:.4f}")
    if "ood" in sections:
        o = sections["ood"]
        print(f"  shift ({o['shift']}): kNN {o['in_domain']:.4f} -> {o['shifted']:.4f}; domain "
              f"AUROC {o['domain_classifier']['auroc']:.4f}")
    for name, why in record["skipped"].items():
        print(f"  not run: {name}: {why}")
    if record["flags"]:
        print(f"{len(record['flags'])} flag(s):")
        for f in record["flags"]:
            print(f"  - {f['why']}")
    else:
        print("no flags")
    for path in paths.values():
        print(f"wrote {path}")
    print(f"card: {record['card']}")
    return 1 if args.fail_on_flag and record["flags"] else 0


def _fmr(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``nearfar audit`` to the top-level parser's subcommands."""
    from nearfar.audit.shifts import SHIFTS

    p = sub.add_parser(
        "audit", help="audit a run: subgroups, neighbours, thresholds, prompts, shift, leakage",
        description="Audit a run's frozen encoder on its held-out split (or other data): "
                    "per-group metrics with subject-bootstrap intervals, neighbour composition "
                    "and hubness, FMR/FNMR and T* at a target FMR, prompt sensitivity "
                    "(image-text runs), out-of-domain gap, attribute leakage. Writes "
                    "audit.json and a self-contained audit.html.")
    p.add_argument("run_dir", help="a run directory made by `nearfar train`")
    p.add_argument("--data-source", default=None,
                   help="mnist5k | digits | folder | manifest (default: the run's own data)")
    p.add_argument("--data-path", default=None, help="folder or manifest path")
    p.add_argument("--split", choices=("test", "all"), default="test",
                   help="audit the run's held-out split (default) or all the data")
    p.add_argument("--group-by", required=True, metavar="COLUMN",
                   help="metadata column whose values are the groups compared")
    p.add_argument("--subject-by", default=None, metavar="COLUMN",
                   help="metadata column naming each item's subject (bootstrap unit, pair "
                        "identity, leakage folds)")
    p.add_argument("--sensitive", default=None, metavar="COLUMN",
                   help="metadata column probed for attribute leakage")
    p.add_argument("--shift", choices=sorted(SHIFTS), default=None,
                   help="corrupted copies for the out-of-domain audit")
    p.add_argument("--shift-source", default=None,
                   help="or another dataset as the shifted set (mnist5k | digits | folder | "
                        "manifest)")
    p.add_argument("--shift-path", default=None, help="its folder or manifest path")
    p.add_argument("--target-fmr", type=_fmr, default=1e-3,
                   help="false match rate that fixes the global threshold T* (default 1e-3)")
    p.add_argument("--k", type=int, default=10, help="neighbours (default 10)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap replicates for intervals (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument("--out", default=None,
                   help="output directory (default RUN_DIR, where `nearfar index build` reads T*)")
    p.add_argument("--html", action=argparse.BooleanOptionalAction, default=True,
                   help="also write audit.html (default; --no-html to skip)")
    p.add_argument("--fail-on-flag", action="store_true",
                   help="exit with status 1 when anything is flagged")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=cmd_audit)


__all__ = ["register"]
