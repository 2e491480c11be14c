"""optax transforms: every transform through jax.jit(tx.init) and
jax.jit(tx.update); optimizer state transported exactly through gauge moves."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
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
    # arguments checked when the transform is built, not at its first update; NumPy
    # integers are integers, bools are not; NaN step lengths and negative tolerances refused
    assert gjo.canonicalize_every(np.int64(2), gauge) is not None
    obj = lambda p, batch=None: jnp.sum(p.layers[0].weight ** 2)  # noqa: E731
    for make, match in [
        (lambda: gjo.canonicalize_every(True, gauge), "canonicalize_every: `every_k` must be a positive integer"),
        (lambda: gjo.project_horizontal(gauge, method="bogus"), "`method` must be"),
        (lambda: gjo.teleport_every(1, gauge, objective=obj, steps=-1), "`steps` must be a non-negative integer"),
        (lambda: gjo.teleport_every(1, gauge, objective=obj, lr=float("nan")), "`lr` must be finite"),
        (lambda: gj.teleport(gauge, model, objective=obj, lr=jnp.ones(3)), "`lr` must be a scalar"),
        (lambda: gj.balance(gauge, model, rtol=-1.0), "`rtol` must be a finite number >= 0"),
        (lambda: gj.balance(gauge, model, max_steps=0), "`max_steps` must be a positive integer"),
        (lambda: gj.horizontal(gauge, model, model, max_steps=0), "`max_steps` must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            make()
    frozen = eqx.tree_at(lambda m: m.layers[0].weight, model, None)
    with pytest.raises(ValueError, match=r"`updates` leaf 'layers\[0\].weight' is None"):
        tx.update(frozen, tx.init(model), model)
    # an equinox.filter-ed model (its activation is a leaf): the orbit tools take it and
    # answer filtered, as horizontal and noether_charges did (they refused it)
    eqx_mlp = eqx.nn.MLP(3, 2, 5, 2, activation=jax.nn.relu, key=getkey())
    eg, filtered = gj.derive_gauge(eqx_mlp), eqx.filter(eqx_mlp, eqx.is_array)
    far = eg.act(eg.sample(getkey(), scale=1.0), eqx_mlp)
    far_f = eqx.filter(far, eqx.is_array)
    for tool in (gj.canonicalize, gj.balance):
        out, g = tool(eg, far_f)
        assert out.activation is None and rel(out, eqx.filter(tool(eg, far)[0], eqx.is_array)) <= 1e-6
    obj = lambda p: jnp.sum(p.layers[0].weight ** 2)  # noqa: E731
    moved, _ = gj.teleport(eg, far_f, objective=obj, steps=2)
    assert moved.activation is None and rel(moved, eqx.filter(gj.teleport(eg, far, objective=obj, steps=2)[0],
                                                             eqx.is_array)) <= 1e-6
    assert float(gj.balance_residual(eg, far_f)) == float(gj.balance_residual(eg, far))
    with pytest.raises(ValueError, match="an `equinox.filter` of it"):
        eg.act(eg.identity(), filtered)


def test_project_horizontal_keeps_update_dtypes(getkey):
    model, gauge, loss = _problem(getkey())
    model = jax.tree.map(lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x, model)
    u = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if eqx.is_inexact_array(x) else None,
                     eqx.filter_grad(loss)(model))
    tx = gjo.project_horizontal(gauge)
    out, _ = jax.jit(tx.update)(u, tx.init(model), model)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(u)):
        assert a.dtype == jnp.bfloat16 and a.shape == b.shape
    # the projection itself runs in float32: horizontal, up to bfloat16's rounding
    want = gj.horizontal(gauge, model, u)
    assert rel(jax.tree.map(lambda x: x.astype(jnp.float32), out), want) <= 1e-2


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


OPTIMIZERS = {
    "amsgrad": lambda: optax.amsgrad(1e-2), "adan": lambda: optax.adan(1e-2), "adadelta": lambda: optax.adadelta(1.0),
    "rprop": lambda: optax.rprop(1e-2), "adabelief": lambda: optax.adabelief(1e-2), "lion": lambda: optax.lion(1e-3),
}


def _moved_run_error(tx, model, gauge, loss, h):
    """Train 2 steps, move by `h` (the state transported), train 3 more, against training
    5 steps and then moving: the relative difference (0 for an equivariant optimizer)."""
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    b, s = _train(tx, model, loss, 2)
    a, sa = gauge.act(h, b), gjo.transport_state(gauge, h, s, b)
    for _ in range(3):
        ua, sa = jax.jit(tx.update)(grad(a), sa, a)
        a = optax.apply_updates(a, ua)
        ub, s = jax.jit(tx.update)(grad(b), s, b)
        b = optax.apply_updates(b, ub)
    return rel(a, gauge.act(h, b))


def test_each_optimizer_state_moves_by_its_own_rule(getkey):
    """Under a signed permutation (J orthogonal and elementwise) every elementwise optimizer
    is equivariant, so moving and transporting its state, then training, equals training,
    then moving. Fields were once classified by name: AMSGrad's nu_max, AdaDelta's and
    Adan's moments and Rprop's step sizes took the first-moment rule (NaN, or errors of 1%
    to 7%). Under a positive rescaling, adamax's infinity norm needs the "abs" rule."""
    model, gauge, loss = _problem(getkey(), jnp.tanh)
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    h = gauge.sample(getkey(), dtype=jnp.float64)
    for name, make in OPTIMIZERS.items():
        assert _moved_run_error(make(), model, gauge, loss, h) <= 1e-10, name
    # adamax: one step's statistics, transported through a rescaling move, against the
    # statistics of the same step taken at the moved point
    model, gauge, loss = _problem(getkey())
    tx = optax.adamax(1e-2)
    _, s = tx.update(grad(model), tx.init(model), model)
    canon, g = gj.canonicalize(gauge, model)
    _, ref = tx.update(grad(canon), tx.init(canon), canon)
    moved = gjo.transport_state(gauge, g, s, model, rules={("ScaleByAdamState", "nu"): "abs"})
    assert rel(moved[0].mu, ref[0].mu) <= 1e-12
    assert rel(moved[0].nu, ref[0].nu) <= 1e-6  # adamax stores |g| + eps (eps = 1e-8)
    assert rel(gjo.transport_state(gauge, g, s, model)[0].nu, ref[0].nu) > 1e-2  # the default is wrong here


def test_rprop_factored_and_integer_statistics(getkey):
    """Rprop's prev_updates (step size x sign(g)) is a displacement: under a positive
    rescaling it took the gradient rule and the next update was 128% off the moved run's.
    adafactor's factored moments have the parameters' structure but other shapes: they
    were left as they were, silently, and are now refused unless "keep" is said. A
    statistic with an entry on an integer leaf of the parameters is transported (it was
    skipped)."""
    model, gauge, loss = _problem(getkey())
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    h = gauge.sample(getkey(), dtype=jnp.float64)
    assert _moved_run_error(optax.rprop(1e-3), model, gauge, loss, h) <= 1e-10
    factored = optax.adafactor(1e-2, min_dim_size_to_factor=4)
    fs = factored.init(model)
    with pytest.raises(ValueError, match=r"FactoredState.v_row has the structure of the parameters but other shapes"):
        gjo.transport_state(gauge, h, fs, model)
    keep = {("FactoredState", f): "keep" for f in ("v_row", "v_col", "v")}
    kept = gjo.transport_state(gauge, h, fs, model, rules=keep)
    assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(fs)))
    with pytest.raises(ValueError, match="only \"keep\" applies"):
        gjo.transport_state(gauge, h, fs, model, rules={**keep, ("FactoredState", "v_row"): "covector"})
    params = {"mlp": model, "index": jnp.arange(3)}
    gi = gj.derive_gauge(model)
    wrapped = gj.Gauge(dict(gi.sites), [dataclasses.replace(c, leaf=c.leaf.replace("layers", "['mlp'].layers", 1))
                                        if c.leaf.startswith("layers") else c for c in gi.couplings], params)
    trace = optax.TraceState(jax.tree.map(jnp.ones_like, params))
    moved = gjo.transport_state(wrapped, h, (trace,), params)[0].trace
    assert rel(moved["mlp"], gjo.transport_state(gauge, h, (optax.TraceState(trace.trace["mlp"]),), model)[0].trace) == 0
    assert rel(moved["mlp"], trace.trace["mlp"]) > 1e-2 and bool(jnp.all(moved["index"] == 1))
    # an update in another dtype on a leaf the gauge does not move passes through (it
    # failed inside lax.cond: the move recomputed it in the parameter's dtype)
    g = grad(model)
    last = len(model.layers) - 1
    low = eqx.tree_at(lambda m: m.layers[last].bias, g, g.layers[last].bias.astype(jnp.float32))
    assert all(f"layers[{last}].bias" not in p.path for p in gauge.plans)
    mover = gjo.canonicalize_every(1, gauge)
    u, _ = mover.update(low, mover.init(model), model)
    assert u.layers[last].bias.dtype == jnp.float32 and bool(jnp.all(u.layers[last].bias == low.layers[last].bias))


def test_transport_refuses_unknown_statistics(getkey):
    model, gauge, _ = _problem(getkey())

    from typing import NamedTuple

    class SmoothState(NamedTuple):
        count: jax.Array
        avg: object

    g = gauge.sample(getkey(), dtype=jnp.float64)
    state = (optax.EmptyState(), SmoothState(jnp.zeros((), jnp.int32), model))
    with pytest.raises(ValueError, match=r"SmoothState.avg has the structure of the parameters"):
        gjo.transport_state(gauge, g, state, model)
    out = gjo.transport_state(gauge, g, state, model, rules={("SmoothState", "avg"): "point"})
    assert rel(out[1].avg, gauge.act(g, model)) <= 1e-14
    with pytest.raises(ValueError, match="rule 'twice'"):
        gjo.transport_state(gauge, g, state, model, rules={("SmoothState", "avg"): "twice"})


def test_moves_with_none_fields_frozen_leaves_and_dtypes(getkey):
    """An equinox MLP without biases (None fields): its optimizer state was left
    untransported, and every moving transform refused its filtered parameters. A frozen
    leaf the gauge moves (update None) or an update in another dtype is refused naming the
    leaf (the first changed the network by 178%, the second failed inside lax.cond).
    teleport_every without an inner optimizer takes the batch= argument."""
    k = jax.random.split(getkey(), 3)
    model = eqx.nn.MLP(3, 2, 5, 2, activation=jax.nn.relu, use_bias=False, use_final_bias=False, key=k[0],
                       dtype=jnp.float64)
    x = jax.random.normal(k[1], (16, 3), jnp.float64)
    loss = lambda m, batch=None: jnp.mean((jax.vmap(m)(x) - 1.0) ** 2)  # noqa: E731
    gauge = gj.derive_gauge(model)
    params = eqx.filter(model, eqx.is_array)
    grads = eqx.filter_grad(loss)(model)
    canon, g = gj.canonicalize(gauge, model)
    moved = gjo.transport_state(gauge, g, (optax.TraceState(grads),), params)
    assert rel(moved[0].trace, eqx.filter_grad(loss)(canon)) <= 1e-12
    tx = gjo.canonicalize_every(1, gauge, optax.sgd(1e-2, momentum=0.9))
    u, _ = tx.update(grads, tx.init(params), params)
    out = eqx.apply_updates(model, u)
    assert float(gj.balance_residual(gauge, out)) <= 1e-8
    frozen = eqx.tree_at(lambda m: m.layers[0].weight, grads, None)
    with pytest.raises(ValueError, match=r"update of leaf 'layers\[0\].weight' is None"):
        gjo.canonicalize_every(1, gauge).update(frozen, tx.init(params), params)
    low = jax.tree.map(lambda v: v.astype(jnp.float32), grads)
    with pytest.raises(ValueError, match=r"update of leaf 'layers\[0\].weight' is float32 but the parameter is float64"):
        gjo.canonicalize_every(1, gauge).update(low, tx.init(params), params)
    tp = gjo.teleport_every(1, gauge, loss, steps=2)
    zero = jax.tree.map(jnp.zeros_like, grads)  # the identity's update: the move alone
    u, _ = tp.update(zero, tp.init(params), model, batch=None)
    assert rel(jax.vmap(eqx.apply_updates(model, u))(x), jax.vmap(model)(x)) <= 1e-10


def test_masked_states_and_filtered_teleports(getkey):
    """optax.masked leaves a MaskedNode where a leaf is left out: its Adam moments were
    passed over, untransported. teleport_every handed a filtered model's placeholders to
    the loss (which recombines the model with equinox.combine)."""
    model, gauge, loss = _problem(getkey())
    grad = eqx.filter_grad(loss)(model)
    mask = jax.tree.map(lambda _: True, model)
    mask = eqx.tree_at(lambda m: m.layers[0].bias, mask, False)
    tx = optax.masked(optax.adam(1e-2), mask)
    _, s = tx.update(grad, tx.init(model), model)
    canon, g = gj.canonicalize(gauge, model)
    moved = gjo.transport_state(gauge, g, s, model)
    _, ref = tx.update(eqx.filter_grad(loss)(canon), tx.init(canon), canon)
    assert rel(moved.inner_state[0].mu.layers[1].weight, ref.inner_state[0].mu.layers[1].weight) <= 1e-12
    assert isinstance(moved.inner_state[0].mu.layers[0].bias, optax.MaskedNode)

    k = jax.random.split(getkey(), 2)
    m = eqx.nn.MLP(3, 2, 6, 2, activation=jax.nn.relu, key=k[0], dtype=jnp.float64)
    x = jax.random.normal(k[1], (16, 3), jnp.float64)
    params, static = eqx.partition(m, eqx.is_inexact_array)
    eloss = lambda p, batch=None: jnp.mean((jax.vmap(eqx.combine(p, static))(x) - 1.0) ** 2)  # noqa: E731
    tp = gjo.teleport_every(1, gj.derive_gauge(m), eloss, steps=2, lr=0.01)
    u, _ = tp.update(jax.tree.map(jnp.zeros_like, params), tp.init(params), params, batch=None)
    assert rel(eloss(eqx.apply_updates(params, u)), eloss(params)) <= 1e-10
