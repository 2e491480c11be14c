"""Teleportation and Noether charges."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CASE_IDS, CASES, rel

import gaugejax as gj


def _problem(key, sizes=(3, 6, 5, 2)):
    k = jax.random.split(key, 3)
    model = gj.nn.MLP(sizes, jax.nn.leaky_relu, key=k[0], dtype=jnp.float64)
    x = jax.random.normal(k[1], (32, sizes[0]), jnp.float64)
    y = jax.random.normal(k[2], (32, sizes[-1]), jnp.float64)
    return model, gj.derive_gauge(model), (lambda m: jnp.mean((m(x) - y) ** 2))


def _gn2(loss, m):
    g = eqx.filter_grad(loss)(m)
    return float(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))


def test_teleport_increases_grad_norm_keeps_loss(getkey):
    model, gauge, loss = _problem(getkey())
    new, g = gj.teleport(gauge, model, loss, steps=10, lr=0.2)
    assert abs(float(loss(new)) - float(loss(model))) <= 1e-12 * float(loss(model))
    assert _gn2(loss, new) > 1.1 * _gn2(loss, model)
    assert rel(gauge.act(g, model), new) <= 1e-12
    assert rel(new, model) > 1e-2  # it moved
    # called again with the same loss (another step length, NumPy steps): no new compilation
    from gaugejax import _teleport

    before = _teleport._teleport._cached._cache_size()
    again, _ = gj.teleport(gauge, model, loss, steps=np.int64(10), lr=0.3)
    assert _teleport._teleport._cached._cache_size() == before
    assert _gn2(loss, again) > _gn2(loss, model)


def test_teleport_user_objective_and_general_gauge(getkey):
    params, gauge, fn, x = CASES[CASE_IDS.index("attention")].build(getkey(), jnp.float64)
    loss = lambda p: jnp.mean(fn(p, x) ** 2)  # noqa: E731
    obj = lambda p: -sum(jnp.sum(v**2) for v in jax.tree.leaves(p))  # noqa: E731 (min-norm)
    new, _ = gj.teleport(gauge, params, objective=obj, steps=5, lr=0.05)
    assert float(obj(new)) > float(obj(params))
    assert abs(float(loss(new)) - float(loss(params))) <= 1e-10 * float(loss(params))


def test_teleport_errors(getkey):
    model, gauge, loss = _problem(getkey())
    with pytest.raises(ValueError, match="real scalar"):
        gj.teleport(gauge, model, objective=lambda m: m.layers[0].weight)
    with pytest.raises(ValueError, match="loss_fn"):
        gj.teleport(gauge, model)
    params, g2, _, _ = CASES[CASE_IDS.index("mlp-gelu")].build(getkey(), jnp.float64)
    with pytest.raises(ValueError, match="continuous part"):
        gj.teleport(g2, params, lambda p: jnp.zeros((), jnp.float64))


def _charges_flat(gauge, m):
    return jnp.concatenate([v.ravel() for v in gj.noether_charges(gauge, m).values()])


def test_charge_is_in_minus_out(getkey):
    model, gauge, _ = _problem(getkey())
    mu = gj.noether_charges(gauge, model)
    w1, b1, w2 = model.layers[0].weight, model.layers[0].bias, model.layers[1].weight
    np.testing.assert_allclose(mu["h1"], jnp.sum(w1**2, 1) + b1**2 - jnp.sum(w2**2, 0), rtol=1e-12)


def test_conserved_under_gradient_flow_rate(getkey):
    """GD on an invariant loss: the drift of the charges over a fixed time T is O(lr)
    (O(lr^2) per step, T/lr steps): log-log slope ~ 1; weight decay and Adam move them in
    the predicted way."""
    model, gauge, loss = _problem(getkey())
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    mon = gj.NoetherMonitor(gauge, model)

    @eqx.filter_jit
    def run(m, lr, n):
        def body(_, m):
            return jax.tree.map(lambda p, g: p - lr * g, m, grad(m))
        return jax.lax.fori_loop(0, n, body, m)

    T = 0.4
    drifts = []
    lrs = [0.02, 0.01, 0.005]
    for lr in lrs:
        end = run(model, jnp.asarray(lr, jnp.float64), int(round(T / lr)))
        drifts.append(float(mon.max_drift(end)))
    slope = np.polyfit(np.log(lrs), np.log(drifts), 1)[0]
    assert 0.8 <= slope <= 1.2, (drifts, slope)
    # negative control: the parameters did move, and by much more than the charges
    assert rel(end, model) > 20 * drifts[-1]

    # one step is exactly 2 V^T delta + mu(delta): plain GD (first term zero), weight decay,
    # and Adam (not horizontal: first-order change)
    mu0 = _charges_flat(gauge, model)
    g = grad(model)
    for delta in (
        jax.tree.map(lambda v: -0.1 * v, g),
        jax.tree.map(lambda p: -0.05 * p, model),
        jax.tree.map(lambda v: -0.01 * jnp.sign(v), g),  # Adam's first step
    ):
        new = jax.tree.map(lambda p, d: p + d, model, delta)
        pred = jnp.concatenate([v.ravel() for v in gj.charge_change(gauge, model, delta).values()])
        np.testing.assert_allclose(_charges_flat(gauge, new) - mu0, pred, rtol=1e-9, atol=1e-12)
    # weight decay contracts the charges by (1 - lr lambda)^2
    wd = jax.tree.map(lambda p: 0.95 * p, model)
    np.testing.assert_allclose(_charges_flat(gauge, wd), 0.95**2 * mu0, rtol=1e-12)
    # the GD step's first-order term vanishes, Adam's does not
    adj_gd = gj.vertical_adjoint(gauge, model, g)
    adj_adam = gj.vertical_adjoint(gauge, model, jax.tree.map(jnp.sign, g))
    assert float(jnp.max(jnp.abs(adj_gd["h1"]))) <= 1e-12 * float(jnp.max(jnp.abs(adj_adam["h1"])))


def test_gl_charge_and_orthogonal_zero(getkey):
    params, gauge, _, _ = CASES[CASE_IDS.index("rmsnorm-rotation")].build(getkey(), jnp.float64)
    assert float(jnp.max(jnp.abs(gj.noether_charges(gauge, params)["r"]))) <= 1e-12
    k1, k2 = jax.random.split(getkey())
    p = {"W1": jax.random.normal(k1, (3, 5), jnp.float64), "W2": jax.random.normal(k2, (4, 3), jnp.float64)}
    gauge = gj.Gauge({"h": gj.GL(3)}, [gj.Produce("W1", 0, "h"), gj.Consume("W2", 1, "h")], p)
    np.testing.assert_allclose(gj.noether_charges(gauge, p)["h"], p["W1"] @ p["W1"].T - p["W2"].T @ p["W2"], rtol=1e-12)


@pytest.mark.parametrize("case", ["mlp-linear", "attention", "rmsnorm-rotation"])
def test_charge_change_is_exact_for_matrix_sites(case, getkey):
    # V_theta^T delta is not symmetric for GL / O(n): the change needs both cross terms
    params, gauge, _, _ = CASES[CASE_IDS.index(case)].build(getkey(), jnp.float64)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(getkey(), len(leaves))
    delta = jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    new = jax.tree.map(lambda a, b: a + b, params, delta)
    pred = gj.charge_change(gauge, params, delta)
    before, after = gj.noether_charges(gauge, params), gj.noether_charges(gauge, new)
    for site, change in pred.items():
        # a translation's charge (the leaf itself) is linear: it was given 2 delta + leaf
        np.testing.assert_allclose(change, after[site] - before[site], rtol=1e-10, atol=1e-12)


def test_charge_change_precision_and_leaf_names(getkey):
    """A bfloat16 step of float32 parameters is exact in float32, and so is the change
    (the products were taken in bfloat16: 1e-3 off); a bad step of an equinox.filter-ed
    model names its own leaf (a non-array field before the layers shifted the names)."""

    class Net(eqx.Module):
        act: Callable
        l1: eqx.nn.Linear
        l2: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.act = jax.nn.relu
            f32 = jnp.float32
            self.l1, self.l2 = eqx.nn.Linear(3, 6, key=k1, dtype=f32), eqx.nn.Linear(6, 2, key=k2, dtype=f32)

    net = Net(getkey())
    gauge = gj.feedforward_gauge(net, jax.nn.relu, weights=["l1.weight", "l2.weight"], layout="out_in")
    params = eqx.filter(net, eqx.is_array)
    step = jax.tree.map(lambda x: (0.1 * jax.random.normal(getkey(), x.shape, x.dtype)).astype(jnp.bfloat16), params)
    exact = jax.tree.map(lambda a, d: a + d.astype(a.dtype), params, step)
    change = gj.charge_change(gauge, params, step)["h1"]
    true = gj.noether_charges(gauge, exact)["h1"] - gj.noether_charges(gauge, params)["h1"]
    assert change.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(change - true))) <= 1e-5 * float(jnp.max(jnp.abs(true)))
    bad = eqx.tree_at(lambda t: t.l2.weight, step, jnp.ones((2, 4), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"`delta` leaf 'l2.weight' is shape \(2, 4\)"):
        gj.charge_change(gauge, params, bad)


def test_resnet_charges_conserved_and_exact(getkey):
    """A ResNet's links act affinely on A; the charges are taken at U/h = A + I/h, where the
    action is linear: gradient flow over a fixed time drifts them at O(lr) (read at A, the
    drift stayed at ~5e-3 whatever lr), and one step changes them exactly as charge_change says."""
    k = jax.random.split(getkey(), 4)
    r = gj.nn.ResNet.random(3, 4, 3, key=k[0], dtype=jnp.float64, activation=jax.nn.tanh)
    gauge = gj.resnet_gauge(r)
    x, y = jax.random.normal(k[1], (16, 3), jnp.float64), jax.random.normal(k[2], (16, 3), jnp.float64)
    loss = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    mon = gj.NoetherMonitor(gauge, r)

    @eqx.filter_jit
    def run(m, lr, n):
        return jax.lax.fori_loop(0, n, lambda _, m: jax.tree.map(lambda p, g: p - lr * g, m, grad(m)), m)

    lrs = [0.02, 0.01, 0.005]
    drifts = [float(mon.max_drift(run(r, jnp.asarray(lr, jnp.float64), int(round(0.4 / lr))))) for lr in lrs]
    slope = np.polyfit(np.log(lrs), np.log(drifts), 1)[0]
    assert 0.8 <= slope <= 1.2, (drifts, slope)
    mu = gj.noether_charges(gauge, r)
    assert set(mu) == {"s1", "s2"}
    delta = jax.tree.map(lambda p: 0.1 * jax.random.normal(k[3], p.shape, p.dtype), r)
    pred = gj.charge_change(gauge, r, delta)
    after = gj.noether_charges(gauge, jax.tree.map(jnp.add, r, delta))
    for site in mu:
        np.testing.assert_allclose(pred[site], after[site] - mu[site], rtol=1e-10, atol=1e-10)


def test_charges_of_a_filtered_equinox_model(getkey):
    """optax sees an equinox model `equinox.filter`-ed (None at its activation): charges,
    their change and the monitor take it, and zero parameters give a zero drift, not NaN."""
    model = eqx.nn.MLP(3, 2, 5, 1, activation=jax.nn.relu, key=getkey())
    model = jax.tree.map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model)
    gauge = gj.derive_gauge(model)
    params = eqx.filter(model, eqx.is_inexact_array)
    delta = jax.tree.map(lambda x: 0.1 * x, params)
    mu = gj.noether_charges(gauge, params)
    np.testing.assert_allclose(gj.charge_change(gauge, params, delta)["h1"], (1.1**2 - 1) * mu["h1"], rtol=1e-12)
    zero = jax.tree.map(jnp.zeros_like, params)
    assert float(gj.NoetherMonitor(gauge, zero).max_drift(zero)) == 0.0
