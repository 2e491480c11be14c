"""Neural-ODE gauge benchmark: a gauge-transformed solve against the original.

One run, JSON output. Measured (each after a warm-up call; compile time reported apart):

1. parametric NODE transformed in parameter space (the grid connection law, through
   `gaugejax.node_gauge`, G near the identity): wall time and vector-field evaluations
   (NFE, from diffrax's stats) vs the original. Target: <= 1.1x time, NFE within 10%.
2. function-space action with a linear G(t) (`gaugejax.transform_node` + `LinearDiffeo`):
   wall time vs the original. Target: <= 3x.
3. a vmapped sweep over 64 sampled diffeomorphisms vs a Python loop of jitted solves.
   Target: the vmapped sweep >= 5x faster.

    python benchmarks/node.py [--out benchmarks/results/node.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

import gaugejax as gj


def _timeit(fn, *args, reps: int) -> tuple[float, float]:
    """(first call incl. compile, median of `reps` warm calls), seconds."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


@eqx.filter_jit
def _solve_batch(node, xs):
    """The batch as one ODE system (shared steps; one G(t) per step for the whole batch)."""
    term = diffrax.ODETerm(lambda t, y, args: node.field(t, y))
    sol = diffrax.diffeqsolve(term, node.solver, 0.0, node.T, node.dt0, xs,
                              stepsize_controller=node.stepsize_controller, max_steps=node.max_steps)
    return sol.ys[-1], sol.stats["num_steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/node.json")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and samples")
    args = parser.parse_args()
    reps = 3 if args.quick else 10
    n_diffeo = 16 if args.quick else 64
    dtype = jnp.float32
    dim, width, nodes, batch = 8, 32, 9, 64
    k = jax.random.split(jax.random.key(0), 6)
    field = gj.nn.ParametricField.random(dim, width, num_nodes=nodes, key=k[0], dtype=dtype)
    node = gj.nn.NeuralODE(field, 1.0, stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6))
    xs = jax.random.normal(k[1], (batch, dim), dtype)
    stages = gj.nn._node._stages(node.solver)
    results: dict = {"config": {"dim": dim, "width": width, "grid_nodes": nodes, "batch": batch, "dtype": "float32",
                                "solver": "Tsit5", "rtol": 1e-6, "reps": reps},
                     "env": {"jax": jax.__version__, "device": str(jax.devices()[0]), "cpus": os.cpu_count(),
                             "loadavg_before": os.getloadavg(), "python": platform.python_version()}}

    base_first, base_t = _timeit(_solve_batch, node, xs, reps=reps)
    _, base_steps = _solve_batch(node, xs)
    base_nfe = float(jnp.mean(base_steps)) * stages

    # 1. parameter space (grid connection law), G near the identity
    gauge = gj.node_gauge(node)
    moved = gauge.act(gauge.sample(k[2], scale=0.05, dtype=dtype), node)
    p_first, p_t = _timeit(_solve_batch, moved, xs, reps=reps)
    _, p_steps = _solve_batch(moved, xs)
    p_nfe = float(jnp.mean(p_steps)) * stages
    results["parameter_space"] = {
        "time_ratio": p_t / base_t, "nfe_ratio": p_nfe / base_nfe, "base_s": base_t, "moved_s": p_t,
        "base_nfe": base_nfe, "moved_nfe": p_nfe, "compile_s": p_first - p_t,
        "target": "time <= 1.1x, NFE within 10%",
        "met": bool(p_t / base_t <= 1.1 and abs(p_nfe / base_nfe - 1) <= 0.1),
    }

    # 2. function space, linear G(t)
    path = gj.SmoothLiePath.random(dim, scale=0.3, key=k[3], dtype=dtype)
    fs = gj.transform_node(node, gj.LinearDiffeo(path), boundary="fixed")
    f_first, f_t = _timeit(_solve_batch, fs, xs, reps=reps)
    _, f_steps = _solve_batch(fs, xs)
    f_nfe = float(jnp.mean(f_steps)) * stages
    results["function_space_linear"] = {
        "time_ratio": f_t / base_t, "nfe_ratio": f_nfe / base_nfe, "moved_s": f_t, "moved_nfe": f_nfe,
        "compile_s": f_first - f_t, "target": "time <= 3x", "met": bool(f_t / base_t <= 3.0),
    }

    # 3. a sweep over sampled diffeomorphisms: vmapped vs a Python loop of jitted solves
    coeffs = 0.3 * jax.random.normal(k[4], (n_diffeo, 2, dim, dim), dtype) / dim**0.5
    x0 = xs[0]

    def one(c):
        new = gj.transform_node(node, gj.LinearDiffeo(gj.SmoothLiePath(c)), boundary="unchecked")
        return new.flow(x0)

    sweep = eqx.filter_jit(jax.vmap(one))
    single = eqx.filter_jit(one)

    def loop(cs):
        return [single(c) for c in cs]

    v_first, v_t = _timeit(sweep, coeffs, reps=reps)
    l_first, l_t = _timeit(loop, coeffs, reps=max(1, reps // 3))
    results["sweep"] = {
        "num_diffeomorphisms": n_diffeo, "vmapped_s": v_t, "loop_s": l_t, "speedup": l_t / v_t,
        "compile_vmapped_s": v_first - v_t, "target": "vmapped >= 5x faster", "met": bool(l_t / v_t >= 5.0),
    }
    results["env"]["loadavg_after"] = os.getloadavg()

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"{'measurement':<38} {'ratio':>8}  target")
    print(f"{'parameter space: time':<38} {results['parameter_space']['time_ratio']:8.3f}  <= 1.1")
    print(f"{'parameter space: NFE':<38} {results['parameter_space']['nfe_ratio']:8.3f}  within 10%")
    print(f"{'function space, linear G(t): time':<38} {results['function_space_linear']['time_ratio']:8.3f}  <= 3")
    print(f"{'sweep of ' + str(n_diffeo) + ': loop / vmapped':<38} {results['sweep']['speedup']:8.2f}  >= 5")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
