"""optax transforms (issue 5, item 6): every transform through jax.jit(tx.init) and
jax.jit(tx.update); optimizer state transported exactly through gauge moves."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import rel

import gaugejax as gj
import gaugejax.optim as gjo


@pytest.fixture(autouse=True)
def _standard_promotion():
    """optax's Adam computes `b1 ** count` with an int32 count: it needs standard dtype
    promotion (conftest sets strict), an optax matter, not ours."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def _problem(key, act=jax.nn.relu, sizes=(3, 6, 5, 2)):
    k = jax.random.split(key, 3)
    model = gj.nn.MLP(sizes, act, key=k[0], dtype=jnp.float64)
    x = jax.random.normal(k[1], (32, sizes[0]), jnp.float64)
    y = jax.random.normal(k[2], (32, sizes[-1]), jnp.float64)
    loss = lambda m, batch=None: jnp.mean((m(x) - y) ** 2)  # noqa: E731
    return model, gj.derive_gauge(model), loss


def _train(tx, model, loss, n, **extra):
    init = jax.jit(tx.init)
    update = jax.jit(tx.update)
    state = init(model)
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    for _ in range(n):
        u, state = update(grad(model), state, model, **extra)
        model = optax.apply_updates(model, u)
    return model, state


def test_project_horizontal_keeps_charges(getkey):
    model, gauge, loss = _problem(getkey())
    mon = gj.NoetherMonitor(gauge, model)
    plain, _ = _train(optax.adam(1e-2), model, loss, 20)
    proj, _ = _train(optax.chain(optax.adam(1e-2), gjo.project_horizontal(gauge)), model, loss, 20)
    # Adam's updates move the charges at first order; projected ones only at second order
    assert float(mon.max_drift(proj)) < 0.05 * float(mon.max_drift(plain))
    assert float(loss(proj)) < float(loss(model))


def test_canonicalize_every_balances_and_keeps_function(getkey):
    model, gauge, loss = _problem(getkey())
    tx = gjo.canonicalize_every(3, gauge, optax.sgd(1e-2, momentum=0.9))
    out, state = _train(tx, model, loss, 6)
    assert int(state.count) == 6
    assert float(gj.balance_residual(gauge, out)) <= 1e-8
    assert float(gj.balance_residual(gauge, model)) > 1e-3


@pytest.mark.parametrize("inner", ["sgd-momentum", "adam"])
def test_state_transport_is_exact_for_monomial_moves(inner, getkey):
    """Train A: canonicalize (a monomial move: scales + permutation) with state transport.
    Train B: the same run in the original coordinates, mapped afterwards. Equal."""
    model, gauge, loss = _problem(getkey())
    make = (lambda: optax.sgd(1e-2, momentum=0.9)) if inner == "sgd-momentum" else (lambda: optax.adam(1e-2))
    # B: plain training for 2 steps, then 3 more
    tx = make()
    b2, sb = _train(tx, model, loss, 2)
    # A: 2 steps, move by g (canonicalize), transport the state, 3 more steps
    canon, g = gj.canonicalize(gauge, b2)
    sa = gjo.transport_state(gauge, g, sb, b2)
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    a, b = canon, b2
    for _ in range(3):
        ua, sa = jax.jit(tx.update)(grad(a), sa, a)
        a = optax.apply_updates(a, ua)
        ub, sb = jax.jit(tx.update)(grad(b), sb, b)
        b = optax.apply_updates(b, ub)
    if inner == "adam":
        # Adam is not equivariant under rescalings (its step is scale-free), so compare the
        # transported moments instead: they are the moments of the moved run exactly
        ga = grad(canon)
        gb = grad(b2)
        pulled = gjo.transport_state(gauge, g, (optax.ScaleByAdamState(jnp.zeros((), jnp.int32), gb, jax.tree.map(jnp.square, gb)),), b2)[0]
        assert rel(pulled.mu, ga) <= 1e-12
        assert rel(pulled.nu, jax.tree.map(jnp.square, ga)) <= 1e-12
        # permutation + sign moves (orthogonal monomials): Adam is equivariant, runs agree
        model2, gauge2, loss2 = _problem(getkey(), jnp.tanh)
        tx2 = optax.adam(1e-2)
        b2, sb = _train(tx2, model2, loss2, 2)
        h = gauge2.sample(getkey(), dtype=jnp.float64)
        a = gauge2.act(h, b2)
        sa = gjo.transport_state(gauge2, h, sb, b2)
        grad2 = eqx.filter_jit(eqx.filter_grad(loss2))
        b = b2
        for _ in range(3):
            ua, sa = jax.jit(tx2.update)(grad2(a), sa, a)
            a = optax.apply_updates(a, ua)
            ub, sb = jax.jit(tx2.update)(grad2(b), sb, b)
            b = optax.apply_updates(b, ub)
        assert rel(a, gauge2.act(h, b)) <= 1e-10
        # negative control: without transport the runs differ
        a_bad = gauge2.act(h, b2)
        s_bad = _train(tx2, model2, loss2, 2)[1]
        ua, _ = jax.jit(tx2.update)(grad2(a_bad), s_bad, a_bad)
        assert rel(optax.apply_updates(a_bad, ua), gauge2.act(h, optax.apply_updates(b2, jax.jit(tx2.update)(grad2(b2), s_bad, b2)[0]))) > 1e-6
    else:
        # SGD with momentum is covariant for the metric only under orthogonal moves; for
        # rescalings compare the transported momentum with the gradient statistics
        gb = grad(b2)
        pulled = gjo.transport_state(gauge, g, (optax.TraceState(gb), optax.EmptyState()), b2)[0]
        assert rel(pulled.trace, grad(canon)) <= 1e-12


def test_teleport_every_runs_under_jit(getkey):
    model, gauge, loss = _problem(getkey())
    tx = optax.chain(optax.clip(10.0), gjo.teleport_every(2, gauge, loss, optax.adam(1e-2), steps=3, lr=0.1))
    out, state = _train(tx, model, loss, 4, batch=None)
    assert bool(jnp.isfinite(loss(out)))
    assert float(loss(out)) < float(loss(model))


def test_errors(getkey):
    model, gauge, loss = _problem(getkey(), jax.nn.gelu)
    with pytest.raises(ValueError, match="continuous part"):
        gjo.project_horizontal(gauge)
    model, gauge, loss = _problem(getkey())
    with pytest.raises(ValueError, match="every_k"):
        gjo.canonicalize_every(0, gauge)
    tx = gjo.project_horizontal(gauge)
    with pytest.raises(ValueError, match="needs `params`"):
        tx.update(model, tx.init(model))


@pytest.mark.parametrize("params_as", ["model", "filtered"])
def test_transforms_on_an_equinox_mlp(params_as, getkey):
    # eqx.nn.MLP keeps its activation as a leaf: optax sees the filtered model (None there),
    # and the updates have None there too
    k = jax.random.split(getkey(), 3)
    model = eqx.nn.MLP(3, 2, 5, 2, activation=jax.nn.relu, key=k[0])
    model = jax.tree.map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model)
    x = jax.random.normal(k[1], (32, 3), jnp.float64)
    y = jax.random.normal(k[2], (32, 2), jnp.float64)
    loss = lambda m, batch=None: jnp.mean((jax.vmap(m)(x) - y) ** 2)  # noqa: E731
    gauge = gj.derive_gauge(model)
    transforms = [gjo.canonicalize_every(2, gauge, optax.adam(1e-2)),
                  optax.chain(optax.adam(1e-2), gjo.project_horizontal(gauge))]
    if params_as == "model":  # the loss calls the model: teleport needs it whole
        transforms.append(gjo.teleport_every(2, gauge, loss, optax.adam(1e-2), steps=2, lr=0.05))
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    for tx in transforms:
        m = model
        state = tx.init(eqx.filter(m, eqx.is_array))
        update = eqx.filter_jit(tx.update)
        for _ in range(4):
            p = m if params_as == "model" else eqx.filter(m, eqx.is_array)
            u, state = update(grad(m), state, p)
            m = eqx.apply_updates(m, u)
        assert float(loss(m)) < float(loss(model))
    # the canonicalising transform ends at a balanced point with the same function
    tx = gjo.canonicalize_every(1, gauge)
    p = model if params_as == "model" else eqx.filter(model, eqx.is_array)
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, eqx.filter(model, eqx.is_array)), tx.init(p), p)
    moved = eqx.apply_updates(model, u)
    assert rel(jax.vmap(moved)(x), jax.vmap(model)(x)) <= 1e-10
    assert float(gj.balance_residual(gauge, moved)) <= 1e-8
