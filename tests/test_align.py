"""Alignment, interpolation, REPAIR: planted gauges recovered exactly in
100 of 100 trials (Git Re-Basin's shapes, hidden widths 30 and 50, and a deeper net)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CASE_IDS, CASES, rel

import gaugejax as gj


def _max_err(a, b):
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]))


PLANTED = [
    pytest.param(jax.nn.relu, (784, 30, 10), "scipy", id="monomial-w30"),
    pytest.param(jnp.tanh, (784, 50, 10), "scipy", id="signed-w50"),
    pytest.param(jax.nn.relu, (784, 50, 10), "scipy", id="monomial-w50", marks=pytest.mark.slow),
    pytest.param(jax.nn.gelu, (784, 30, 10), "scipy", id="perm-w30", marks=pytest.mark.slow),
    pytest.param(jax.nn.relu, (32, 64, 64, 64, 10), "scipy", id="monomial-deep", marks=pytest.mark.slow),
    pytest.param(jnp.tanh, (32, 64, 64, 64, 10), "jax", id="signed-deep-jax", marks=pytest.mark.slow),
    pytest.param(jax.nn.relu, (784, 30, 10), "jax", id="monomial-w30-jax", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("act,sizes,solver", PLANTED)
def test_planted_recovery_100_of_100(act, sizes, solver, getkey):
    model = gj.nn.MLP(sizes, act, key=getkey(), dtype=jnp.float64)
    gauge = gj.derive_gauge(model)
    hs = jax.vmap(lambda k: gauge.sample(k, dtype=jnp.float64))(jax.random.split(getkey(), 100))
    bs = jax.vmap(lambda h: gauge.act(h, model))(hs)
    aligned, _ = jax.vmap(lambda b: gj.align(gauge, model, b, solver=solver))(bs)
    err = jax.vmap(lambda x: _max_err(x, model))(aligned)
    assert int(jnp.sum(err <= 1e-10)) == 100
    # negative control: the planted models really differ from the reference
    assert float(jnp.min(jax.vmap(lambda x: _max_err(x, model))(bs))) > 1e-2


def test_jit_solver_small(getkey):
    model = gj.nn.MLP((4, 6, 2), jnp.tanh, key=getkey(), dtype=jnp.float64)
    gauge = gj.derive_gauge(model)
    b = gauge.act(gauge.sample(getkey(), dtype=jnp.float64), model)
    aligned, _ = jax.jit(lambda b: gj.align(gauge, model, b, solver="jax", init="canonical"))(b)
    assert float(_max_err(aligned, model)) <= 1e-12


@pytest.mark.slow
def test_deeper_planted_fast_jit_solver(getkey):
    model = gj.nn.MLP((8, 12, 12, 12, 3), jax.nn.relu, key=getkey(), dtype=jnp.float64)
    gauge = gj.derive_gauge(model)
    hs = jax.vmap(lambda k: gauge.sample(k, dtype=jnp.float64))(jax.random.split(getkey(), 10))
    bs = jax.vmap(lambda h: gauge.act(h, model))(hs)
    aligned, g = jax.jit(jax.vmap(lambda b: gj.align(gauge, model, b, solver="jax")))(bs)
    assert int(jnp.sum(jax.vmap(lambda x: _max_err(x, model))(aligned) <= 1e-10)) == 10
    moved = jax.vmap(lambda g, b: gauge.act(g, b))(g, bs)
    assert float(jnp.max(jax.vmap(_max_err)(moved, aligned))) <= 1e-12


@pytest.mark.parametrize("name", ["rmsnorm-rotation", pytest.param("attention", marks=pytest.mark.slow)])
def test_planted_continuous_compact(name, getkey):
    params, gauge, _, _ = CASES[CASE_IDS.index(name)].build(getkey(), jnp.float64)
    h = gauge.sample(getkey(), scale=None, dtype=jnp.float64)
    aligned, g = gj.align(gauge, params, gauge.act(h, params))
    assert rel(aligned, params) <= 1e-8
    assert rel(gauge.act(g, gauge.act(h, params)), aligned) <= 1e-12


def test_interpolate_barrier_repair(getkey):
    k = jax.random.split(getkey(), 3)
    x = jax.random.normal(k[0], (64, 4), jnp.float64)
    y = jnp.sin(x @ jnp.arange(4.0, dtype=jnp.float64))[:, None]
    a = gj.nn.MLP([4, 16, 1], jax.nn.relu, key=k[1], dtype=jnp.float64)
    b = gj.nn.MLP([4, 16, 1], jax.nn.relu, key=k[2], dtype=jnp.float64)
    gauge = gj.derive_gauge(a)
    loss = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731
    aligned, _ = gj.align(gauge, a, b)
    # the loss of the aligned model is the loss of b (exact gauge move)
    assert abs(float(loss(aligned)) - float(loss(b))) <= 1e-10 * float(loss(b))
    curve = gj.loss_barrier(loss, a, aligned, num=11)
    assert curve["loss"].shape == (11,)
    assert abs(float(curve["loss"][0]) - float(loss(a))) <= 1e-12 * float(loss(a))
    naive = gj.loss_barrier(loss, a, b, num=11)
    assert float(curve["barrier"]) <= float(naive["barrier"]) + 1e-12
    mid = gj.interpolate(a, aligned, 0.5)

    def pre(m):
        return {"h1": x @ m.layers[0].weight.T + m.layers[0].bias[None]}

    fixed = gj.repair(gauge, mid, a, aligned, pre)
    z, za, zb = pre(fixed)["h1"], pre(a)["h1"], pre(aligned)["h1"]
    target_sd = 0.5 * (jnp.std(za, 0) + jnp.std(zb, 0))
    assert float(jnp.max(jnp.abs(jnp.std(z, 0) - target_sd))) <= 1e-6 * float(jnp.max(target_sd))
    assert float(jnp.max(jnp.abs(jnp.std(pre(mid)["h1"], 0) - target_sd))) > 1e-3
    target_mean = 0.5 * (jnp.mean(za, 0) + jnp.mean(zb, 0))
    assert float(jnp.max(jnp.abs(jnp.mean(z, 0) - target_mean))) <= 1e-6 * float(jnp.max(target_sd))
    with pytest.raises(ValueError, match="scalar"):
        gj.loss_barrier(lambda m: m(x), a, aligned)


def test_errors(getkey):
    a = gj.nn.MLP([4, 8, 2], jax.nn.relu, key=getkey(), dtype=jnp.float64)
    b = gj.nn.MLP([4, 9, 2], jax.nn.relu, key=getkey(), dtype=jnp.float64)
    gauge = gj.derive_gauge(a)
    with pytest.raises(ValueError, match=r"same architecture.*layers\[0\]\.weight"):
        gj.align(gauge, a, b)
    c = gj.nn.MLP([4, 8, 8, 2], jax.nn.relu, key=getkey(), dtype=jnp.float64)
    with pytest.raises(ValueError, match="same architecture"):
        gj.align(gauge, a, c)
    nan = eqx.tree_at(lambda m: m.layers[0].bias, a, a.layers[0].bias.at[0].set(jnp.nan))
    with pytest.raises(ValueError, match=r"`b` leaf 'layers\[0\]\.bias'"):
        gj.align(gauge, a, nan)
    with pytest.raises(ValueError, match="solver"):
        gj.align(gauge, a, a, solver="cplex")


def test_interpolate_and_repair_refuse_mismatched_inputs(getkey):
    a = {"W1": jnp.ones((6, 4)), "b1": jnp.ones(6), "W2": jnp.ones((3, 6))}
    b = {"W1": jnp.ones((1, 4)), "b1": jnp.ones(1), "W2": jnp.ones((3, 1))}
    with pytest.raises(ValueError, match=r"same architecture: leaf .*W1.* float64\[6, 4\] .* float64\[1, 4\]"):
        gj.interpolate(a, b, 0.5)
    with pytest.raises(ValueError, match="same architecture"):
        gj.loss_barrier(lambda p: p["W1"].sum(), a, b, num=3)
    m = gj.nn.MLP([4, 7, 2], jax.nn.relu, key=getkey(), dtype=jnp.float64)
    gauge = gj.derive_gauge(m)
    x = jnp.ones((5, 4), jnp.float64)
    pre = lambda p: {"h1": (x @ p.layers[0].weight.T)[:, :3]}  # noqa: E731
    with pytest.raises(ValueError, match=r"shape \(5, 3\) for site 'h1' .*expected \(batch, 7\)"):
        gj.repair(gauge, m, m, m, pre)


def test_repair_without_biases(getkey):
    """A site with no bias cannot have its mean shifted: an error naming the site (the
    shift used to be skipped without a word), or the standard deviations alone."""
    k = jax.random.split(getkey(), 3)
    params = lambda key: {"W1": jax.random.normal(key, (6, 4), jnp.float64),  # noqa: E731
                          "W2": jax.random.normal(jax.random.fold_in(key, 1), (3, 6), jnp.float64)}
    a, b = params(k[0]), params(k[1])
    gauge = gj.Gauge({"h1": gj.PositiveMonomial(6)}, [gj.Produce("W1", 0, "h1"), gj.Consume("W2", 1, "h1")], a)
    x = jax.random.normal(k[2], (32, 4), jnp.float64)
    pre = lambda p: {"h1": x @ p["W1"].T}  # noqa: E731
    mid = gj.interpolate(a, b, 0.5)
    with pytest.raises(ValueError, match="site 'h1' has no bias.*shift_mean=False"):
        gj.repair(gauge, mid, a, b, pre)
    fixed = gj.repair(gauge, mid, a, b, pre, shift_mean=False)
    target_sd = 0.5 * (jnp.std(pre(a)["h1"], 0) + jnp.std(pre(b)["h1"], 0))
    assert float(jnp.max(jnp.abs(jnp.std(pre(fixed)["h1"], 0) - target_sd))) <= 1e-6 * float(jnp.max(target_sd))


def test_orbit_tools_on_an_equinox_mlp(getkey):
    # eqx.nn.MLP keeps its activation as a (non-array) leaf
    m = eqx.nn.MLP(4, 3, 6, 2, activation=jax.nn.relu, key=getkey())
    m = jax.tree.map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, m)
    gauge = gj.derive_gauge(m)
    x = jax.random.normal(getkey(), (16, 4), jnp.float64)
    balanced, _ = gj.balance(gauge, m)
    assert float(gj.balance_residual(gauge, balanced)) <= 1e-8
    canon, _ = gj.canonicalize(gauge, m)
    assert rel(jax.vmap(canon)(x), jax.vmap(m)(x)) <= 1e-12
    assert float(gj.gauge_distance(gauge, m, canon)) <= 1e-8


def test_models_that_differ_off_the_arrays(getkey):
    """An equinox MLP keeps its activation as a leaf: a ReLU and a tanh model of one shape
    share a treedef, and were aligned (ReLU rescalings applied to the tanh model, which
    then computed another function) and interpolated without a word. The same activation
    written as a lambda by a model factory, one per call, is still the same model."""
    k = jax.random.split(getkey(), 2)
    relu = eqx.nn.MLP(4, 2, 6, 2, activation=jax.nn.relu, key=k[0], dtype=jnp.float64)
    tanh = eqx.nn.MLP(4, 2, 6, 2, activation=jnp.tanh, key=k[1], dtype=jnp.float64)
    gauge = gj.derive_gauge(relu)
    for fn in (lambda: gj.align(gauge, relu, tanh), lambda: gj.interpolate(relu, tanh, 0.5),
               lambda: gj.gauge_distance(gauge, relu, tanh)):
        with pytest.raises(ValueError, match="leaf 'activation' is function 'relu' in the first and function 'tanh'"):
            fn()
    factory = lambda key, slope: eqx.nn.MLP(  # noqa: E731
        4, 2, 6, 2, activation=lambda x: jax.nn.leaky_relu(x, slope), key=key, dtype=jnp.float64)
    a, b = factory(k[0], 0.1), factory(k[1], 0.1)
    assert a.activation is not b.activation
    gj.interpolate(a, b, 0.5)
    with pytest.raises(ValueError, match="leaf 'activation'"):
        gj.interpolate(a, factory(k[1], 0.2), 0.5)


def test_orbit_tool_arguments(getkey):
    """Arguments out of range: each a ValueError naming it (num=1 gave a barrier without
    looking at b; an array t a broadcasting error; a batched site was left untouched by
    repair, or blamed on a missing bias), and two zero models are at relative distance 0
    (0/0 gave NaN)."""
    a = gj.nn.MLP([4, 6, 2], jax.nn.relu, key=getkey(), dtype=jnp.float64)
    gauge = gj.derive_gauge(a)
    with pytest.raises(ValueError, match="`num` must be an int >= 2"):
        gj.loss_barrier(lambda p: jnp.sum(p.layers[0].weight), a, a, num=1)
    with pytest.raises(ValueError, match=r"`t` must be a scalar; got shape \(3,\)"):
        gj.interpolate(a, a, jnp.ones(3))
    with pytest.raises(TypeError, match="`gauge` must be a gaugejax.Gauge"):
        gj.gauge_distance(None, a, a)
    zero = jax.tree.map(lambda x: jnp.zeros_like(x) if eqx.is_inexact_array(x) else x, a)
    assert float(gj.gauge_distance(gauge, zero, zero, relative=True)) == 0.0
    params, gauge, _, _ = CASES[CASE_IDS.index("attention")].build(getkey(), jnp.float64)
    pre = lambda p: {"ov": jnp.ones((5, 4))}  # noqa: E731
    for shift in (True, False):
        with pytest.raises(ValueError, match=r"repair: site 'ov' \(GL\(4, batch=\(3,\)\)\) is batched"):
            gj.repair(gauge, params, params, params, pre, shift_mean=shift)


def test_same_model_written_twice():
    """What a model factory writes per call is the same model: a closure over a vector
    array, a recursive closure, a callable object; a keyword-only default that differs is
    not. (The array compared by == raised, and counted as a difference.)"""
    def factory(w, s=0.1):
        def act(x, *, slope=s):
            return jax.nn.leaky_relu(x, slope) * w[0]
        return eqx.nn.MLP(3, 2, 4, 1, activation=act, key=jax.random.key(0))

    gj.interpolate(factory(jnp.array([1.0, 2.0])), factory(jnp.array([1.0, 2.0])), 0.5)
    with pytest.raises(ValueError, match="leaf 'activation'"):
        gj.interpolate(factory(jnp.array([1.0, 2.0])), factory(jnp.array([1.0, 3.0])), 0.5)
    with pytest.raises(ValueError, match="leaf 'activation'"):
        gj.interpolate(factory(jnp.ones(2), 0.1), factory(jnp.ones(2), 0.9), 0.5)

    class Act:
        def __call__(self, x):
            return jax.nn.relu(x)

    def recursive():
        def act(x, depth=0):
            return act(x, 1) if depth == 0 else jax.nn.relu(x)
        return eqx.nn.MLP(3, 2, 4, 1, activation=act, key=jax.random.key(0))

    for make in (lambda: eqx.nn.MLP(3, 2, 4, 1, activation=Act(), key=jax.random.key(0)), recursive):
        gj.interpolate(make(), make(), 0.5)
    a = gj.nn.MLP([3, 4, 1], jax.nn.relu, key=jax.random.key(0))
    assert gj.loss_barrier(lambda p: jnp.sum(p.layers[0].weight), a, a, num=np.int64(3))["loss"].shape == (3,)


@pytest.mark.parametrize("site", ["qk", "ov"])
def test_per_head_step_with_the_heads_permuted(site, getkey):
    """A per-head site's matching step, taken while the heads are permuted, is the exact
    maximiser of <a, k . b> over that site: its element for a's head i goes to b's head
    p[i], which the action moves there (it went to b's head i, and could lower the
    objective)."""
    from gaugejax import _align

    case = CASES[CASE_IDS.index("attention")]
    a, gauge, _, _ = case.build(getkey(), jnp.float64)
    b, _, _, _ = case.build(getkey(), jnp.float64)
    a_leaves = jax.tree.leaves(a)

    def objective(k):
        return float(_align._objective(a_leaves, jax.tree.leaves(gauge.act(k, b, check=False))))

    k = gauge.identity(jnp.float64)
    k["heads"] = jnp.asarray([2, 0, 1], jnp.int32)
    stepped = _align._site_step(gauge, a_leaves, b, k, site, "scipy", jnp.float64)
    # the optimum over the site's rotations (what matching looks for): no other rotation
    # per head does better
    best = objective(stepped)
    assert best >= objective(k) - 1e-12
    group = gauge.site_groups[site]
    for _ in range(5):
        q = gj.Orthogonal(group.n, group.batch).sample(getkey(), 0.3, jnp.float64)
        other = {**stepped, site: gauge.site_groups[site].compose(q, stepped[site])}
        assert objective(other) <= best + 1e-9
