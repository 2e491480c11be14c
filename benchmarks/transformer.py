"""Transformer gauges: sweep cost per group element, and weight processing on MiniLM
(a script, not a test).

Measures, in one run (float32, CPU unless JAX picks another backend):

1. for a small random transformer (pre-norm scale-free RMSNorm, ReLU, untied: every gauge
   family including the residual rotation $O(d)$) and for all-MiniLM-L6-v2
   ([`gaugejax.load_minilm`][]: heads, per-head GL(d_k)/GL(d_v), key shifts, MLP
   permutations), the cost per group element of `check_invariance` against one jitted
   forward pass plus one jitted `Gauge.act` (target <= 1.3x, as `benchmarks/sweep.py`
   measures it for MLPs). Both the public `check_invariance` and the compiled sweep
   without its eager checks (`_sweep._sweep_block`, private) are timed. The sweep also
   *samples* each element (matrix exponentials of the GL sites), which the denominator
   does not include; the sampling time is reported separately;
2. the time of each weight-processing step MiniLM admits (post-LayerNorm: only the
   per-head steps `fold_value_biases`, `balance_attention`; the pre-norm steps refuse),
   called eagerly as a user does (`balance_attention` factorises on the host with NumPy),
   and of `process_weights` with its error report.

Timings are medians over interleaved repeats (the machine is shared and noisy), each call
ended by `block_until_ready`; compilation is excluded and reported separately.

    python benchmarks/transformer.py            # full run (~5-10 min on 2 shared CPU cores)
    python benchmarks/transformer.py --quick    # smoke run
    python benchmarks/transformer.py --no-minilm
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


ROOT = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from sweep import _compile, _meta, _stats, interleaved  # noqa: E402  (same timing helpers as the MLP benchmark)

import gaugejax as gj  # noqa: E402
from gaugejax import _sweep  # noqa: E402


try:
    from ._results import finish
except ImportError:  # run as a script
    from _results import finish


DEFAULT_OUT = ROOT / "results" / "transformer.json"
TARGET = 1.3  # sweep time per element / (forward + act)

SMALL = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=4, d_mlp=256, max_len=32,
             norm="rms", norm_gain=False, activation="relu", unembedding="untied", causal=True)
SMALL_BATCH, SMALL_LEN = 8, 16

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Gauge symmetries of neural networks live in parameter space.",
    "A sentence encoder maps text to a unit vector.",
    "Transformers attend to every token in the sequence.",
]


def _nparams(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree) if eqx.is_inexact_array(x)))


class Case:
    """A model function `fn(params, *args)`, its parameters, gauge and inputs."""

    def __init__(self, name: str, fn: Callable, params: Any, args: tuple, gauge: gj.Gauge, num_samples: int,
                 describe: dict[str, Any]):
        self.name, self.fn, self.params, self.args, self.gauge = name, fn, params, args, gauge
        self.num_samples = num_samples
        self.key = jax.random.key(2)
        self.dtype = jax.tree.leaves(params)[0].dtype
        self.describe = {**describe, "num_params": _nparams(params),
                         "sites": {n: repr(g) for n, g in gauge.sites}, "orbit_dim": gauge.orbit_dim}

    def check_invariance(self, chunk: int | None):
        return gj.check_invariance(self.fn, self.gauge, self.params, *self.args, key=self.key,
                                   num_samples=self.num_samples, chunk_size=chunk)

    def inner(self, chunk: int):
        errors, _ = _sweep._sweep_block(
            self.fn, self.gauge, self.params, self.args, self.key, np.int32(0), self.num_samples,
            self.num_samples, 0.5, None, chunk, self.dtype, None,
        )
        return errors


def bench_case(c: Case, rounds: int, sweep_reps: int) -> dict[str, Any]:
    gauge, fn = c.gauge, c.fn
    g = gauge.sample(jax.random.key(3), dtype=c.dtype)
    fwd, fwd_c = _compile(jax.jit(fn), c.params, *c.args)
    act, act_c = _compile(jax.jit(lambda g, p: gauge.act(g, p, check=False)), g, c.params)
    samp, samp_c = _compile(jax.jit(lambda k: gauge.sample(k, scale=0.5, dtype=c.dtype)), c.key)
    fused, fused_c = _compile(jax.jit(lambda g, p, *a: fn(gauge.act(g, p, check=False), *a)), g, c.params, *c.args)
    chunk = gj.choose_chunk_size(c.params, c.num_samples)
    t0 = time.perf_counter()
    rep = c.check_invariance(None)
    first_ci = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(c.inner(chunk))
    first_inner = time.perf_counter() - t0
    per_call = interleaved(
        {"forward": lambda: fwd(c.params, *c.args), "act": lambda: act(g, c.params),
         "sample": lambda: samp(c.key), "act+forward (one jit)": lambda: fused(g, c.params, *c.args)},
        rounds,
    )
    sweeps = interleaved(
        {"check_invariance": lambda: c.check_invariance(None).errors, "inner_sweep": lambda: c.inner(chunk)},
        sweep_reps, warmup=0,
    )
    med = {k: float(np.median(v)) for k, v in {**per_call, **sweeps}.items()}
    S = c.num_samples
    denom = med["forward"] + med["act"]
    per_ci, per_inner = med["check_invariance"] / S, med["inner_sweep"] / S
    return {
        "model": c.describe,
        "num_samples": S,
        "chunk_size": chunk,
        "report": str(rep),
        "max_rel_error": rep.max_rel_error,
        "passed_invariance": bool(rep.passed),
        "compile_s": {"forward": fwd_c, "act": act_c, "sample": samp_c, "act+forward": fused_c,
                      "check_invariance_first_call": first_ci, "inner_first_call": first_inner},
        "times": {k: _stats(v) for k, v in {**per_call, **sweeps}.items()},
        "forward_plus_act_s": denom,
        "sweep_per_element_s": per_ci,
        "inner_per_element_s": per_inner,
        "ratio_check_invariance": per_ci / denom,
        "ratio_inner": per_inner / denom,
        "ratio_inner_vs_sample_act_forward": per_inner / (denom + med["sample"]),
        "target": TARGET,
        "passed": per_ci / denom <= TARGET,
    }


def small_case(num_samples: int) -> Case:
    model = gj.nn.Transformer(**SMALL, key=jax.random.key(0), dtype=jnp.float32)
    tokens = jax.random.randint(jax.random.key(1), (SMALL_BATCH, SMALL_LEN), 0, SMALL["vocab_size"])

    def fn(m, t):
        return jax.vmap(m)(t)

    gauge = gj.derive_gauge(model)
    return Case("small", fn, model, (tokens,), gauge, num_samples,
                {"class": "gaugejax.nn.Transformer", "config": SMALL, "tokens": [SMALL_BATCH, SMALL_LEN]})


def minilm_case(num_samples: int):
    from gaugejax._minilm import MiniLM, tokenize

    model, tok = gj.load_minilm()
    ids, mask = tokenize(tok, SENTENCES)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    normalize = model.normalize

    def fn(tr, i, m):
        return MiniLM(tr, normalize)(i, m)

    gauge = gj.derive_gauge(model.transformer)
    case = Case("minilm", fn, model.transformer, (ids, mask), gauge, num_samples,
                {"class": "gaugejax.MiniLM (all-MiniLM-L6-v2)", "tokens": list(ids.shape)})
    return case, model, ids, mask


def bench_processing(model, ids, mask, rounds: int) -> dict[str, Any]:
    tr = model.transformer
    steps = {"fold_value_biases": gj.fold_value_biases, "balance_attention": gj.balance_attention}
    out: dict[str, Any] = {"admitted": list(steps), "refused": {}}
    for name, f in (("fold_norm_gains", gj.fold_norm_gains), ("center_writing_weights", gj.center_writing_weights),
                    ("layernorm_to_rmsnorm", gj.layernorm_to_rmsnorm)):
        try:
            f(tr)
            out["refused"][name] = None
        except ValueError as e:
            out["refused"][name] = str(e)[:160]
    fns: dict[str, Callable[[], Any]] = {}
    compile_s = {}
    for name, f in steps.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(tr))
        compile_s[f"{name} (eager, first call)"] = time.perf_counter() - t0
        fns[f"{name} (eager)"] = lambda f=f: f(tr)
    t0 = time.perf_counter()
    new = gj.process_weights(tr)
    jax.block_until_ready(new)
    compile_s["process_weights (first call)"] = time.perf_counter() - t0
    fns["process_weights"] = lambda: gj.process_weights(tr)
    times = interleaved(fns, rounds, warmup=1)
    t0 = time.perf_counter()
    _, report = gj.process_weights(tr, ids, mask)
    with_report = time.perf_counter() - t0
    out.update({
        "first_call_s": compile_s,
        "times": {k: _stats(v) for k, v in times.items()},
        "process_weights_with_error_report_s": with_report,
        "report": {"dtype": report.dtype, "steps": report.steps, "eps": report.eps},
    })
    return out


def _table(res: dict[str, Any]) -> str:
    lines = [f"{'measure':44s}  {'value':64s}  target"]
    for name, r in res["per_element"].items():
        lines.append(
            f"{'sweep / (fwd + act) per el., ' + name:44s}  "
            f"{r['ratio_check_invariance']:.2f}x, inner {r['ratio_inner']:.2f}x "
            f"({r['sweep_per_element_s'] * 1e3:.2f} ms vs {r['forward_plus_act_s'] * 1e3:.2f} ms)"
            f"{'':4s}  <= {TARGET} {'PASS' if r['passed'] else 'MISS'}")
    p = res.get("processing")
    if p:
        for k, v in p["times"].items():
            lines.append(f"{'MiniLM ' + k:44s}  {v['median_s'] * 1e3:.1f} ms")
        lines.append(f"{'MiniLM processing error (max over steps)':44s}  "
                     f"{max(e for _, e in p['report']['steps']):.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and samples")
    ap.add_argument("--no-minilm", action="store_true", help="skip the MiniLM measurements")
    args = ap.parse_args(argv)
    q = args.quick
    cfg = {"small_samples": 64 if q else 256, "minilm_samples": 8 if q else 32,
           "small_rounds": 10 if q else 50, "small_sweep_reps": 3 if q else 10,
           "minilm_rounds": 3 if q else 10, "minilm_sweep_reps": 1 if q else 5,
           "processing_rounds": 2 if q else 7}
    start = time.perf_counter()
    res: dict[str, Any] = {"meta": _meta("quick" if q else "full"), "config": cfg, "target": TARGET,
                           "ratio_definition": "median(sweep time) / num_samples / (median(jitted forward) + "
                                               "median(jitted act)); inner = the compiled sweep without "
                                               "check_invariance's eager checks; the sweep also samples g",
                           "per_element": {}}
    print(f"jax {jax.__version__} on {res['meta']['device']}, {os.cpu_count()} CPUs", flush=True)
    print("1. small transformer", flush=True)
    res["per_element"]["small transformer"] = bench_case(small_case(cfg["small_samples"]),
                                                         cfg["small_rounds"], cfg["small_sweep_reps"])
    if not args.no_minilm:
        try:
            case, model, ids, mask = minilm_case(cfg["minilm_samples"])
        except ImportError as e:
            res["minilm_skipped"] = str(e)
        else:
            print("2. MiniLM sweep", flush=True)
            res["per_element"]["MiniLM"] = bench_case(case, cfg["minilm_rounds"], cfg["minilm_sweep_reps"])
            print("3. MiniLM processing", flush=True)
            res["processing"] = bench_processing(model, ids, mask, cfg["processing_rounds"])
    return finish(res, args.out, _table(res), start)


if __name__ == "__main__":
    sys.exit(main())
