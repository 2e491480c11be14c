"""The `gaugejax` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gaugejax", description="Gauge symmetries of neural networks in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="verify the gauge symmetries of the built-in models")
    rep.add_argument("--json", metavar="PATH", help="write the results as JSON")
    rep.add_argument("--plot", metavar="DIR", help="draw the invariance-error histograms")
    rep.add_argument("--samples", type=int, default=2048, help="group elements per sweep (default 2048)")
    rep.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "report":
        if args.samples <= 0:
            parser.error(f"--samples must be positive, got {args.samples}")
        import jax

        jax.config.update("jax_enable_x64", True)
        from ._report import run_report

        result = run_report(num_samples=args.samples, seed=args.seed, json_path=args.json, plot_dir=args.plot)
        ok = all(s["passed"] for m in result["models"] for s in m["sweeps"]) and all(
            c["broke_as_predicted"] for m in result["models"] for c in m["controls"])
        return 0 if ok else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
