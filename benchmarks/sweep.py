"""Throughput of `Gauge.act` and of vmapped invariance sweeps (a script, not a test).

Measures, in one run:

1. `act` vs a plain jitted tree copy (`x * 1.0` on every leaf) of a 3 x 1024 ReLU MLP, for
   diagonal, sign-flip and permutation groups, with `check=True` and `check=False`;
2. `check_invariance(num_samples=256)` vs 256 jitted single checks in a Python loop, on a
   small MLP and on the 3 x 1024 MLP;
3. the sweep's cost per group element vs one jitted forward pass plus one jitted `act`;
4. the sweep's time per element for a range of `chunk_size`s, next to the adaptive pick of
   `gaugejax.choose_chunk_size`.

Writes JSON (default `benchmarks/results/sweep.json`) and prints a table of the ratios
against their targets. Timings are medians over repeats, each call ended by
`block_until_ready`; warm-up (and compilation) is excluded and compile time reported
separately.

    python benchmarks/sweep.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/sweep.py --quick    # smoke run (under a minute)
    python benchmarks/sweep.py --out /tmp/sweep.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import gaugejax as gj


try:
    from ._results import finish
except ImportError:  # run as a script
    from _results import finish
from gaugejax import _sweep


ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "sweep.json"

SMALL_SIZES = [32, 64, 64, 10]
LARGE_SIZES = [1024, 1024, 1024, 1024]
BATCH = 16
NUM_SAMPLES = 256

TARGETS = {
    "act_diagonal": 0.7,  # copy time / act time
    "act_sign": 0.7,
    "act_permutation": 0.3,
    "sweep_speedup_small": 10.0,  # loop time / sweep time
    "sweep_speedup_large": 1.0,
    "per_element_cost": 1.3,  # sweep time per element / (forward + act)
}


# ----------------------------------------------------------------------------------------
# timing helpers
# ----------------------------------------------------------------------------------------
def _stats(ts: list[float]) -> dict[str, Any]:
    a = np.asarray(ts)
    return {
        "median_s": float(np.median(a)),
        "p10_s": float(np.percentile(a, 10)),
        "p90_s": float(np.percentile(a, 90)),
        "min_s": float(np.min(a)),
        "repeats": int(a.size),
    }


def _time_once(f: Callable[[], Any]) -> float:
    t = time.perf_counter()
    jax.block_until_ready(f())
    return time.perf_counter() - t


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Time every function once per round, in turn, so that load drift on a shared machine
    hits all of them alike. Returns the raw per-round times."""
    for _ in range(warmup):
        for f in fns.values():
            jax.block_until_ready(f())
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            out[k].append(_time_once(f))
    return out


def _compile(f, *args):
    """Compile time of a `jax.jit`-ed function (lower + compile, ahead of time), then one
    warm-up call so that later calls take jit's fast dispatch path (an AOT `Compiled`
    object dispatches more slowly from Python). Returns (f, seconds)."""
    t = time.perf_counter()
    f.lower(*args).compile()
    seconds = time.perf_counter() - t
    jax.block_until_ready(f(*args))
    return f, seconds


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if eqx.is_array(x)))


def _shapes(model) -> dict[str, list[int]]:
    out = {}
    for i, layer in enumerate(model.layers):
        out[f"layers[{i}].weight"] = list(layer.weight.shape)
        if layer.bias is not None:
            out[f"layers[{i}].bias"] = list(layer.bias.shape)
    return out


def _describe_model(model, activation: str) -> dict[str, Any]:
    return {
        "class": "gaugejax.nn.MLP",
        "sizes": list(model.sizes),
        "activation": activation,
        "param_shapes": _shapes(model),
        "num_params": int(sum(x.size for x in jax.tree.leaves(model) if eqx.is_array(x))),
        "param_bytes": _nbytes(model),
        "dtype": str(model.layers[0].weight.dtype),
    }


# ----------------------------------------------------------------------------------------
# the model function and the relative error
# ----------------------------------------------------------------------------------------
def forward(model, x):
    return model(x)


def _plain_rel_error(y, y0):
    num = max(jnp.max(jnp.abs(a - b)) for a, b in zip(jax.tree.leaves(y), jax.tree.leaves(y0)))
    den = max(jnp.max(jnp.abs(b)) for b in jax.tree.leaves(y0))
    return num / jnp.maximum(den, jnp.finfo(den.dtype).tiny)


# The loop computes the error exactly as the sweep does (same math, same XLA program shape),
# so that the comparison is about batching, not about the error formula.
rel_error = getattr(_sweep, "_rel_error", _plain_rel_error)


# ----------------------------------------------------------------------------------------
# 1. act vs copy
# ----------------------------------------------------------------------------------------
def bench_act(rounds: int) -> dict[str, Any]:
    key = jax.random.key(0)
    relu_model = gj.nn.MLP(LARGE_SIZES, key=key)
    # SignFlip is the symmetry of odd activations: same shapes, tanh instead of ReLU.
    tanh_model = gj.nn.MLP(LARGE_SIZES, jnp.tanh, key=key)
    cases = [
        ("diagonal", "PositiveDiagonal", relu_model, gj.PositiveDiagonal, "act_diagonal"),
        ("sign", "SignFlip", tanh_model, gj.SignFlip, "act_sign"),
        ("permutation", "PositiveMonomial (default)", relu_model, None, "act_permutation"),
        ("permutation", "Permutation", relu_model, gj.Permutation, "act_permutation"),
    ]
    copy = jax.jit(lambda m: jax.tree.map(lambda x: x * 1.0, m))
    copy_c, copy_compile = _compile(copy, relu_model)
    fns: dict[str, Callable[[], Any]] = {"copy": lambda: copy_c(relu_model)}
    meta: dict[str, dict[str, Any]] = {}
    for kind, name, model, group, target_key in cases:
        gauge = gj.derive_gauge(model, group=group)
        g = gauge.sample(jax.random.key(1))
        for check in (True, False):
            f = jax.jit(lambda g, m, gauge=gauge, check=check: gauge.act(g, m, check=check))
            fc, comp = _compile(f, g, model)
            label = f"{name} check={check}"
            fns[label] = lambda fc=fc, g=g, model=model: fc(g, model)
            meta[label] = {
                "kind": kind, "group": name, "check": check, "compile_s": comp,
                "target_key": target_key, "model": "tanh" if model is tanh_model else "relu",
            }
    times = interleaved(fns, rounds)
    copy_t = np.asarray(times["copy"])
    results = []
    for label, m in meta.items():
        t = np.asarray(times[label])
        paired = float(np.median(copy_t / t))
        of_medians = float(np.median(copy_t) / np.median(t))
        target = TARGETS[m["target_key"]]
        results.append({
            **{k: v for k, v in m.items() if k != "target_key"},
            "time": _stats(list(t)),
            "ratio": paired,
            "ratio_of_medians": of_medians,
            "target": target,
            "passed": paired >= target,
        })
    return {
        "model": _describe_model(relu_model, "relu (tanh for SignFlip)"),
        "copy": {"expr": "jax.jit(lambda m: jax.tree.map(lambda x: x * 1.0, m))", "time": _stats(list(copy_t)), "compile_s": copy_compile},
        "ratio_definition": "median over interleaved rounds of (copy time / act time); ratio_of_medians = median(copy) / median(act)",
        "results": results,
    }


# ----------------------------------------------------------------------------------------
# 2-4. sweeps
# ----------------------------------------------------------------------------------------
class Problem:
    def __init__(self, name: str, sizes: list[int], num_samples: int):
        self.name = name
        self.model = gj.nn.MLP(sizes, key=jax.random.key(0))
        self.x = jax.random.normal(jax.random.key(1), (BATCH, sizes[0]))
        self.gauge = gj.derive_gauge(self.model)  # PositiveMonomial on every hidden site
        self.key = jax.random.key(2)
        self.num_samples = num_samples
        self.y0 = jax.jit(forward)(self.model, self.x)
        self.keys = jax.random.split(self.key, num_samples)
        self.key_list = list(self.keys)  # split up front: the loop pays only its calls

    def check_invariance(self, chunk_size=None):
        return gj.check_invariance(
            forward, self.gauge, self.model, self.x, key=self.key,
            num_samples=self.num_samples, chunk_size=chunk_size,
        )

    def inner(self, chunk: int):
        """The compiled sweep without `check_invariance`'s eager checks (private API)."""
        errors, _ = _sweep._sweep_block(
            forward, self.gauge, self.model, (self.x,), self.key, np.int32(0), self.num_samples,
            self.num_samples, 0.5, None, chunk, self.model.layers[0].weight.dtype, None,
        )
        return errors


def bench_sweep(p: Problem, reps: int, eqx_loop: bool) -> dict[str, Any]:
    gauge, S = p.gauge, p.num_samples

    def one(key, model, x, y0):
        g = gauge.sample(key)
        return rel_error(forward(gauge.act(g, model, check=False), x), y0)

    single, single_compile = _compile(jax.jit(one), p.key_list[0], p.model, p.x, p.y0)

    def loop():
        return [single(k, p.model, p.x, p.y0) for k in p.key_list]

    fns: dict[str, Callable[[], Any]] = {"loop": loop}
    # The cheapest dispatch: the parameters as a flat list of arrays (a Module argument
    # costs ~100 us of Python pytree handling per call).
    leaves, treedef = jax.tree.flatten(p.model)
    single_flat = jax.jit(lambda key, leaves, x, y0: one(key, jax.tree.unflatten(treedef, leaves), x, y0))
    jax.block_until_ready(single_flat(p.key_list[0], leaves, p.x, p.y0))
    fns["loop_flat_leaves"] = lambda: [single_flat(k, leaves, p.x, p.y0) for k in p.key_list]
    if eqx_loop:
        single_eqx = eqx.filter_jit(one)
        fns["loop_filter_jit"] = lambda: [single_eqx(k, p.model, p.x, p.y0) for k in p.key_list]
    chunk = gj.choose_chunk_size(p.model, S)
    first = {}
    t0 = time.perf_counter()
    report = p.check_invariance()
    first["check_invariance_first_call_s"] = time.perf_counter() - t0
    fns["check_invariance"] = lambda: p.check_invariance().errors
    inner_ok = True
    try:
        t0 = time.perf_counter()
        jax.block_until_ready(p.inner(chunk))
        first["inner_first_call_s"] = time.perf_counter() - t0
        fns["inner_sweep"] = lambda: p.inner(chunk)
    except Exception as e:  # the private signature changed
        inner_ok = False
        first["inner_error"] = repr(e)
    times = interleaved(fns, reps, warmup=1)
    loop_t = float(np.median(times["loop"]))
    ci_t = float(np.median(times["check_invariance"]))
    out: dict[str, Any] = {
        "num_samples": S,
        "batch": BATCH,
        "adaptive_chunk": chunk,
        "report_passed": bool(report.passed),
        "max_rel_error": float(report.max_rel_error),
        "loop_compile_s": single_compile,
        **first,
        "times": {k: _stats(v) for k, v in times.items()},
        "speedup_check_invariance": loop_t / ci_t,
        "speedup_check_invariance_paired": float(np.median(np.asarray(times["loop"]) / np.asarray(times["check_invariance"]))),
        "check_invariance_overhead_s": None,
    }
    if inner_ok:
        inner_t = float(np.median(times["inner_sweep"]))
        out["speedup_inner"] = loop_t / inner_t
        out["check_invariance_overhead_s"] = ci_t - inner_t
    out["speedup_check_invariance_vs_flat_loop"] = float(np.median(times["loop_flat_leaves"])) / ci_t
    if eqx_loop:
        out["speedup_check_invariance_vs_filter_jit_loop"] = float(np.median(times["loop_filter_jit"])) / ci_t
    return out


def bench_per_element(p: Problem, sweep: dict[str, Any], rounds: int) -> dict[str, Any]:
    gauge = p.gauge
    g = gauge.sample(jax.random.key(3))
    act, act_c = _compile(jax.jit(lambda g, m: gauge.act(g, m, check=False)), g, p.model)
    fwd, fwd_c = _compile(jax.jit(forward), p.model, p.x)
    fused, fused_c = _compile(jax.jit(lambda g, m, x: forward(gauge.act(g, m, check=False), x)), g, p.model, p.x)
    leaves, treedef = jax.tree.flatten(p.model)
    act_flat = jax.jit(lambda g, ls: jax.tree.leaves(gauge.act(g, jax.tree.unflatten(treedef, ls), check=False)))
    fwd_flat = jax.jit(lambda ls, x: forward(jax.tree.unflatten(treedef, ls), x))
    jax.block_until_ready((act_flat(g, leaves), fwd_flat(leaves, p.x)))
    times = interleaved(
        {
            "act": lambda: act(g, p.model),
            "forward": lambda: fwd(p.model, p.x),
            "act+forward (one jit)": lambda: fused(g, p.model, p.x),
            "act (flat leaves)": lambda: act_flat(g, leaves),
            "forward (flat leaves)": lambda: fwd_flat(leaves, p.x),
        },
        rounds,
    )
    t_act = float(np.median(times["act"]))
    t_fwd = float(np.median(times["forward"]))
    S = p.num_samples
    per_ci = sweep["times"]["check_invariance"]["median_s"] / S
    out = {
        "times": {k: _stats(v) for k, v in times.items()},
        "compile_s": {"act": act_c, "forward": fwd_c, "act+forward": fused_c},
        "act_plus_forward_s": t_act + t_fwd,
        "sweep_per_element_s": per_ci,
        "ratio_check_invariance": per_ci / (t_act + t_fwd),
        "target": TARGETS["per_element_cost"],
    }
    if "inner_sweep" in sweep["times"]:
        per_inner = sweep["times"]["inner_sweep"]["median_s"] / S
        out["inner_per_element_s"] = per_inner
        out["ratio_inner"] = per_inner / (t_act + t_fwd)
    flat = float(np.median(times["act (flat leaves)"])) + float(np.median(times["forward (flat leaves)"]))
    out["act_plus_forward_flat_leaves_s"] = flat
    out["ratio_check_invariance_vs_flat"] = per_ci / flat
    out["passed"] = out["ratio_check_invariance"] <= out["target"]
    return out


def bench_chunks(p: Problem, chunks: list[int], reps: int, with_inner: bool) -> dict[str, Any]:
    S = p.num_samples
    nbytes = _nbytes(p.model)
    avail = _mem_available()
    rows = []
    adaptive = gj.choose_chunk_size(p.model, S)
    for c in chunks:
        row: dict[str, Any] = {"chunk_size": c}
        if c > S:
            row["skipped"] = f"chunk_size > num_samples ({S})"
            rows.append(row)
            continue
        est = 3 * c * nbytes
        if avail is not None and est > 0.4 * avail:
            row["skipped"] = f"would need ~{est / 2**30:.1f} GiB (3 x chunk x params), {avail / 2**30:.1f} GiB available"
            rows.append(row)
            continue
        t0 = time.perf_counter()
        jax.block_until_ready(p.check_invariance(c).errors)
        row["first_call_s"] = time.perf_counter() - t0
        fns = {"check_invariance": lambda c=c: p.check_invariance(c).errors}
        if with_inner:
            try:
                jax.block_until_ready(p.inner(c))
                fns["inner_sweep"] = lambda c=c: p.inner(c)
            except Exception as e:
                row["inner_error"] = repr(e)
        times = interleaved(fns, reps, warmup=0)
        row["per_element_us"] = float(np.median(times["check_invariance"])) / S * 1e6
        row["time"] = _stats(times["check_invariance"])
        if "inner_sweep" in times:
            row["inner_per_element_us"] = float(np.median(times["inner_sweep"])) / S * 1e6
        rows.append(row)
        print(f"    {p.name}: chunk {c:4d}: {row['per_element_us']:10.1f} us/element", flush=True)
    timed = [r for r in rows if "per_element_us" in r]
    best = min(timed, key=lambda r: r["per_element_us"]) if timed else None
    pick = next((r for r in timed if r["chunk_size"] == adaptive), None)
    return {
        "num_samples": S,
        "param_bytes": nbytes,
        "chunk_bytes_budget": _sweep._chunk_budget(),
        "adaptive_chunk": adaptive,
        "table": rows,
        "best_chunk": best["chunk_size"] if best else None,
        "adaptive_over_best": (pick["per_element_us"] / best["per_element_us"]) if (pick and best) else None,
    }


# ----------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------
def _meta(mode: str) -> dict[str, Any]:
    dev = jax.devices()[0]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT.parent, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
        dirty = bool(subprocess.run(
            ["git", "status", "--porcelain", "--", "gaugejax"], cwd=ROOT.parent, capture_output=True, text=True, timeout=10
        ).stdout.strip())
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--", "gaugejax"], cwd=ROOT.parent, capture_output=True, timeout=10
        ).stdout
        diff_sha = hashlib.sha256(diff).hexdigest()[:16] if diff else None
    except Exception:
        commit, dirty, diff_sha = None, None, None
    return {
        "mode": mode,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "jaxlib_version": importlib.metadata.version("jaxlib"),
        "equinox_version": eqx.__version__,
        "gaugejax_version": gj.__version__,
        "git_commit": commit,
        "gaugejax_dirty": dirty,
        "gaugejax_diff_sha256_16": diff_sha,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "device": str(dev),
        "device_kind": getattr(dev, "device_kind", None),
        "num_devices": len(jax.devices()),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "rel_error": f"{rel_error.__module__}.{rel_error.__name__}",
    }


def _table(res: dict[str, Any]) -> str:
    rows = []
    for r in res["act"]["results"]:
        rows.append((
            f"act {r['group']}, check={r['check']}",
            f"{r['ratio']:.2f}x ({r['time']['median_s'] * 1e3:.2f} ms vs copy {res['act']['copy']['time']['median_s'] * 1e3:.2f} ms)",
            f">= {r['target']}", r["passed"],
        ))
    for name, tkey in (("small", "sweep_speedup_small"), ("large", "sweep_speedup_large")):
        s = res["sweep"][name]
        target = TARGETS[tkey]
        extra = f", inner {s['speedup_inner']:.2f}x" if "speedup_inner" in s else ""
        extra += f"; vs flat-leaves loop {s['speedup_check_invariance_vs_flat_loop']:.2f}x"
        rows.append((
            f"sweep vs loop, {name} MLP ({s['num_samples']} el.)",
            f"{s['speedup_check_invariance']:.2f}x{extra}",
            f">= {target}", s["speedup_check_invariance"] >= target,
        ))
    for name in ("small", "large"):
        e = res["per_element"][name]
        extra = f", inner {e['ratio_inner']:.2f}x" if "ratio_inner" in e else ""
        rows.append((
            f"sweep / (fwd + act) per el., {name}",
            f"{e['ratio_check_invariance']:.2f}x{extra} ({e['sweep_per_element_s'] * 1e6:.0f} us vs {e['act_plus_forward_s'] * 1e6:.0f} us)",
            f"<= {e['target']}", e["passed"],
        ))
    for name in ("small", "large"):
        c = res["chunks"][name]
        ratio = c["adaptive_over_best"]
        rows.append((
            f"chunk: adaptive {c['adaptive_chunk']} vs best {c['best_chunk']}, {name}",
            "n/a" if ratio is None else f"{ratio:.2f}x the best time",
            "(info)", None,
        ))
    w = max(len(r[0]) for r in rows)
    lines = [f"{'measure':{w}s}  {'value':58s}  {'target':8s}  ok"]
    for name, val, tgt, ok in rows:
        mark = "" if ok is None else ("PASS" if ok else "MISS")
        lines.append(f"{name:{w}s}  {val:58s}  {tgt:8s}  {mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT.relative_to(ROOT.parent)})")
    ap.add_argument("--quick", action="store_true", help="smoke mode: fewer repeats, 32 samples on the large MLP")
    args = ap.parse_args(argv)

    q = args.quick
    cfg = {
        "act_rounds": 20 if q else 150,
        "small_reps": 5 if q else 30,
        "large_reps": 1 if q else 2,
        "large_samples": 32 if q else NUM_SAMPLES,
        "per_element_rounds": 10 if q else 50,
        "small_chunks": [1, 16, 256] if q else [1, 2, 4, 8, 16, 32, 64, 256],
        "large_chunks": [1, 4, 16] if q else [1, 2, 4, 8, 16, 32, 64, 256],
        "small_chunk_reps": 3 if q else 10,
        "large_chunk_reps": 1 if q else 2,
    }
    start = time.perf_counter()
    res: dict[str, Any] = {"meta": _meta("quick" if q else "full"), "config": cfg, "targets": TARGETS}
    print(f"jax {jax.__version__} on {res['meta']['device']}, {os.cpu_count()} CPUs, mode {res['meta']['mode']}", flush=True)

    print("1. act vs copy (3 x 1024 MLP)", flush=True)
    res["act"] = bench_act(cfg["act_rounds"])

    small = Problem("small", SMALL_SIZES, NUM_SAMPLES)
    large = Problem("large", LARGE_SIZES, cfg["large_samples"])
    res["models"] = {
        "small": {**_describe_model(small.model, "relu"), "input_batch": BATCH, "group": "PositiveMonomial (default)"},
        "large": {**_describe_model(large.model, "relu"), "input_batch": BATCH, "group": "PositiveMonomial (default)"},
    }
    print("2. sweep vs loop", flush=True)
    res["sweep"] = {
        "small": bench_sweep(small, cfg["small_reps"], eqx_loop=True),
        "large": bench_sweep(large, cfg["large_reps"], eqx_loop=False),
    }
    print("3. per-element cost", flush=True)
    res["per_element"] = {
        "small": bench_per_element(small, res["sweep"]["small"], cfg["per_element_rounds"]),
        "large": bench_per_element(large, res["sweep"]["large"], max(5, cfg["per_element_rounds"] // 5)),
    }
    print("4. chunk sizes", flush=True)
    res["chunks"] = {
        "small": bench_chunks(small, cfg["small_chunks"], cfg["small_chunk_reps"], with_inner=True),
        "large": bench_chunks(large, cfg["large_chunks"], cfg["large_chunk_reps"], with_inner=False),
    }
    return finish(res, args.out, _table(res), start)


if __name__ == "__main__":
    sys.exit(main())
