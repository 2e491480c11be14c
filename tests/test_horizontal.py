"""Horizontal projection: vertical -> 0, idempotent, orthogonal to every
generator, invariant gradients unchanged; structured and matrix-free paths agree."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CASE_IDS, CASES, rel

import gaugejax as gj


def _flat(tree):
    return jax.flatten_util.ravel_pytree(eqx.filter(tree, eqx.is_inexact_array))[0]


def _random_like(key, params):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = [jax.random.normal(k, x.shape, x.dtype) if eqx.is_inexact_array(x) else x for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, out)


CONTINUOUS = [c for c in CASES if c.name not in ("mlp-tanh", "mlp-tanh-signflip", "mlp-gelu", "eqx-mlp-tanh")]
# one of each kind of continuous site (rescaling, O(n), GL with semidirect heads and a
# translation, links); the rest of the registry runs in the slow suite
FAST = ("mlp-relu", "rmsnorm-rotation", "linear-resnet-links")
LAW_CASES = [
    pytest.param(c, m, id=f"{c.name}-{m}", marks=() if (c.name in FAST and (m == "auto" or c.name == "mlp-relu")) else pytest.mark.slow)
    for c in CONTINUOUS
    for m in ("auto", "cg")
    if not (m == "cg" and c.name not in ("mlp-relu", "mlp-relu-diagonal", "pairs-leaky", "flax-relu"))
]
GRAD_CASES = [pytest.param(c, id=c.name, marks=() if c.name in FAST else pytest.mark.slow) for c in CONTINUOUS]


def _generators(gauge, params):
    """Every vertical generator V e_k as rows of a matrix (dense; small cases only)."""
    zeros = gauge.algebra_zeros(jnp.float64)
    flat, unravel = jax.flatten_util.ravel_pytree(zeros)
    basis = jnp.eye(flat.size, dtype=flat.dtype)
    return jax.vmap(lambda e: _flat(gauge.vertical(params, unravel(e))))(basis)


@pytest.mark.parametrize("case,method", LAW_CASES)
def test_projection_laws(case, method, getkey):
    params, gauge, fn, x = case.build(getkey(), jnp.float64)
    v = _random_like(getkey(), params)
    h = gj.horizontal(gauge, params, v, method=method)
    gens = _generators(gauge, params)
    hf = _flat(h)
    norms = jnp.linalg.norm(gens, axis=1)
    live = norms > 1e-12 * jnp.max(norms)  # an O(n) matrix's symmetric part generates nothing
    cos = jnp.abs(gens[live] @ hf) / (norms[live] * jnp.linalg.norm(hf))
    assert float(jnp.max(cos)) <= 1e-6
    # the raw vector is not horizontal (negative control)
    vf = _flat(v)
    assert float(jnp.max(jnp.abs(gens[live] @ vf) / (norms[live] * jnp.linalg.norm(vf)))) > 1e-3
    # idempotent
    hh = gj.horizontal(gauge, params, h, method=method)
    assert float(jnp.max(jnp.abs(_flat(hh) - hf))) <= 1e-10 * float(jnp.max(jnp.abs(hf)))
    # a vertical vector (a random combination of the engine's generators) projects to zero
    unravel = jax.flatten_util.ravel_pytree(eqx.filter(params, eqx.is_inexact_array))[1]
    vert_flat = jax.random.normal(getkey(), (gens.shape[0],), jnp.float64) @ gens
    hv = gj.horizontal(gauge, params, unravel(vert_flat), method=method)
    assert float(jnp.max(jnp.abs(_flat(hv)))) <= 1e-10 * float(jnp.max(jnp.abs(vert_flat)))


@pytest.mark.parametrize("case", GRAD_CASES)
def test_invariant_gradient_is_horizontal(case, getkey):
    params, gauge, fn, x = case.build(getkey(), jnp.float64)
    loss = lambda p: jnp.sum(jnp.sin(fn(p, x)) ** 2)  # noqa: E731
    grad = eqx.filter_grad(loss)(params)
    h = gj.horizontal(gauge, params, grad)
    assert float(jnp.max(jnp.abs(_flat(h) - _flat(grad)))) <= 1e-10 * float(jnp.max(jnp.abs(_flat(grad))))
    if all(isinstance(g, gj.Orthogonal) for n, g in gauge.sites if n in gauge.continuous_sites):
        return  # weight decay is O(n)-invariant: no negative control here
    # negative control: the gradient of a non-invariant loss (weight decay) is changed
    wd = eqx.filter_grad(lambda p: 0.5 * jnp.sum(_flat(p) ** 2))(params)
    hw = gj.horizontal(gauge, params, wd)
    assert float(jnp.max(jnp.abs(_flat(hw) - _flat(wd)))) > 1e-3 * float(jnp.max(jnp.abs(_flat(wd))))


def test_structured_paths_agree(getkey):
    model = gj.nn.MLP([4, 6, 5, 3], jax.nn.relu, key=getkey(), dtype=jnp.float64)
    gauge = gj.derive_gauge(model)
    v = _random_like(getkey(), model)
    dense = gj.vertical_coordinates(gauge, model, v, method="dense")
    cg = gj.vertical_coordinates(gauge, model, v, method="cg")
    for k in dense:
        np.testing.assert_allclose(dense[k], cg[k], rtol=1e-7, atol=1e-9)
    pcg = gj.vertical_coordinates(gauge, model, v, method="structured")
    for k in dense:
        np.testing.assert_allclose(dense[k], pcg[k], rtol=1e-7, atol=1e-9)


def test_vertical_adjoint_is_adjoint(getkey):
    params, gauge, _, _ = CASES[CASE_IDS.index("rmsnorm-rotation")].build(getkey(), jnp.float64)
    v = _random_like(getkey(), params)
    xi = gauge.sample_algebra(getkey(), dtype=jnp.float64)
    lhs = jnp.vdot(_flat(v), _flat(gauge.vertical(params, xi)))
    adj = gj.vertical_adjoint(gauge, params, v)
    rhs = sum(jnp.vdot(adj[k], xi[k]) for k in xi)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)


def test_works_under_jit_float32(getkey):
    model = gj.nn.MLP([4, 8, 3], jax.nn.relu, key=getkey(), dtype=jnp.float32)
    gauge = gj.derive_gauge(model)
    v = _random_like(getkey(), model)
    h = jax.jit(lambda m, v: gj.horizontal(gauge, m, v))(model, v)
    adj = gj.vertical_adjoint(gauge, model, h)
    assert float(jnp.max(jnp.abs(adj["h1"]))) <= 1e-5 * float(jnp.max(jnp.abs(gj.vertical_adjoint(gauge, model, v)["h1"])))


def test_errors(getkey):
    params, gauge, _, _ = CASES[CASE_IDS.index("mlp-gelu")].build(getkey(), jnp.float64)
    with pytest.raises(ValueError, match="continuous part"):
        gj.horizontal(gauge, params, params)
    params, gauge, _, _ = CASES[CASE_IDS.index("attention")].build(getkey(), jnp.float64)
    with pytest.raises(ValueError, match="method='structured'"):
        gj.horizontal(gauge, params, params, method="structured")
    with pytest.raises(ValueError, match="structure of the parameters"):
        gj.horizontal(gauge, params, [1.0])
    bad = dict(params, WQ=jnp.zeros((1, 2), jnp.float64))
    with pytest.raises(ValueError, match="'WQ'"):
        gj.horizontal(gauge, params, bad)


def test_non_finite_input(getkey):
    """NaN in v or in the parameters: eagerly a ValueError naming the leaf; under jit (a
    training loop, where `optax.apply_if_finite` may handle it) a NaN projection on every
    method. The structured and CG solves used to stop at once and hand v back unprojected
    on every finite leaf."""
    model = gj.nn.MLP([4, 6, 5, 2], jax.nn.relu, key=getkey(), dtype=jnp.float32)
    gauge = gj.derive_gauge(model)
    v = _random_like(getkey(), model)
    nan_v = eqx.tree_at(lambda t: t.layers[1].weight, v, v.layers[1].weight.at[0, 0].set(jnp.nan))
    nan_p = eqx.tree_at(lambda t: t.layers[1].weight, model, model.layers[1].weight.at[0, 0].set(jnp.inf))
    for what, (p, t) in (("v", (model, nan_v)), ("params", (nan_p, v))):
        with pytest.raises(ValueError, match=rf"`{what}` leaf 'layers\[1\].weight' contains 1 NaN or inf"):
            gj.horizontal(gauge, p, t)

    @jax.jit
    def projections(model, v, nan_p, nan_v):
        return [gj.horizontal(gauge, model, nan_v, method="structured"), gj.horizontal(gauge, nan_p, v, method="cg"),
                gj.horizontal(gauge, nan_p, v, method="dense")]

    for h in projections(model, v, nan_p, nan_v):
        for layer in h.layers:  # every leaf the gauge acts on
            assert bool(jnp.all(jnp.isnan(layer.weight)))


def test_grad_through_the_structured_projection(getkey):
    # lineax cannot differentiate its preconditioner option: the solve must not need it
    m = gj.nn.MLP((5, 7, 6, 3), jax.nn.relu, key=getkey(), dtype=jnp.float64)
    gauge = gj.derive_gauge(m)
    leaves, treedef = jax.tree.flatten(m)
    keys = jax.random.split(getkey(), len(leaves))
    v = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    sq = lambda t: sum(jnp.sum(x**2) for x in jax.tree.leaves(t))  # noqa: E731
    g_struct = eqx.filter_grad(lambda p: sq(gj.horizontal(gauge, p, v)))(m)
    g_dense = eqx.filter_grad(lambda p: sq(gj.horizontal(gauge, p, v, method="dense")))(m)
    for a, b in zip(jax.tree.leaves(g_struct), jax.tree.leaves(g_dense)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


def test_filtered_params_keep_leaf_indices():
    """A model whose first leaf is a function: `equinox.filter` drops it, and the gauge must
    still index the arrays by their place in the whole model (a filtered tree used to
    shift every index by one)."""

    class Net(eqx.Module):
        act: object
        W1: jax.Array
        b1: jax.Array
        W2: jax.Array

    k = jax.random.split(jax.random.key(0), 3)
    net = Net(jax.nn.relu, jax.random.normal(k[0], (5, 3), jnp.float64), jax.random.normal(k[1], (5,), jnp.float64),
              jax.random.normal(k[2], (2, 5), jnp.float64))
    gauge = gj.Gauge({"h": gj.PositiveDiagonal(5)},
                     [gj.Produce("W1", 0, "h"), gj.Produce("b1", 0, "h"), gj.Consume("W2", 1, "h")], net)
    v = jax.tree.map(lambda x: jnp.ones_like(x) if eqx.is_inexact_array(x) else None, net)
    whole = gj.horizontal(gauge, net, v)
    filtered = gj.horizontal(gauge, eqx.filter(net, eqx.is_array), v)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(filtered)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="nor are they an `equinox.filter` of it"):
        gj.horizontal(gauge, {"W1": net.W1}, v)


@pytest.mark.parametrize("method", ["structured", "cg"])
def test_projection_of_small_vectors_float32(method, getkey):
    """The projection is linear: horizontal(c v) = c horizontal(v) to float32 precision for
    tiny c (a late-training gradient). The tolerances used to be absolute: at c = 1e-9
    the projection was off by 3%."""
    model = gj.nn.MLP([8, 32, 32, 3], jax.nn.relu, key=getkey())
    gauge = gj.derive_gauge(model)
    v = _random_like(getkey(), model)
    project = eqx.filter_jit(lambda v: _flat(gj.horizontal(gauge, model, v, method=method)))
    ref = project(v)
    for c in (1e-6, 1e-9):
        small = project(jax.tree.map(lambda a: c * a, v))
        assert float(jnp.max(jnp.abs(small / c - ref))) <= 1e-5 * float(jnp.max(jnp.abs(ref)))


def test_none_fields_in_params(getkey):
    """A None field of the model (equinox's bias=None; a Transformer without norm gains
    is the same case) is None in its gradient too: the tangent's structure check counted
    it as a leaf on one side only and refused every gradient of such a model."""
    model = eqx.nn.MLP(4, 3, 5, 2, activation=jax.nn.relu, use_bias=False, use_final_bias=False,
                       key=getkey(), dtype=jnp.float64)
    x = jax.random.normal(getkey(), (6, 4), jnp.float64)
    gauge = gj.derive_gauge(model)
    grad = eqx.filter_grad(lambda m: jnp.sum(jnp.sin(jax.vmap(m)(x)) ** 2))(model)
    h = gj.horizontal(gauge, model, grad)
    assert float(jnp.max(jnp.abs(_flat(h) - _flat(grad)))) <= 1e-10 * float(jnp.max(jnp.abs(_flat(grad))))
    with pytest.raises(ValueError, match=r"leaf '.layers\[0\].bias' is an array of shape \(5,\); the parameters hold None"):
        gj.horizontal(gauge, model, eqx.tree_at(lambda m: m.layers[0].bias, grad, jnp.zeros(5),
                                                is_leaf=lambda x: x is None))


@pytest.mark.parametrize("T", [None, 3])
def test_gram_diagonal_of_a_self_coupled_leaf(getkey, T):
    """A -> D A D^-1 leaves A_ii alone: the Gram diagonal (the Jacobi preconditioner) is
    the dense Gram matrix's, not 2 A_ii^2 more; also with one D per time (a site batched
    on the grid axis); the three projections agree."""
    from gaugejax import _rescaling

    k = jax.random.split(getkey(), 3)
    n = 4
    t = () if T is None else (T,)
    bt = () if T is None else (0,)
    o = len(t)
    params = {"A": jax.random.normal(k[0], (*t, n, n), jnp.float64) * jnp.asarray([1.0, 1, 1, 1e3]).reshape(*(1,) * o, n, 1),
              "W": jax.random.normal(k[1], (*t, 2, n), jnp.float64), "b": jax.random.normal(k[2], (*t, n), jnp.float64)}
    gauge = gj.Gauge({"s": gj.PositiveDiagonal(n, t)},
                     [gj.Produce("A", o, "s", bt), gj.Consume("A", o + 1, "s", bt),
                      gj.Consume("W", o + 1, "s", bt), gj.Produce("b", o, "s", bt)], params)
    leaves = jax.tree.leaves(params)
    dense, _ = _rescaling.gram_dense(gauge, leaves)
    np.testing.assert_allclose(_rescaling.gram_diagonal(gauge, leaves)["s"].ravel(), jnp.diagonal(dense), rtol=1e-12)
    v = jax.tree.map(lambda a: jax.random.normal(getkey(), a.shape, a.dtype), params)
    ref = gj.horizontal(gauge, params, v, method="dense")
    for method in ("structured", "cg"):
        assert rel(gj.horizontal(gauge, params, v, method=method), ref) <= 1e-9


def test_structured_solve_survives_a_breakdown_far_along_the_orbit(getkey):
    """Far along the rescaling orbit (parameters up to 2.5e6 in float32) the Gram operator
    built from squared parameters loses positive-definiteness to rounding; lineax's CG
    signals it with NaN, and the projection of finite inputs was NaN. The dense solve now
    takes over: finite and as horizontal as the dense method."""
    sizes = (8, 32, 32, 32, 4)
    keys = jax.random.split(jax.random.key(0), len(sizes))
    f32 = jnp.float32
    p0 = [(jax.random.normal(keys[i], (sizes[i + 1], sizes[i]), f32),
           0.1 * jax.random.normal(keys[i], (sizes[i + 1],), f32)) for i in range(len(sizes) - 1)]
    gauge = gj.feedforward_gauge(p0, jax.nn.relu)
    v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(9), x.shape, f32), p0)
    params = gauge.act(gauge.sample(jax.random.key(2), scale=3.0, dtype=f32), p0)  # a point where CG broke down
    gens = jax.vmap(lambda e: _flat(gauge.vertical(params, {"h1": e[:32], "h2": e[32:64], "h3": e[64:]})))(
        jnp.eye(96, dtype=f32))
    for method in ("auto", "dense"):
        h = _flat(gj.horizontal(gauge, params, v, method=method))
        assert bool(jnp.all(jnp.isfinite(h))), method
        cos = jnp.abs(gens @ h) / (jnp.linalg.norm(gens, axis=1) * jnp.linalg.norm(h))
        assert float(jnp.max(cos)) <= 1e-5, method


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_projection(dtype, getkey):
    """Half precision is solved in float32 (the dense Cholesky raised 'Unsupported dtype',
    the CG paths returned NaN for an ordinary MLP) and cast back."""
    model = gj.nn.MLP([3, 6, 5, 2], jax.nn.relu, key=getkey())
    gauge = gj.derive_gauge(model)
    half = jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model)
    v = _random_like(getkey(), half)
    ref = _flat(gj.horizontal(gauge, jax.tree.map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a,
                                                  half), v))
    for method in ("auto", "dense", "cg"):
        h = gj.horizontal(gauge, half, v, method=method)
        assert {a.dtype for a in jax.tree.leaves(eqx.filter(h, eqx.is_inexact_array))} == {jnp.dtype(dtype)}
        assert float(jnp.max(jnp.abs(_flat(h).astype(jnp.float32) - ref))) <= 1e-2 * float(jnp.max(jnp.abs(ref)))
    xi = gj.vertical_coordinates(gauge, half, v)
    assert {x.dtype for x in xi.values()} == {jnp.dtype(dtype)}


def test_matrix_free_cg_warns_when_it_stops_short(getkey):
    """Far from balance the matrix-free CG stopped at max_steps short of its tolerance and
    returned a projection keeping part of the vertical component (cosine 1e-3 with vertical
    directions in float64, against 1e-14 converged), silently. It now warns, eagerly and
    under jit; a converged solve does not."""
    import warnings

    model = gj.nn.MLP([4, 8, 8, 2], gj.identity, key=jax.random.key(0), dtype=jnp.float64)
    gauge = gj.derive_gauge(model)
    far = gauge.act(gauge.sample(jax.random.key(0), scale=3.0, dtype=jnp.float64), model)
    v = jax.tree.map(lambda x: jax.random.normal(getkey(), x.shape, x.dtype), eqx.filter(far, eqx.is_inexact_array))
    with pytest.warns(gj.HorizontalConvergenceWarning, match="stopped at max_steps=300"):
        gj.horizontal(gauge, far, v, max_steps=300)
    with pytest.warns(gj.HorizontalConvergenceWarning):
        jax.block_until_ready(eqx.filter_jit(lambda p, v: gj.horizontal(gauge, p, v, max_steps=300))(far, v))
    with warnings.catch_warnings():  # the same program at the unmoved model: converged
        warnings.simplefilter("error", gj.HorizontalConvergenceWarning)
        gj.horizontal(gauge, model, v, max_steps=300)
