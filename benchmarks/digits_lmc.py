"""Linear mode connectivity on digits, before and after alignment.

For each hidden width, pairs of MLPs 61-w-w-10 (ReLU) are trained from different seeds
(different initialisation and minibatch order; Adam, lr 1e-3, batch 128). Along the
straight path (1-t) a + t b we measure the test cross-entropy and test error, and their
barrier max_t [f(t) - ((1-t) f(0) + t f(1))], for three versions of b:

- naive: b as trained;
- aligned: `gaugejax.align(gauge, a, b)` (balance both, then weight matching over the
  permutation part of the `PositiveMonomial` sites);
- aligned + REPAIR: each interpolated network renormalised with `gaugejax.repair`
  (pre-activation statistics on the training set).

    python benchmarks/digits_lmc.py [--quick] [--out benchmarks/results/digits_lmc.json] [--plot DIR]
"""

from __future__ import annotations

import argparse
import functools
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gaugejax as gj


try:
    from . import _digits as D
except ImportError:  # run as a script
    import _digits as D


def _path(loss_fn, a, b, num):
    out = gj.loss_barrier(loss_fn, a, b, num=num)
    return np.asarray(out["loss"]), float(out["barrier"])


def _barrier(curve, ts):
    return float(np.max(curve - ((1 - ts) * curve[0] + ts * curve[-1])))


def run_pair(data: D.Data, width: int, depth: int, seed: int, steps: int, num: int, lr: float = 1e-3) -> dict:
    """Train two models (seeds 2*seed, 2*seed+1), then measure the three paths."""
    hidden = [width] * depth
    models = []
    tx = _adam(lr)
    t0 = time.perf_counter()
    for s in (2 * seed, 2 * seed + 1):
        k_init, k_data = jax.random.split(jax.random.key(s))
        m = D.make_mlp(data.n_features, hidden, k_init)
        m, _, _ = D.train(m, tx, data, steps, key=k_data)
        models.append(m)
    train_s = time.perf_counter() - t0
    a, b = models
    gauge = gj.derive_gauge(a)

    test_ce = jax.jit(lambda m: D.ce(m, data.xte, data.yte))
    test_err = jax.jit(lambda m: D.error(m, data.xte, data.yte))

    t0 = time.perf_counter()
    b_al, _ = gj.align(gauge, a, b)
    jax.block_until_ready(b_al)
    align_s = time.perf_counter() - t0
    # alignment is a gauge move: the function of b must not change
    func_change = float(jnp.max(jnp.abs(b_al(data.xte) - b(data.xte))) / jnp.max(jnp.abs(b(data.xte))))

    res = {"width": width, "depth": depth, "seed": seed, "train_seconds": train_s, "align_seconds": align_s,
           "align_relative_function_change": func_change,
           "endpoint_test_error": [float(test_err(a)), float(test_err(b))],
           "endpoint_test_ce": [float(test_ce(a)), float(test_ce(b))],
           "param_distance": {"naive": float(_dist(a, b)), "aligned": float(_dist(a, b_al))}}
    ts = np.linspace(0.0, 1.0, num)
    curves = {}
    for name, bb in (("naive", b), ("aligned", b_al)):
        ce_curve, ce_bar = _path(test_ce, a, bb, num)
        err_curve, err_bar = _path(test_err, a, bb, num)
        curves[name] = {"ce": ce_curve, "error": err_curve}
        res[name] = {"barrier_ce": ce_bar, "barrier_error": err_bar, "mid_error": float(err_curve[num // 2])}

    t0 = time.perf_counter()
    rep = _repair_fn(data)
    ce_r, err_r = [], []
    for t in ts:
        if t in (0.0, 1.0):  # the endpoints are left as they are
            m = gj.interpolate(a, b_al, t)
        else:
            m = rep(gauge, gj.interpolate(a, b_al, t), a, b_al, jnp.asarray(t, jnp.float32))
        ce_r.append(float(test_ce(m)))
        err_r.append(float(test_err(m)))
    ce_r, err_r = np.asarray(ce_r), np.asarray(err_r)
    res["repair_seconds"] = time.perf_counter() - t0
    curves["repair"] = {"ce": ce_r, "error": err_r}
    res["repair"] = {"barrier_ce": _barrier(ce_r, ts), "barrier_error": _barrier(err_r, ts),
                     "mid_error": float(err_r[num // 2])}
    res["curves"] = {k: {kk: vv.tolist() for kk, vv in v.items()} for k, v in curves.items()}
    return res


@functools.cache
def _adam(lr):
    """One optimizer object per learning rate: the jitted training loop is compiled once."""
    return optax.adam(lr)


_REPAIR = {}


def _repair_fn(data):
    """`gaugejax.repair` with pre-activations on the training set, jitted once per dataset."""
    if id(data) not in _REPAIR:
        pre = lambda m: D.preactivations(m, data.xtr)  # noqa: E731
        _REPAIR[id(data)] = eqx.filter_jit(lambda gauge, m, a, b, t: gj.repair(gauge, m, a, b, pre, t=t))
    return _REPAIR[id(data)]


def _dist(a, b):
    return jnp.sqrt(sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


METHODS = ("naive", "aligned", "repair")


def summarize(runs: list[dict]) -> dict:
    out = {}
    for w in sorted({r["width"] for r in runs}):
        rs = [r for r in runs if r["width"] == w]
        out[str(w)] = {
            m: {k: D.stats([r[m][k] for r in rs]) for k in ("barrier_ce", "barrier_error", "mid_error")}
            for m in METHODS
        }
        out[str(w)]["endpoint_test_error"] = D.stats([e for r in rs for e in r["endpoint_test_error"]])
        out[str(w)]["align_seconds"] = D.stats([r["align_seconds"] for r in rs])
        out[str(w)]["max_align_function_change"] = max(r["align_relative_function_change"] for r in rs)
    return out


def run(widths=(32, 64, 128, 256, 512), depth: int = 2, seeds: int = 5, steps: int = 1500, num: int = 21,
        log=print) -> dict:
    data = D.load()
    t0 = time.perf_counter()
    runs = []
    for w in widths:
        for s in range(seeds):
            r = run_pair(data, w, depth, s, steps, num)
            runs.append(r)
            log(f"width {w:4d} seed {s}: barrier(ce) naive {r['naive']['barrier_ce']:.3f} aligned "
                f"{r['aligned']['barrier_ce']:.3f} repair {r['repair']['barrier_ce']:.3f} | "
                f"barrier(err) {r['naive']['barrier_error']:.3f} / {r['aligned']['barrier_error']:.3f} / "
                f"{r['repair']['barrier_error']:.3f}  (align {r['align_seconds']:.1f}s)")
    return {"config": {"widths": list(widths), "depth": depth, "seeds": seeds, "steps": steps, "num": num,
                       "optimizer": "adam(1e-3)", "batch_size": 128, "n_features": data.n_features},
            "runs": runs, "summary": summarize(runs), "seconds": time.perf_counter() - t0}


def plot(out: dict, directory) -> None:
    import pathlib

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = out["config"]["widths"]
    summ = out["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in ((axes[0], "barrier_ce", "test cross-entropy barrier"),
                           (axes[1], "barrier_error", "test error barrier")):
        for m in METHODS:
            mean = [summ[str(w)][m][key]["mean"] for w in widths]
            std = [summ[str(w)][m][key]["std"] for w in widths]
            ax.errorbar(widths, mean, yerr=std, marker="o", capsize=3, label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden width")
        ax.set_title(title)
        ax.axhline(0.0, color="k", lw=0.5)
        ax.legend()
    w = widths[-1]
    rs = [r for r in out["runs"] if r["width"] == w]
    ts = np.linspace(0, 1, out["config"]["num"])
    for m in METHODS:
        curve = np.mean([r["curves"][m]["error"] for r in rs], 0)
        axes[2].plot(ts, curve, marker=".", label=m)
    axes[2].set_xlabel("t")
    axes[2].set_title(f"test error along the path (width {w}, mean of {len(rs)})")
    axes[2].legend()
    fig.tight_layout()
    pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
    fig.savefig(pathlib.Path(directory) / "digits_lmc.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="widths 16 and 64, 2 seeds, 300 steps")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=str(D.RESULTS))
    args = p.parse_args()
    if args.quick:
        out = run(widths=(16, 64), seeds=2, steps=300, num=11)
    else:
        out = run()
    path = D.write(out, args.out or D.RESULTS / ("digits_lmc_quick.json" if args.quick else "digits_lmc.json"))
    print(f"{'width':>6} " + " ".join(f"{m + ' ' + k:>24}" for m in METHODS for k in ("ce", "err")))
    for w, s in out["summary"].items():
        print(f"{w:>6} " + " ".join(f"{s[m][k]['mean']:13.3f}+-{s[m][k]['std']:<9.3f}"
                                    for m in METHODS for k in ("barrier_ce", "barrier_error")))
    if args.plot and not args.quick:
        plot(out, args.plot)
    print(f"wrote {path} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
