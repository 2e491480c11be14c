"""Adam, weight decay and the Hessian on the orbit, on digits.

Three experiments (MLPs with ReLU: one `PositiveMonomial` site per hidden layer):

1. **Adam with gauge transforms** (61-64-64-10, float32, batch 128, 5 seeds): plain
   `adam(1e-3)`, `chain(adam, gaugejax.optim.project_horizontal(gauge))` and
   `gaugejax.optim.canonicalize_every(K, gauge, adam)` (periodic balancing with the Adam
   state transported). Recorded every `record` steps: train / test cross-entropy, test
   error, the drift of the Noether charges from their initial values
   (`NoetherMonitor.max_drift`: max |mu - mu_0| / |theta_0|^2), the permutation-invariant
   size |mu|_2 / |theta|^2, `balance_residual`, and the wall-clock.
2. **Weight decay as gauge fixing** (MATH.md S19; same net, 5 seeds): SGD (lr 0.05) with
   `add_decayed_weights(lambda)` and AdamW (lr 1e-3, decoupled decay lambda), lambda in
   {0, 1e-2, 1e-1}. Decay alone contracts the moment map by (1 - lr lambda)^2 per step; the
   loss gradient conserves it (gradient flow, S4) and SGD's discreteness moves it at
   O(lr^2). We record |mu|_2 and `balance_residual` and fit the decay rate of |mu|_2.
3. **Hessian zero modes** (S20; 61-8-8-10, float64, full training set): train to a critical
   point (Adam, then L-BFGS), the dense Hessian with `jax.hessian`, its eigenvalues, the count
   below the largest gap among the smallest ones vs `gauge.orbit_dim`, and how much of the
   vertical space (`gauge.vertical`) lies in that near-null space. Losses: mean squared
   error to one-hot targets (a true minimum exists), the same with an L2 penalty (S20: weight
   decay lifts the zero modes), and cross-entropy.

    python benchmarks/digits_adam.py [--quick] [--out ...] [--plot DIR]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.flatten_util


jax.config.update("jax_enable_x64", True)  # for the Hessian; the training runs are float32

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import gaugejax as gj  # noqa: E402
import gaugejax.optim as gjo  # noqa: E402


try:
    from . import _digits as D
except ImportError:  # run as a script
    import _digits as D


def _sq(tree):
    return sum(jnp.sum(x.astype(jnp.float64) ** 2) for x in jax.tree.leaves(tree))


@eqx.filter_jit
def _charges(gauge, model, mu0, scale0):
    mu = gj.noether_charges(gauge, model)
    drift = jnp.max(jnp.stack([jnp.max(jnp.abs(mu[k] - mu0[k])) for k in mu])) / scale0
    size = jnp.sqrt(sum(jnp.sum(v.astype(jnp.float64) ** 2) for v in mu.values())) / _sq(model)
    return drift, size, gj.balance_residual(gauge, model)


# ---------------------------------------------------------------------------------------
# 1. Adam, Adam + horizontal projection, Adam + periodic canonicalisation
# ---------------------------------------------------------------------------------------
def adam_variants(gauge, every: int) -> dict:
    return {
        "adam": optax.adam(1e-3),
        "adam+project_horizontal": optax.chain(optax.adam(1e-3), gjo.project_horizontal(gauge)),
        f"adam+canonicalize_every({every})": gjo.canonicalize_every(every, gauge, optax.adam(1e-3)),
    }


def run_adam(data, seeds: int, steps: int, record: int, hidden=(64, 64), every: int = 100, log=print) -> dict:
    template = D.make_mlp(data.n_features, list(hidden), jax.random.key(0))
    gauge = gj.derive_gauge(template)
    txs = adam_variants(gauge, every)
    runs = []
    for name, tx in txs.items():
        for seed in range(seeds):
            k_init, k_data = jax.random.split(jax.random.key(seed))
            model = D.make_mlp(data.n_features, list(hidden), k_init)
            mu0, scale0 = gj.noether_charges(gauge, model), _sq(model)
            state = tx.init(model)
            rec = {k: [] for k in ("step", "train_ce", "test_ce", "test_error", "drift", "mu_size",
                                   "balance_residual", "seconds")}
            clock = 0.0
            for i in range(0, steps + 1, record):
                if i > 0:
                    if seed == 0 and i == record:  # compile outside the clock
                        jax.block_until_ready(D.train(model, tx, data, record, key=k_data, state=state))
                    t0 = time.perf_counter()
                    model, state, _ = D.train(model, tx, data, record, key=jax.random.fold_in(k_data, i),
                                              state=state)
                    jax.block_until_ready(model)
                    clock += time.perf_counter() - t0
                tr = D.evaluate(model, data.xtr, data.ytr)[0]
                te_ce, te_err = D.evaluate(model, data.xte, data.yte)
                drift, size, res = _charges(gauge, model, mu0, scale0)
                for k, v in zip(rec, (i, tr, te_ce, te_err, drift, size, res, clock)):
                    rec[k].append(float(v))
            runs.append({"variant": name, "seed": seed, **rec})
        rs = runs[-seeds:]
        log(f"{name:>28}: train CE {np.mean([r['train_ce'][-1] for r in rs]):.4f}, test err "
            f"{np.mean([r['test_error'][-1] for r in rs]):.4f}, drift {np.mean([r['drift'][-1] for r in rs]):.2e}, "
            f"balance residual {np.mean([r['balance_residual'][-1] for r in rs]):.2e}, "
            f"{np.mean([r['seconds'][-1] for r in rs]):.1f} s")
    summary = {}
    for name in txs:
        rs = [r for r in runs if r["variant"] == name]
        summary[name] = {k: D.stats([r[k][-1] for r in rs])
                         for k in ("train_ce", "test_ce", "test_error", "drift", "mu_size", "balance_residual",
                                   "seconds")}
        summary[name]["max_drift_over_run"] = D.stats([max(r["drift"]) for r in rs])
        summary[name]["mean_curve"] = {k: np.mean([r[k] for r in rs], 0).tolist()
                                       for k in ("train_ce", "test_ce", "drift", "mu_size", "balance_residual")}
    return {"config": {"hidden": list(hidden), "seeds": seeds, "steps": steps, "record": record, "every": every,
                       "orbit_dim": gauge.orbit_dim},
            "runs": runs, "summary": summary}


# ---------------------------------------------------------------------------------------
# 2. weight decay as gauge fixing (S19)
# ---------------------------------------------------------------------------------------
@eqx.filter_jit
def _active_residual(model, frac: float = 0.01):
    """The balance residual restricted to the neurons that carry weight: for hidden neuron i
    of layer l, |in_i - out_i| / (in_i + out_i) with in_i = |W_l[i,:]|^2 + b_l[i]^2 and
    out_i = |W_{l+1}[:,i]|^2, maximised over neurons with in_i + out_i >= `frac` times the
    layer's mean. Returns (residual, number of neurons left out). A unit that receives no
    gradient (dead on the data) only feels the decay, which shrinks in_i and out_i by the
    same factor: its relative residual stays constant while the unit goes to 0, and the
    plain `balance_residual` (a max over all units) is then stuck."""
    res, left_out = [], 0
    for a, b in zip(model.layers[:-1], model.layers[1:]):
        n_in = jnp.sum(a.weight**2, 1) + a.bias**2
        n_out = jnp.sum(b.weight**2, 0)
        tot = n_in + n_out
        keep = tot >= frac * jnp.mean(tot)
        res.append(jnp.max(jnp.where(keep, jnp.abs(n_in - n_out) / tot, 0.0)))
        left_out = left_out + jnp.sum(~keep)
    return jnp.max(jnp.stack(res)), left_out


def run_decay(data, seeds: int, steps: int, record: int, lambdas=None, hidden=(64, 64), log=print) -> dict:
    template = D.make_mlp(data.n_features, list(hidden), jax.random.key(0))
    gauge = gj.derive_gauge(template)
    # AdamW's decoupled decay shrinks theta by (1 - lr lambda) per step with lr = 1e-3: it needs
    # larger lambdas than SGD's coupled decay (lr = 0.05) for a visible effect
    lambdas = lambdas or {"sgd": (0.0, 1e-2, 1e-1), "adamw": (0.0, 1e-1, 1.0)}
    opts = {"sgd": (0.05, lambda lam: optax.chain(optax.add_decayed_weights(lam), optax.sgd(0.05))),
            "adamw": (1e-3, lambda lam: optax.adamw(1e-3, weight_decay=lam))}
    runs = []
    for opt, (lr, make) in opts.items():
        for lam in lambdas[opt]:
            tx = make(lam)
            for seed in range(seeds):
                k_init, k_data = jax.random.split(jax.random.key(seed))
                model = D.make_mlp(data.n_features, list(hidden), k_init)
                mu0, scale0 = gj.noether_charges(gauge, model), _sq(model)
                state = tx.init(model)
                rec = {k: [] for k in ("step", "mu_size", "mu_norm", "balance_residual", "active_residual",
                                       "left_out", "train_ce", "test_error")}
                for i in range(0, steps + 1, record):
                    if i > 0:
                        model, state, _ = D.train(model, tx, data, record, key=jax.random.fold_in(k_data, i),
                                                  state=state)
                    mu = gj.noether_charges(gauge, model)
                    mu_norm = float(jnp.sqrt(sum(jnp.sum(v**2) for v in mu.values())))
                    _, size, res = _charges(gauge, model, mu0, scale0)
                    tr = D.evaluate(model, data.xtr, data.ytr)[0]
                    te = D.evaluate(model, data.xte, data.yte)[1]
                    act_res, left = _active_residual(model)
                    for k, v in zip(rec, (i, size, mu_norm, res, act_res, left, tr, te)):
                        rec[k].append(float(v))
                mu_n = np.asarray(rec["mu_norm"])
                # fitted decay rate per step of |mu| (log-linear least squares over the first sixth
                # of the run, before SGD's O(lr^2) floor is reached) vs decay alone
                first = np.asarray(rec["step"]) <= max(steps // 6, 2 * record)
                rate = float(-np.polyfit(np.asarray(rec["step"])[first], np.log(mu_n[first]), 1)[0])
                runs.append({"optimizer": opt, "lambda": lam, "seed": seed, **rec, "fitted_rate": rate,
                             "predicted_rate": float(-2 * np.log1p(-lr * lam))})
            rs = runs[-seeds:]
            log(f"{opt:>6} lambda {lam:<5}: |mu| {np.mean([r['mu_norm'][0] for r in rs]):.3e} -> "
                f"{np.mean([r['mu_norm'][-1] for r in rs]):.3e}, balance residual -> "
                f"{np.mean([r['balance_residual'][-1] for r in rs]):.2e} (active units "
                f"{np.mean([r['active_residual'][-1] for r in rs]):.2e}, {np.mean([r['left_out'][-1] for r in rs]):.1f} left out), rate {np.mean([r['fitted_rate'] for r in rs]):.2e}"
                f" (decay alone {rs[0]['predicted_rate']:.2e}), train CE {np.mean([r['train_ce'][-1] for r in rs]):.3f}")
    summary = {}
    for opt in opts:
        for lam in lambdas[opt]:
            rs = [r for r in runs if r["optimizer"] == opt and r["lambda"] == lam]
            summary[f"{opt}/{lam}"] = {
                "mu_norm_initial": D.stats([r["mu_norm"][0] for r in rs]),
                "mu_norm_final": D.stats([r["mu_norm"][-1] for r in rs]),
                "balance_residual_initial": D.stats([r["balance_residual"][0] for r in rs]),
                "balance_residual_final": D.stats([r["balance_residual"][-1] for r in rs]),
                "active_residual_initial": D.stats([r["active_residual"][0] for r in rs]),
                "active_residual_final": D.stats([r["active_residual"][-1] for r in rs]),
                "left_out_final": D.stats([r["left_out"][-1] for r in rs]),
                "mu_size_final": D.stats([r["mu_size"][-1] for r in rs]),
                "fitted_rate": D.stats([r["fitted_rate"] for r in rs]),
                "predicted_rate": rs[0]["predicted_rate"],
                "train_ce_final": D.stats([r["train_ce"][-1] for r in rs]),
                "test_error_final": D.stats([r["test_error"][-1] for r in rs]),
                "mean_curve": {k: np.mean([r[k] for r in rs], 0).tolist()
                               for k in ("mu_norm", "balance_residual", "active_residual")},
            }
    return {"config": {"hidden": list(hidden), "seeds": seeds, "steps": steps, "record": record,
                       "lambdas": {k: list(v) for k, v in lambdas.items()}, "sgd_lr": 0.05, "adamw_lr": 1e-3},
            "runs": runs, "summary": summary}


# ---------------------------------------------------------------------------------------
# 3. Hessian zero modes (S20)
# ---------------------------------------------------------------------------------------
def _mse(model, x, y):
    return 0.5 * jnp.mean(jnp.sum((model(x) - jax.nn.one_hot(y, 10, dtype=x.dtype)) ** 2, -1))


#: name: (activation, loss, L2 coefficient). The identity activation makes every hidden site
#: GL(n) (orbit dimension n^2 per site) and the loss smooth, so a critical point can be reached
#: to rounding; leaky ReLU gives positive rescalings but a loss with kinks (no exact critical
#: point is reached by a gradient method).
CASES = {
    "linear/mse": (gj.identity, _mse, 0.0),
    "linear/mse+l2": (gj.identity, _mse, 1e-3),
    "leaky_relu/mse": (jax.nn.leaky_relu, _mse, 0.0),
}


def _critical_point(f, v0, adam_steps: int, lbfgs_steps: int, newton_steps: int):
    """Adam, then scipy's L-BFGS-B, then Newton steps on the non-null part of the Hessian
    (pseudo-inverse of |H|, backtracking): a critical point to rounding where f is smooth."""
    import scipy.optimize as so

    opt = optax.adam(1e-2)

    @jax.jit
    def adam_run(v):
        def body(c, _):
            v, s = c
            u, s = opt.update(jax.grad(f)(v), s, v)
            return (v + u, s), None

        return jax.lax.scan(body, (v, opt.init(v)), None, length=adam_steps)[0][0]

    vg = jax.jit(jax.value_and_grad(f))
    hess = jax.jit(jax.hessian(f))

    def fun(v):
        val, g = vg(jnp.asarray(v))
        return float(val), np.asarray(g, np.float64)

    v = np.asarray(adam_run(v0))
    r = so.minimize(fun, v, jac=True, method="L-BFGS-B",
                    options={"maxiter": lbfgs_steps, "maxfun": 2 * lbfgs_steps, "gtol": 1e-13, "ftol": 0.0,
                             "maxcor": 50})
    v = r.x
    for _ in range(newton_steps):
        val, g = fun(v)
        if np.linalg.norm(g) < 1e-12:
            break
        w, q = np.linalg.eigh(np.asarray(hess(jnp.asarray(v))))
        inv = np.where(np.abs(w) > 1e-10 * np.abs(w).max(), 1 / np.abs(w), 0.0)
        step = -q @ (inv * (q.T @ g))
        t = 1.0
        while t > 1e-6 and fun(v + t * step)[0] > val:
            t /= 2
        if fun(v + t * step)[0] > val:
            break
        v = v + t * step
    return jnp.asarray(v), hess


def _flat_loss(model, loss, lam, x, y):
    flat, unravel = jax.flatten_util.ravel_pytree(model)

    def f(v):
        return loss(unravel(v), x, y) + lam * jnp.sum(v**2)

    return flat, unravel, f


def run_hessian(data64, hidden=(8, 8), seed: int = 0, adam_steps: int = 2000, lbfgs_steps: int = 3000,
                newton_steps: int = 10, cases=None, log=print) -> dict:
    out = {}
    for name in cases or CASES:
        act, loss, lam = CASES[name]
        t0 = time.perf_counter()
        model = D.make_mlp(data64.n_features, list(hidden), jax.random.key(seed), dtype=jnp.float64, activation=act)
        gauge = gj.derive_gauge(model)
        flat, unravel, f = _flat_loss(model, loss, lam, data64.xtr, data64.ytr)
        v, hess = _critical_point(f, flat, adam_steps, lbfgs_steps, newton_steps)
        f_val, grad = jax.jit(jax.value_and_grad(f))(v)
        gnorm = float(jnp.linalg.norm(grad))
        h = hess(v)
        evals, evecs = np.linalg.eigh(np.asarray(h))
        order = np.argsort(np.abs(evals))
        a = np.abs(evals[order])
        k_max = min(len(a) - 1, 3 * gauge.orbit_dim + 20)
        ratios = a[1:k_max + 1] / np.maximum(a[:k_max], 1e-300)
        count = int(np.argmax(ratios)) + 1  # eigenvalues below the largest gap
        # vertical space at the optimum: the columns of V
        m = unravel(v)
        zeros = gauge.algebra_zeros(jnp.float64)
        z_flat, z_unravel = jax.flatten_util.ravel_pytree(zeros)
        vmat = np.asarray(jax.jit(jax.jacfwd(
            lambda xi: jax.flatten_util.ravel_pytree(gauge.vertical(m, z_unravel(xi)))[0]))(z_flat))
        null = evecs[:, order[:count]]
        inside = float(np.linalg.norm(null @ (null.T @ vmat)) / np.linalg.norm(vmat))
        # Rayleigh quotients of the normalised vertical vectors
        vn = vmat / np.linalg.norm(vmat, axis=0, keepdims=True)
        rayleigh = np.abs(np.einsum("ij,ik,kj->j", vn, np.asarray(h), vn))
        # dead hidden units (never active on the training set) add zero modes of their own
        pre = eqx.filter_jit(D.preactivations)(m, data64.xtr)
        dead = int(sum(int(np.sum(np.all(np.asarray(z) <= 0, axis=0))) for z in pre.values()))
        res = {"case": name, "l2": lam, "n_params": int(flat.size), "orbit_dim": gauge.orbit_dim,
               "orbit_rank": int(np.linalg.matrix_rank(vmat)), "grad_norm": gnorm, "final_loss": float(f_val),
               "train_error": float(D.evaluate(m, data64.xtr, data64.ytr)[1]), "dead_units": dead,
               "count_below_gap": count, "gap_ratio": float(ratios[count - 1]),
               "eig_below_gap": float(a[count - 1]), "eig_above_gap": float(a[count]),
               "largest_eig": float(np.max(np.abs(evals))),
               "count_below_1e-8_rel": int(np.sum(a < 1e-8 * a[-1])),
               "vertical_in_null_space": inside, "vertical_rayleigh_max": float(rayleigh.max()),
               "vertical_rayleigh_median": float(np.median(rayleigh)),
               "smallest_abs_eigs": a[: k_max + 1].tolist(), "seconds": time.perf_counter() - t0}
        out[name] = res
        log(f"hessian {name:>18}: |grad| {gnorm:.1e}, {count} eigenvalues below a gap of {res['gap_ratio']:.1e} "
            f"({res['eig_below_gap']:.1e} | {res['eig_above_gap']:.1e}, max {res['largest_eig']:.1e}); orbit_dim "
            f"{gauge.orbit_dim}, dead units {dead}; vertical space in that null space: {inside:.6f}")
    return out


def run(quick: bool = False, log=print) -> dict:
    t0 = time.perf_counter()
    data = D.load(jnp.float32)
    data64 = D.load(jnp.float64)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts with float params
        if quick:
            # (hidden 16-16 with every=50 hits a NaN from canonicalize_every under jit for seed 1,
            # see /work/integration/issue5-item7.md; 32-32 does not)
            adam = run_adam(data, seeds=2, steps=100, record=50, hidden=(32, 32), every=50, log=log)
            decay = run_decay(data, seeds=2, steps=200, record=100, hidden=(16, 16), log=log)
            hess = run_hessian(data64, hidden=(3, 3), adam_steps=300, lbfgs_steps=300, newton_steps=3, log=log)
        else:
            adam = run_adam(data, seeds=5, steps=1500, record=50, log=log)
            decay = run_decay(data, seeds=5, steps=3000, record=100, log=log)
            hess = run_hessian(data64, log=log)
    return {"adam": adam, "weight_decay": decay, "hessian": hess, "seconds": time.perf_counter() - t0}


def plot(out: dict, directory) -> None:
    import pathlib

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    ad = out["adam"]
    steps = ad["runs"][0]["step"]
    for name, e in ad["summary"].items():
        axes[0, 0].plot(steps, e["mean_curve"]["train_ce"], label=name)
        axes[0, 1].plot(steps, e["mean_curve"]["drift"], label=name)
        axes[0, 2].plot(steps, e["mean_curve"]["balance_residual"], label=name)
    axes[0, 0].set_title("Adam: train cross-entropy")
    axes[0, 1].set_title("Noether charge drift |mu - mu0|_max / |theta0|^2")
    axes[0, 2].set_title("balance residual")
    for ax in axes[0]:
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    wd = out["weight_decay"]
    wsteps = wd["runs"][0]["step"]
    for name, e in wd["summary"].items():
        ls = "-" if name.startswith("sgd") else "--"
        axes[1, 0].plot(wsteps, e["mean_curve"]["mu_norm"], ls, label=name)
        axes[1, 1].plot(wsteps, e["mean_curve"]["active_residual"], ls, label=name)
    axes[1, 0].set_title("weight decay: |mu|_2")
    axes[1, 1].set_title("weight decay: balance residual (units with weight)")
    for ax in axes[1, :2]:
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for name, e in out["hessian"].items():
        axes[1, 2].semilogy(np.arange(1, len(e["smallest_abs_eigs"]) + 1), e["smallest_abs_eigs"], ".",
                            label=f"{name} (count {e['count_below_gap']}, orbit dim {e['orbit_dim']})")
    e0 = next(iter(out["hessian"].values()))
    axes[1, 2].axvline(e0["orbit_dim"] + 0.5, color="k", lw=0.5)
    axes[1, 2].set_title("smallest |Hessian eigenvalues| (S20)")
    axes[1, 2].legend(fontsize=7)
    fig.tight_layout()
    pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
    fig.savefig(pathlib.Path(directory) / "digits_adam.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small nets, 2 seeds, few steps")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=str(D.RESULTS))
    args = p.parse_args()
    out = run(quick=args.quick)
    path = D.write(out, args.out or D.RESULTS / ("digits_adam_quick.json" if args.quick else "digits_adam.json"))
    if args.plot and not args.quick:
        plot(out, args.plot)
    print(f"wrote {path} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
