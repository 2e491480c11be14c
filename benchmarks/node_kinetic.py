"""Regularisation as gauge fixing for neural ODEs (MATH.md S19).

A gauge-invariant loss cannot choose a time parametrisation: (v, T) and its reparametrisations
tau give the same model. The kinetic energy  K = int_0^T mean ||v(x(t), t)||^2 dt  is not invariant;
for a fixed path length it is minimised by constant speed (Cauchy-Schwarz), so adding lambda K
should fix the time-reparametrisation gauge to constant speed, and make an adaptive solver's job
easier (fewer vector-field evaluations).

Task: scikit-learn's two moons (2-D), a parametric NODE v = A(t)x + W2(t) tanh(W1(t)x + b(t)) + c(t)
on R^2 (5 grid nodes over [0, 1]) and a linear logistic readout. Trained with Adam, fixed-step Tsit5
(20 steps), with lambda = 0 and lambda = LAMBDA, over 5 seeds. Measured after training on held-out points:

- accuracy;
- speed non-uniformity: per trajectory, std_t ||v|| / mean_t ||v|| over 41 times, averaged (0 = constant
  speed, the gauge-fixed parametrisation);
- NFE of an adaptive solve (Tsit5, rtol = atol = 1e-5; diffrax's num_steps x 6 stages) of the test batch
  as one system.

    python benchmarks/node_kinetic.py [--steps 400] [--out benchmarks/results/node_kinetic.json] [--plot DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import make_moons

import gaugejax as gj


LAMBDA = 0.1
T = 1.0


class Model(eqx.Module):
    field: gj.nn.ParametricField
    readout: eqx.nn.Linear


def _rk4(field, x, n_steps=20, save=False):
    term = diffrax.ODETerm(lambda t, y, args: field(t, y))
    saveat = diffrax.SaveAt(ts=jnp.linspace(0.0, T, n_steps + 1)) if save else diffrax.SaveAt(t1=True)
    sol = diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, T, T / n_steps, x, saveat=saveat)
    return sol.ys


def _loss(model, x, y, lam):
    ys = _rk4(model.field, x, save=True)  # (21, B, 2)
    logits = jax.vmap(model.readout)(ys[-1])[:, 0]
    ce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))
    ts = jnp.linspace(0.0, T, ys.shape[0])
    v = jax.vmap(model.field)(ts, ys)  # (21, B, 2)
    ke = jnp.trapezoid(jnp.mean(jnp.sum(v**2, -1), -1), ts)
    return ce + lam * ke, (ce, ke)


def _speed_cv(field, x):
    ys = _rk4(field, x, n_steps=40, save=True)
    ts = jnp.linspace(0.0, T, ys.shape[0])
    speed = jnp.linalg.norm(jax.vmap(field)(ts, ys), axis=-1)  # (41, B)
    return jnp.mean(jnp.std(speed, 0) / jnp.mean(speed, 0))


def _nfe(field, x):
    term = diffrax.ODETerm(lambda t, y, args: field(t, y))
    sol = diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, T, None, x,
                              stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-5), max_steps=100000)
    return sol.stats["num_steps"] * 6


_OPT = optax.adam(1e-2)


@eqx.filter_jit
def _step(model, state, x, y, lam):
    """One Adam step (compiled once: lambda is an array argument)."""
    (loss, aux), grads = eqx.filter_value_and_grad(_loss, has_aux=True)(model, x, y, lam)
    updates, state = _OPT.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), state, loss, aux


def run(seed: int, lam: float, steps: int) -> dict:
    key = jax.random.key(seed)
    kf, kr = jax.random.split(key)
    field = gj.nn.ParametricField.random(2, 16, T=T, num_nodes=5, activation=jnp.tanh, scale=0.5, key=kf)
    model = Model(field, eqx.nn.Linear(2, 1, key=kr))
    xtr, ytr = make_moons(1024, noise=0.1, random_state=seed)
    xte, yte = make_moons(512, noise=0.1, random_state=1000 + seed)
    xtr, xte = jnp.asarray(xtr, jnp.float32), jnp.asarray(xte, jnp.float32)
    ytr, yte = jnp.asarray(ytr, jnp.float32), jnp.asarray(yte, jnp.float32)
    state = _OPT.init(eqx.filter(model, eqx.is_inexact_array))
    lam_arr = jnp.asarray(lam, jnp.float32)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(xtr.shape[0], 256, replace=False)
        model, state, loss, (ce, ke) = _step(model, state, xtr[idx], ytr[idx], lam_arr)
    logits = jax.vmap(model.readout)(_rk4(model.field, xte)[-1])[:, 0]
    acc = float(jnp.mean((logits > 0) == (yte > 0.5)))
    _, (ce, ke) = eqx.filter_jit(_loss)(model, xte, yte, lam_arr)
    return {"seed": seed, "lambda": lam, "accuracy": acc, "test_ce": float(ce), "kinetic_energy": float(ke),
            "speed_cv": float(eqx.filter_jit(_speed_cv)(model.field, xte)),
            "nfe_adaptive": int(eqx.filter_jit(_nfe)(model.field, xte))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/node_kinetic.json")
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    t0 = time.perf_counter()
    runs = [run(s, lam, args.steps) for s in range(args.seeds) for lam in (0.0, LAMBDA)]
    summary = {}
    for lam in (0.0, LAMBDA):
        rs = [r for r in runs if r["lambda"] == lam]
        summary[str(lam)] = {k: {"mean": float(np.mean([r[k] for r in rs])), "std": float(np.std([r[k] for r in rs]))}
                             for k in ("accuracy", "kinetic_energy", "speed_cv", "nfe_adaptive")}
    out = {"runs": runs, "summary": summary, "config": {"steps": args.steps, "seeds": args.seeds, "lambda": LAMBDA},
           "seconds": time.perf_counter() - t0}
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"{'lambda':>7} {'accuracy':>14} {'kinetic E':>14} {'speed CV':>14} {'NFE (Tsit5)':>16}")
    for lam, s in summary.items():
        print(f"{lam:>7} " + " ".join(f"{s[k]['mean']:9.3f}+-{s[k]['std']:<5.3f}"
                                      for k in ("accuracy", "kinetic_energy", "speed_cv", "nfe_adaptive")))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        for ax, key in zip(axes, ("speed_cv", "nfe_adaptive")):
            for i, lam in enumerate((0.0, LAMBDA)):
                vals = [r[key] for r in runs if r["lambda"] == lam]
                ax.scatter([i] * len(vals), vals)
            ax.set_xticks([0, 1], ["lambda = 0", f"lambda = {LAMBDA}"])
            ax.set_title(key)
        fig.tight_layout()
        pathlib.Path(args.plot).mkdir(parents=True, exist_ok=True)
        fig.savefig(pathlib.Path(args.plot) / "node_kinetic.png", dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
