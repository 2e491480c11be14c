"""Wall time of gauge inference plus certification on the real all-MiniLM-L6-v2 (a script,
not a test).

Measures, in one fresh process (nothing cached, compilation included, as a user sees it):

1. loading the model (not counted in the target);
2. `gaugejax.infer_gauge(..., certify=False)`: tracing MiniLM to a jaxpr and inferring the
   gauge (6 layers x (heads, per-head GL(32) x 2, key shift, MLP permutations));
3. certification: one invariance sweep of the inferred gauge (`num_samples` elements,
   default 4), compilation included;
4. whether the inferred gauge equals the declared `gaugejax.derive_gauge(transformer)`.

Target: inference + certification < 30 s on 2 CPU cores. Writes JSON (default
`benchmarks/results/infer.json`) with the environment and the load average.

    python benchmarks/infer.py
    python benchmarks/infer.py --samples 8 --out /tmp/infer.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import gaugejax as gj
from gaugejax._infer import infer_gauge, same_gauge
from gaugejax._minilm import MiniLM, tokenize


TARGET_S = 30.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "infer.json"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    model, tok = gj.load_minilm()
    ids, mask = tokenize(tok, ["Gauge symmetries of neural networks.", "A sentence encoder."])
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    params, static = eqx.partition(model.transformer, eqx.is_array)

    def fn(p, i, m):
        return MiniLM(eqx.combine(p, static), model.normalize)(i, m)

    t1 = time.perf_counter()
    inferred = infer_gauge(fn, params, ids, mask, certify=False)
    t2 = time.perf_counter()
    certified = inferred.certify(key=jax.random.key(0), num_samples=args.samples)
    t3 = time.perf_counter()
    diff = same_gauge(inferred.gauge, gj.derive_gauge(model.transformer))
    total = t3 - t1
    result = {
        "model": "all-MiniLM-L6-v2",
        "batch": list(ids.shape),
        "load_s": t1 - t0,
        "infer_s": t2 - t1,
        "certify_s": t3 - t2,
        "infer_plus_certify_s": total,
        "target_s": TARGET_S,
        "within_target": total < TARGET_S,
        "num_samples": args.samples,
        "max_rel_error": certified.report.max_rel_error,
        "certified": certified.certified,
        "agrees_with_declared": bool(diff),
        "sites": len(inferred.gauge.sites),
        "orbit_dim": inferred.gauge.orbit_dim,
        "env": {
            "jax": importlib.metadata.version("jax"),
            "jaxlib": importlib.metadata.version("jaxlib"),
            "equinox": importlib.metadata.version("equinox"),
            "device": str(jax.devices()[0]),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        },
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"infer {result['infer_s']:.1f} s + certify {result['certify_s']:.1f} s = {total:.1f} s "
          f"(target < {TARGET_S:.0f} s: {'ok' if result['within_target'] else 'MISSED'}); "
          f"agrees with declared: {result['agrees_with_declared']}; certified: {result['certified']} "
          f"(max rel. error {result['max_rel_error']:.1e}); wrote {out}")
    return 0 if result["within_target"] and result["certified"] and result["agrees_with_declared"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
