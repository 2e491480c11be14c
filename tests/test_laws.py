"""Group laws, invariance, and composition with jit / vmap / grad, for every case."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import CASE_IDS, CASES, INVARIANCE_RTOL, LAW_RTOL, rel

import gaugejax as gj


DTYPES = [jnp.float32, jnp.float64]
# the transforms (vmap, grad) are exercised on one case per coupling kind and group family
SUBSET = [c for c in CASES if c.name in ("mlp-relu", "mlp-tanh", "flax-relu", "attention", "rmsnorm-rotation", "linear-resnet-links")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_group_laws(case, dtype, getkey):
    params, gauge, _, _ = case.build(getkey(), dtype)
    g = gauge.sample(getkey(), dtype=dtype)
    h = gauge.sample(getkey(), dtype=dtype)
    k = gauge.sample(getkey(), dtype=dtype)
    tol = LAW_RTOL[dtype] * 10
    act = gauge.act

    # one compiled program for all the laws (eager dispatch of every small op, and of the
    # LAPACK-free GL loops, dominated this test's time); test_jit_matches_eager covers eager
    @eqx.filter_jit
    def laws(g, h, k, params):
        assoc_l = gauge.compose(gauge.compose(g, h), k)
        assoc_r = gauge.compose(g, gauge.compose(h, k))
        return (
            (act(gauge.identity(dtype), params), params),
            (act(gauge.compose(g, h), params), act(g, act(h, params))),
            (act(gauge.inverse(g), act(g, params)), params),
            (act(gauge.compose(gauge.inverse(g), g), params), params),
            (act(assoc_l, params), act(assoc_r, params)),
        )

    identity, *others = laws(g, h, k, params)
    assert rel(*identity) == 0
    for a, b in others:
        assert rel(a, b) <= tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_invariance(case, dtype, getkey):
    params, gauge, fn, x = case.build(getkey(), dtype)
    rep = gj.check_invariance(fn, gauge, params, x, key=getkey(), num_samples=16)
    assert rep.passed, rep
    assert rep.max_rel_error <= INVARIANCE_RTOL[dtype]
    assert rep.dtype == jnp.dtype(dtype).name


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_jit_matches_eager_and_does_not_retrace(case, getkey):
    params, gauge, _, _ = case.build(getkey(), jnp.float64)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def jitted(g, p):
        return gauge.act(g, p)

    for _ in range(3):
        g = gauge.sample(getkey(), dtype=jnp.float64)
        assert rel(jitted(g, params), gauge.act(g, params)) <= 1e-14


# the attention case (per-head GL inside a vmap over elements and params) is the slowest
# compile of the suite; its group laws and jit run by default, its vmap with -m slow
VMAP_CASES = [pytest.param(c, marks=pytest.mark.slow) if c.name == "attention" else c for c in SUBSET]


@pytest.mark.parametrize("case", VMAP_CASES, ids=lambda c: c.name)
def test_vmap_over_elements_and_params(case, getkey):
    params, gauge, _, _ = case.build(getkey(), jnp.float64)
    keys = jax.random.split(getkey(), 4)
    gs = jax.vmap(lambda k: gauge.sample(k, dtype=jnp.float64))(keys)
    batched = eqx.filter_vmap(lambda g: gauge.act(g, params))(gs)
    for i in range(4):
        g_i = jax.tree.map(lambda a: a[i], gs)
        one = jax.tree.map(lambda a: a[i] if eqx.is_array(a) else a, batched)
        assert rel(one, gauge.act(g_i, params)) <= 1e-14
    # vmap over parameters (a stack of models)
    stacked = eqx.filter_vmap(lambda k: case.build(k, jnp.float64)[0])(keys)
    g = gauge.sample(getkey(), dtype=jnp.float64)
    out = eqx.filter_vmap(lambda p: gauge.act(g, p))(stacked)
    first = jax.tree.map(lambda a: a[0] if eqx.is_array(a) else a, stacked)
    out0 = jax.tree.map(lambda a: a[0] if eqx.is_array(a) else a, out)
    assert rel(out0, gauge.act(g, first)) <= 1e-14


@pytest.mark.parametrize("case", SUBSET, ids=lambda c: c.name)
def test_grad_through_act(case, getkey):
    """grad w.r.t. params commutes with the gauge as the chain rule says, and grad w.r.t.
    a Lie-algebra element of an invariant loss vanishes."""
    params, gauge, fn, x = case.build(getkey(), jnp.float64)
    g = gauge.sample(getkey(), dtype=jnp.float64)

    def loss(p):
        return jnp.sum(fn(p, x) ** 2)

    # invariance of the loss: L(g.p) = L(p) for all p, so d/dp L(g.p) = d/dp L(p)
    g1 = eqx.filter_grad(lambda p: loss(gauge.act(g, p)))(params)
    g0 = eqx.filter_grad(loss)(params)
    assert rel(g1, g0) <= 1e-9
    if gauge.continuous_sites:
        xi = gauge.sample_algebra(getkey(), scale=0.3, dtype=jnp.float64)
        d_xi = jax.grad(lambda z: loss(gauge.act(gauge.exp(z), params)))(xi)
        scale = abs(float(loss(params)))
        assert max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(d_xi)) <= 1e-8 * scale


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_vertical_is_a_jvp_and_linear(case, getkey):
    params, gauge, fn, x = case.build(getkey(), jnp.float64)
    if not gauge.continuous_sites:
        pytest.skip("no continuous sites")
    xi = gauge.sample_algebra(getkey(), scale=1.0, dtype=jnp.float64)
    eta = gauge.sample_algebra(getkey(), scale=1.0, dtype=jnp.float64)
    v = gauge.vertical(params, xi)
    # finite differences of act(exp(e xi))
    e = 1e-6
    plus = gauge.act(gauge.exp(jax.tree.map(lambda a: e * a, xi)), params)
    minus = gauge.act(gauge.exp(jax.tree.map(lambda a: -e * a, xi)), params)
    fd = jax.tree.map(lambda a, b: (a - b) / (2 * e) if eqx.is_array(a) else None, plus, minus)
    assert rel(v, fd) <= 1e-6
    # linear in xi
    both = gauge.vertical(params, jax.tree.map(lambda a, b: 2 * a - b, xi, eta))
    lin = jax.tree.map(lambda a, b: 2 * a - b, v, gauge.vertical(params, eta))
    assert rel(both, lin) <= 1e-10
    # a vertical vector does not change the function to first order
    jvp = eqx.filter_jvp(lambda p: fn(p, x), (params,), (v,))[1]
    assert float(jnp.max(jnp.abs(jvp))) <= 1e-9 * float(jnp.max(jnp.abs(fn(params, x))))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_orbit_dim_matches_vertical_rank(case, getkey):
    params, gauge, _, _ = case.build(getkey(), jnp.float64)
    expected = gauge.orbit_dim
    if case.name == "mlp-linear":
        # hidden width 7 > 5 inputs + 1 bias: [W_1, b_1] spans a hyperplane S of R^7 and W_2
        # (6 x 7) has a kernel u. g = I + u w^T with w orthogonal to S fixes [W_1, b_1] and
        # W_2: a one-dimensional stabiliser. O(7) has no such element.
        assert gauge.orbit_rank(params) == expected - 1
    else:
        assert gauge.orbit_rank(params) == expected


def test_semidirect_structure_is_derived(getkey):
    params, gauge, _, _ = CASES[CASE_IDS.index("attention")].build(getkey(), jnp.float64)
    outer = dict(gauge.outer)
    assert outer["qk"] == ("heads",) and outer["ov"] == ("heads",) and outer["heads"] == ()


def test_monomial_matches_dense_matrices(getkey):
    group = gj.PositiveMonomial(5)
    g, h = group.sample(getkey(), 0.7, jnp.float64), group.sample(getkey(), 0.7, jnp.float64)
    m = group.as_matrix
    assert jnp.allclose(m(group.compose(g, h)), m(g) @ m(h), atol=1e-14)
    assert jnp.allclose(m(group.inverse(g)), jnp.linalg.inv(m(g)), atol=1e-12)
    sp = gj.SignedPermutation(5)
    s = sp.sample(getkey(), None, jnp.float64)
    assert jnp.allclose(sp.as_matrix(s).T @ sp.as_matrix(s), jnp.eye(5))


def test_haar_orthogonal(getkey):
    group = gj.Orthogonal(4)
    q = group.sample(getkey(), None, jnp.float64)
    assert jnp.allclose(q.T @ q, jnp.eye(4), atol=1e-12)
    dets = jax.vmap(lambda k: jnp.linalg.det(group.sample(k, None, jnp.float64)))(jax.random.split(getkey(), 200))
    # Haar on O(n) covers both components
    assert jnp.any(dets < 0) and jnp.any(dets > 0)
    # drawn without LAPACK (concurrent batched LAPACK calls deadlock XLA:CPU on two cores:
    # a sweep over six batched O(8) sites hung), as the Q of QR with R's diagonal positive
    batched = gj.Orthogonal(6, (3,))
    key = getkey()
    hlo = jax.jit(lambda k: batched.sample(k, None, jnp.float64)).lower(key).as_text()
    assert "custom_call" not in hlo, "a LAPACK custom call in the Haar sampler"
    x = jax.random.normal(key, (3, 6, 6), jnp.float64)
    q, r = jnp.linalg.qr(x)
    ref = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]
    assert jnp.allclose(gj._groups._linalg.haar_orthogonal(x), ref, atol=1e-12)


@pytest.mark.parametrize("n", [4, 200], ids=["rank-sampler", "sort-sampler"])
def test_random_permutations_are_uniform(n, getkey):
    # Both samplers (pairwise ranks up to RANK_SAMPLER_MAX_N, jax.random.permutation
    # above): chi-square on the 24 permutations of the first 4 positions' relative order,
    # and every output a permutation.
    import math

    import numpy as np
    from scipy import stats

    from gaugejax._groups.base import RANK_SAMPLER_MAX_N, random_permutations

    assert (n <= RANK_SAMPLER_MAX_N) == (n == 4)
    draws = 4800
    perms = np.asarray(random_permutations(getkey(), n, (draws,)))
    assert perms.dtype == np.int32
    assert np.array_equal(np.sort(perms, axis=-1), np.broadcast_to(np.arange(n), perms.shape))
    order = np.argsort(perms[:, :4], axis=-1)
    codes = np.sum(order * np.array([64, 16, 4, 1]), axis=-1)
    _, counts = np.unique(codes, return_counts=True)
    assert counts.size == math.factorial(4)
    assert stats.chisquare(counts).pvalue > 1e-4
