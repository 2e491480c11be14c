"""Orbit-geometry benchmark. One run, JSON output.

Measured, each after a warm-up call (compile time reported apart), float32 unless noted:

1. horizontal projection of an Adam-like step sign(grad) vs one gradient evaluation (loss +
   grad on a batch of 256) for an MLP with diagonal (PositiveMonomial) sites: the structured path (target <= 0.5x) and the
   matrix-free CG path (target <= 3x);
2. canonicalization of the same MLP, at its initialisation and far along its orbit;
3. weight matching of two 3 x 512 ReLU MLPs (784-512-512-512-10): `gaugejax.align` (balancing
   off, identity start only, scipy host assignment: the same algorithm as the reference) vs a
   plain numpy + scipy implementation of Git Re-Basin's weight matching written here, same
   sweep order and stopping rule: objective of both and the time ratio (target <= 1.5x);
4. peak memory of the structured projection and of canonicalization, for widths
   256..2048: XLA's accounting of each compiled program (temporaries plus outputs, from
   `memory_analysis()`; the process's resident set is dominated by compilation and says
   nothing here), as a log-log slope against the parameter count (target: linear, slope
   <= 1.2; the autodiff Hessian that `balance` used to build was quadratic).

    python benchmarks/orbits.py [--out benchmarks/results/orbits.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import gaugejax as gj


def _timeit(fn, *args, reps: int):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def _reference_weight_matching(ws_a, ws_b, max_sweeps=50):
    """Git Re-Basin weight matching for an MLP given as lists of (W, b) numpy arrays,
    (out, in) layout, with scipy's linear_sum_assignment; hidden sites in forward order."""
    from scipy.optimize import linear_sum_assignment

    n_hidden = len(ws_a) - 1
    perms = [np.arange(ws_a[l][0].shape[0]) for l in range(n_hidden)]

    def permuted_b(perms):
        out = []
        for l, (w, b) in enumerate(ws_b):
            w = w if l == n_hidden else w[perms[l]]
            b = b if l == n_hidden else b[perms[l]]
            if l > 0:
                w = w[:, perms[l - 1]]
            out.append((w, b))
        return out

    def objective(perms):
        return sum(float(np.vdot(wa, wb) + np.vdot(ba, bb)) for (wa, ba), (wb, bb) in zip(ws_a, permuted_b(perms)))

    prev = -np.inf
    obj = objective(perms)
    it = 0
    while it < max_sweeps and (it < 2 or obj > prev + 1e-12 * abs(prev)):
        for l in range(n_hidden):
            wa, ba = ws_a[l]
            wb, bb = ws_b[l]
            wb = wb if l == 0 else wb[:, perms[l - 1]]
            m = wa @ wb.T + np.outer(ba, bb)
            wa2 = ws_a[l + 1][0]
            wb2 = ws_b[l + 1][0]
            if l + 1 < n_hidden:
                wb2 = wb2[perms[l + 1]]
            m += wa2.T @ wb2
            _, cols = linear_sum_assignment(-m)
            perms[l] = cols
        prev, obj = obj, objective(perms)
        it += 1
    return perms, obj


def _compiled_memory(fn, *args) -> dict[str, int]:
    """XLA's own accounting of a compiled program: argument, output and temporary bytes
    (the peak working set beyond inputs and outputs is the temporaries)."""
    arrays, static = eqx.partition(args, eqx.is_array)
    compiled = jax.jit(lambda a: fn(*eqx.combine(a, static))).lower(arrays).compile()
    m = compiled.memory_analysis()
    return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes)}


def _peak_memory(widths):
    rows = []
    for w in widths:
        model = gj.nn.MLP([784, w, w, w, 10], jax.nn.relu, key=jax.random.key(0), dtype=jnp.float32)
        gauge = gj.derive_gauge(model)
        v = jax.tree.map(jnp.ones_like, model)
        n = sum(a.size for a in jax.tree.leaves(model))
        rows.append({
            "width": w, "params": int(n), "param_bytes": int(4 * n),
            "projection": _compiled_memory(lambda m, v: gj.horizontal(gauge, m, v, method="structured"), model, v),
            "canonicalize": _compiled_memory(lambda m: gj.canonicalize(gauge, m), model),
        })
    logn = np.log([r["params"] for r in rows])
    result = {"rows": rows, "measure": "XLA memory_analysis of the compiled program: temporaries + outputs",
              "target": "slope <= 1.2 (linear)"}
    for key in ("projection", "canonicalize"):
        total = np.log([r[key]["temp_bytes"] + r[key]["output_bytes"] for r in rows])
        result[f"{key}_slope"] = float(np.polyfit(logn, total, 1)[0])
        result[f"{key}_bytes_per_param_largest"] = (
            (rows[-1][key]["temp_bytes"] + rows[-1][key]["output_bytes"]) / rows[-1]["params"])
    result["met"] = bool(max(result["projection_slope"], result["canonicalize_slope"]) <= 1.2)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/orbits.json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    reps = 3 if args.quick else 10
    width = 128 if args.quick else 512
    key = jax.random.key(0)
    results = {"platform": platform.platform(), "backend": jax.default_backend(), "jax": jax.__version__}

    # 1-2. projection and canonicalization vs a gradient
    sizes = [784, width, width, width, 10]
    k1, k2, k3 = jax.random.split(key, 3)
    model = gj.nn.MLP(sizes, jax.nn.relu, key=k1, dtype=jnp.float32)
    gauge = gj.derive_gauge(model)
    x = jax.random.normal(k2, (256, 784), jnp.float32)
    y = jax.random.normal(k3, (256, 10), jnp.float32)
    loss = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731
    grad = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    _, g = grad(model)
    # project an Adam-like first step sign(grad): not horizontal (projecting the gradient
    # itself would be free, its vertical part being zero)
    g = jax.tree.map(jnp.sign, g)
    c_grad, t_grad = _timeit(grad, model, reps=reps)
    proj_s = eqx.filter_jit(lambda m, v: gj.horizontal(gauge, m, v, method="structured"))
    proj_cg = eqx.filter_jit(lambda m, v: gj.horizontal(gauge, m, v, method="cg"))
    c_s, t_s = _timeit(proj_s, model, g, reps=reps)
    c_cg, t_cg = _timeit(proj_cg, model, g, reps=max(1, reps // 3))
    canon = eqx.filter_jit(lambda m: gj.canonicalize(gauge, m))
    try:
        c_c, t_c = _timeit(canon, model, reps=max(1, reps // 3))
        # and from far along the orbit (log-scales of size ~1, a sampled permutation)
        far = gauge.act(gauge.sample(jax.random.key(7), scale=1.0, dtype=jnp.float32), model)
        _, t_far = _timeit(canon, far, reps=max(1, reps // 3))
        canon_result = {"s": t_c, "over_grad": t_c / t_grad, "compile_s": c_c, "far_s": t_far,
                        "far_residual_before": float(gj.balance_residual(gauge, far)),
                        "far_residual_after": float(gj.balance_residual(gauge, canon(far)[0]))}
    except Exception as e:  # recorded, not hidden: the JSON says what failed
        canon_result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    results["projection"] = {
        "sizes": sizes, "grad_s": t_grad,
        "structured_s": t_s, "structured_over_grad": t_s / t_grad, "structured_target": 0.5,
        "cg_s": t_cg, "cg_over_grad": t_cg / t_grad, "cg_target": 3.0,
        "compile_s": {"grad": c_grad, "structured": c_s, "cg": c_cg},
    }
    results["canonicalize"] = canon_result

    # 3. weight matching vs the scipy reference
    ka, kb = jax.random.split(jax.random.key(1))
    a = gj.nn.MLP(sizes, jax.nn.relu, key=ka, dtype=jnp.float32)
    b = gj.nn.MLP(sizes, jax.nn.relu, key=kb, dtype=jnp.float32)
    ga = gj.derive_gauge(a)
    match = lambda a, b: gj.align(ga, a, b, solver="scipy", balance_first=False, init="identity")  # noqa: E731
    c_m, t_m = _timeit(match, a, b, reps=max(1, reps // 3))
    aligned, _ = match(a, b)
    obj_gj = float(sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(aligned))))
    np_a = [(np.asarray(l.weight, np.float64), np.asarray(l.bias, np.float64)) for l in a.layers]
    np_b = [(np.asarray(l.weight, np.float64), np.asarray(l.bias, np.float64)) for l in b.layers]
    t_ref = []
    for _ in range(max(1, reps // 3)):
        t0 = time.perf_counter()
        _, obj_ref = _reference_weight_matching(np_a, np_b)
        t_ref.append(time.perf_counter() - t0)
    t_ref = statistics.median(t_ref)
    results["weight_matching"] = {
        "sizes": sizes, "gaugejax_s": t_m, "reference_s": t_ref, "ratio": t_m / t_ref, "target": 1.5,
        "objective_gaugejax": obj_gj, "objective_reference": obj_ref, "compile_s": c_m,
    }
    # 4. peak memory vs parameter count
    results["peak_memory"] = _peak_memory([128, 256] if args.quick else [256, 512, 1024, 2048])
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
