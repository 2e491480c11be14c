"""Symmetry teleportation on digits, following Zhao et al. (NeurIPS 2022).

An MLP 61-64-64-10 (ReLU, float32; the gauge is a positive rescaling per hidden neuron,
orbit dimension 128) is trained on the cross-entropy with minibatches of 128. Teleporting
(`gaugejax.teleport`: `ascent_steps` steps of fixed length `ascent_lr` in the Lie algebra,
ascending the squared gradient norm of the current minibatch) is done a few times early in
training, before the optimizer step of the steps in `schedule`. Variants per optimizer:

- `none`: no teleport;
- `transport`: teleport and carry the optimizer state through the move
  (`gaugejax.optim.transport_state`, exact for diagonal scales);
- `reset`: teleport and re-create the optimizer state, as Zhao et al. do.

Plain SGD has no state (transport = reset), so it only gets `none` and `transport`. Every
teleport is checked: the full training loss before and after (it must be unchanged to
float32 rounding) and the squared gradient norm on the minibatch before and after.
Wall-clock is measured per step with `block_until_ready` after compilation (the teleport's
compile time excluded, its run time included).

    python benchmarks/digits_teleport.py [--quick] [--out ...] [--plot DIR]
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
import gaugejax.optim as gjo


try:
    from . import _digits as D
except ImportError:  # run as a script
    import _digits as D


OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.05),
    "momentum": lambda: optax.sgd(0.01, momentum=0.9),
    "adam": lambda: optax.adam(1e-3),
}


def variants(opt: str) -> tuple[str, ...]:
    return ("none", "transport") if opt == "sgd" else ("none", "transport", "reset")


def _grad_sq(m, x, y):
    g = jax.grad(D.ce)(m, x, y)
    return sum(jnp.sum(v**2) for v in jax.tree.leaves(g))


@functools.cache
def make_fns(opt: str, hidden: tuple, n_features: int, ascent_steps: int, ascent_lr: float):
    """Jitted step / teleport / transport for one optimizer and architecture (cached, so each
    is compiled once for all seeds and variants)."""
    gauge = gj.derive_gauge(D.make_mlp(n_features, list(hidden), jax.random.key(0)))
    tx = OPTIMIZERS[opt]()

    @eqx.filter_jit
    def step(m, s, x, y):
        grads = jax.grad(D.ce)(m, x, y)
        u, s = tx.update(grads, s, m)
        return optax.apply_updates(m, u), s

    @eqx.filter_jit
    def tele(m, x, y):
        moved, g = gj.teleport(gauge, m, lambda q: D.ce(q, x, y), steps=ascent_steps, lr=ascent_lr)
        return moved, g

    transport = eqx.filter_jit(lambda g, s, m: gjo.transport_state(gauge, g, s, m))
    return tx, step, tele, transport


_train_ce = eqx.filter_jit(lambda m, x, y: D.ce(m, x, y))
_grad_sq_jit = eqx.filter_jit(_grad_sq)


def run_one(data: D.Data, opt: str, variant: str, seed: int, steps: int, schedule, ascent_steps: int,
            ascent_lr: float, hidden=(64, 64), record_every: int = 10) -> dict:
    k_init, k_data = jax.random.split(jax.random.key(seed))
    model = D.make_mlp(data.n_features, list(hidden), k_init)
    tx, step, tele, transport = make_fns(opt, tuple(hidden), data.n_features, ascent_steps, ascent_lr)
    state = tx.init(model)
    idx = np.asarray(D.batches(k_data, data.xtr.shape[0], 128, steps))
    train_ce = lambda m: _train_ce(m, data.xtr, data.ytr)  # noqa: E731
    grad_sq = _grad_sq_jit
    # compile outside the clock
    jax.block_until_ready(step(model, state, data.xtr[idx[0]], data.ytr[idx[0]]))
    if variant != "none":
        mv, g = tele(model, data.xtr[idx[0]], data.ytr[idx[0]])
        jax.block_until_ready(transport(g, state, mv))
    train_ce(model)

    losses, times, rec_steps, teleports = [float(train_ce(model))], [0.0], [0], []
    clock = 0.0
    for i in range(steps):
        xb, yb = data.xtr[idx[i]], data.ytr[idx[i]]
        t0 = time.perf_counter()
        if variant != "none" and i in schedule:
            before = float(train_ce(model))
            gb = float(grad_sq(model, xb, yb))
            t1 = time.perf_counter()
            moved, g = tele(model, xb, yb)
            state = transport(g, state, moved) if variant == "transport" else tx.init(moved)
            jax.block_until_ready((moved, state))
            tele_s = time.perf_counter() - t1
            after = float(train_ce(moved))
            teleports.append({"step": i, "loss_before": before, "loss_after": after,
                              "rel_loss_change": abs(after - before) / abs(before),
                              "grad_sq_before": gb, "grad_sq_after": float(grad_sq(moved, xb, yb)),
                              "seconds": tele_s})
            model = moved
            clock += tele_s
            t0 = time.perf_counter()
        model, state = step(model, state, xb, yb)
        jax.block_until_ready(model)
        clock += time.perf_counter() - t0
        if (i + 1) % record_every == 0:
            losses.append(float(train_ce(model)))
            times.append(clock)
            rec_steps.append(i + 1)
    te_ce, te_err = D.evaluate(model, data.xte, data.yte)
    return {"optimizer": opt, "variant": variant, "seed": seed, "steps": rec_steps, "train_ce": losses,
            "seconds": times, "teleports": teleports, "test_ce": float(te_ce), "test_error": float(te_err)}


def summarize(runs: list[dict], checkpoints) -> dict:
    out = {}
    for opt in OPTIMIZERS:
        for var in variants(opt):
            rs = [r for r in runs if r["optimizer"] == opt and r["variant"] == var]
            if not rs:
                continue
            steps = rs[0]["steps"]
            curves = np.asarray([r["train_ce"] for r in rs])
            entry = {f"train_ce@{c}": D.stats(curves[:, steps.index(c)]) for c in checkpoints if c in steps}
            entry["test_error"] = D.stats([r["test_error"] for r in rs])
            entry["wall_seconds"] = D.stats([r["seconds"][-1] for r in rs])
            tps = [t for r in rs for t in r["teleports"]]
            if tps:
                entry["teleports"] = len(tps)
                entry["max_rel_loss_change"] = max(t["rel_loss_change"] for t in tps)
                entry["grad_sq_ratio"] = D.stats([t["grad_sq_after"] / t["grad_sq_before"] for t in tps])
                entry["teleport_seconds"] = D.stats([t["seconds"] for t in tps])
            entry["mean_curve"] = curves.mean(0).tolist()
            entry["mean_seconds"] = np.mean([r["seconds"] for r in rs], 0).tolist()
            out[f"{opt}/{var}"] = entry
    return out


def run(seeds: int = 5, steps: int = 600, schedule=(0, 20, 40, 60, 80), ascent_steps: int = 10,
        ascent_lr: float = 0.2, hidden=(64, 64), log=print) -> dict:
    data = D.load()
    t0 = time.perf_counter()
    runs = []
    for opt in OPTIMIZERS:
        for var in variants(opt):
            for s in range(seeds):
                r = run_one(data, opt, var, s, steps, set(schedule), ascent_steps, ascent_lr, hidden)
                runs.append(r)
            rs = runs[-seeds:]
            log(f"{opt:>8}/{var:<9} train CE @{steps}: {np.mean([r['train_ce'][-1] for r in rs]):.4f} "
                f"+- {np.std([r['train_ce'][-1] for r in rs]):.4f}  wall {np.mean([r['seconds'][-1] for r in rs]):.2f}s")
    checkpoints = sorted({c for c in (50, 100, 200, steps // 2, steps) if c % 10 == 0})
    return {"config": {"seeds": seeds, "steps": steps, "schedule": list(schedule), "ascent_steps": ascent_steps,
                       "ascent_lr": ascent_lr, "hidden": list(hidden), "batch_size": 128,
                       "optimizers": {"sgd": "sgd(0.05)", "momentum": "sgd(0.01, momentum=0.9)",
                                      "adam": "adam(1e-3)"}},
            "runs": runs, "summary": summarize(runs, checkpoints), "seconds": time.perf_counter() - t0}


def plot(out: dict, directory) -> None:
    import pathlib

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    steps = out["runs"][0]["steps"]
    for j, opt in enumerate(OPTIMIZERS):
        for var in variants(opt):
            e = out["summary"][f"{opt}/{var}"]
            axes[0, j].plot(steps, e["mean_curve"], label=var)
            axes[1, j].plot(e["mean_seconds"], e["mean_curve"], label=var)
        for ax in axes[:, j]:
            ax.set_yscale("log")
            ax.legend()
            ax.set_title(opt)
        for t in out["config"]["schedule"]:
            axes[0, j].axvline(t, color="0.8", lw=0.5)
        axes[0, j].set_xlabel("step")
        axes[1, j].set_xlabel("wall-clock (s)")
        axes[0, j].set_ylabel("train cross-entropy")
        axes[1, j].set_ylabel("train cross-entropy")
    fig.tight_layout()
    pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
    fig.savefig(pathlib.Path(directory) / "digits_teleport.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 seeds, 120 steps, hidden 32-32")
    p.add_argument("--ascent-lr", type=float, default=0.2)
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=str(D.RESULTS))
    args = p.parse_args()
    if args.quick:
        out = run(seeds=2, steps=120, hidden=(32, 32), ascent_lr=args.ascent_lr)
    else:
        out = run(ascent_lr=args.ascent_lr)
    path = D.write(out, args.out or D.RESULTS / ("digits_teleport_quick.json" if args.quick else "digits_teleport.json"))
    ck = [k for k in next(iter(out["summary"].values())) if k.startswith("train_ce@")]
    print(f"{'run':>18} " + " ".join(f"{k:>18}" for k in ck) + f" {'wall s':>8} {'|dL|/L max':>11} {'|g|^2 ratio':>12}")
    for name, e in out["summary"].items():
        print(f"{name:>18} " + " ".join(f"{e[k]['mean']:9.4f}+-{e[k]['std']:<7.4f}" for k in ck)
              + f" {e['wall_seconds']['mean']:8.2f} {e.get('max_rel_loss_change', float('nan')):11.2e}"
              + f" {e['grad_sq_ratio']['mean'] if 'grad_sq_ratio' in e else float('nan'):12.2f}")
    if args.plot and not args.quick:
        plot(out, args.plot)
    print(f"wrote {path} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
