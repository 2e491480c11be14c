"""Canonical forms and the gauge-invariant distance."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import CASE_IDS, CASES, _mlp_case, fd_check, linear_readout, rel

import gaugejax as gj


FAST = ("mlp-relu", "mlp-tanh", "rmsnorm-rotation")
SUPPORTED = [c for c in CASES if c.name not in ("mlp-linear", "linear-resnet-links")]
CANON_CASES = [pytest.param(c.build, id=c.name, marks=() if c.name in FAST else pytest.mark.slow) for c in SUPPORTED]
CANON_CASES.append(pytest.param(_mlp_case(gj.identity, None, (6, 4, 4, 5)), id="mlp-linear-gl-bottleneck", marks=pytest.mark.slow))


@pytest.mark.parametrize("build", CANON_CASES)
def test_canonical_form(build, getkey):
    params, gauge, fn, x = build(getkey(), jnp.float64)
    canon, g = gj.canonicalize(gauge, params)
    assert rel(gauge.act(g, params), canon) <= 1e-12
    assert rel(fn(canon, x), fn(params, x)) <= 1e-10
    again, _ = gj.canonicalize(gauge, canon)
    assert rel(again, canon) <= 1e-8
    for _ in range(2):
        h = gauge.sample(getkey(), dtype=jnp.float64)
        moved = gauge.act(h, params)
        assert rel(moved, params) > 1e-3  # negative control: h really moves the params
        other, _ = gj.canonicalize(gauge, moved)
        assert rel(other, canon) <= 1e-8


def test_canonicalize_is_differentiable(getkey):
    """jax.grad and jax.jvp through the canonical form of a ReLU net (balance by implicit
    differentiation, then the sort and the gathers), against central differences."""
    params, gauge, _, _ = CASES[CASE_IDS.index("mlp-relu")].build(getkey(), jnp.float64)
    read = linear_readout(getkey(), params)
    fd_check(lambda p: read(gj.canonicalize(gauge, p)[0]), params, getkey())


@pytest.mark.slow
def test_gauge_distance_is_differentiable(getkey):
    """The gauge distance as a training objective: its matching (piecewise constant; the
    host solver's callback used to stop reverse mode) passes no derivative."""
    build = CASES[CASE_IDS.index("mlp-relu")].build
    params, gauge, _, _ = build(getkey(), jnp.float64)
    other, _, _, _ = build(getkey(), jnp.float64)
    fd_check(lambda p: gj.gauge_distance(gauge, p, other), params, getkey())


def test_balanced_moment_map(getkey):
    params, gauge, _, _ = CASES[CASE_IDS.index("mlp-relu")].build(getkey(), jnp.float64)
    canon, _ = gj.canonicalize(gauge, params)
    assert float(gj.balance_residual(gauge, canon)) <= 1e-8
    assert float(gj.balance_residual(gauge, params)) > 1e-3


def test_gl_canonical_is_svd_balanced(getkey):
    # y = W2 W1 x through a GL(3) site: canonical factors are W1 = S^1/2 V^T, W2 = U S^1/2
    k1, k2 = jax.random.split(getkey())
    params = {"W1": jax.random.normal(k1, (3, 5), jnp.float64), "W2": jax.random.normal(k2, (4, 3), jnp.float64)}
    gauge = gj.Gauge({"h": gj.GL(3)}, [gj.Produce("W1", 0, "h"), gj.Consume("W2", 1, "h")], params)
    canon, _ = gj.canonicalize(gauge, params)
    u, s, vt = jnp.linalg.svd(params["W2"] @ params["W1"], full_matrices=False)
    s, u, vt = s[:3], u[:, :3], vt[:3]
    w1 = jnp.sqrt(s)[:, None] * vt
    signs = jnp.sign(jnp.take_along_axis(w1, jnp.argmax(jnp.abs(w1), axis=1)[:, None], axis=1))[:, 0]
    assert rel(canon["W1"], signs[:, None] * w1) <= 1e-8
    assert rel(canon["W2"], (u * jnp.sqrt(s)[None, :]) * signs[None, :]) <= 1e-8


def test_gauge_distance(getkey):
    params, gauge, _, _ = CASES[CASE_IDS.index("mlp-relu")].build(getkey(), jnp.float64)
    other = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(getkey(), p.shape, p.dtype), params)
    d = gj.gauge_distance(gauge, params, other)
    h1, h2 = gauge.sample(getkey(), dtype=jnp.float64), gauge.sample(getkey(), dtype=jnp.float64)
    d_moved = gj.gauge_distance(gauge, gauge.act(h1, params), gauge.act(h2, other))
    assert float(d) > 1e-2
    assert abs(float(d_moved) - float(d)) <= 1e-8 * float(d)
    assert float(gj.gauge_distance(gauge, params, gauge.act(h1, params), relative=True)) <= 1e-8


def test_errors(getkey):
    params, gauge, _, _ = CASES[CASE_IDS.index("mlp-relu")].build(getkey(), jnp.float64)
    bad = eqx.tree_at(lambda m: m.layers[1].weight, params, params.layers[1].weight.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match=r"layers\[1\]\.weight.*NaN"):
        gj.canonicalize(gauge, bad)
    params, gauge, _, _ = CASES[CASE_IDS.index("mlp-linear")].build(getkey(), jnp.float64)
    with pytest.raises(ValueError, match="GL site 'h1'.*singular"):
        gj.canonicalize(gauge, params)
    params, gauge, _, _ = CASES[CASE_IDS.index("linear-resnet-links")].build(getkey(), jnp.float64)
    with pytest.raises(NotImplementedError, match="Link"):
        gj.canonicalize(gauge, params)


def test_pruned_odd_neurons_get_a_sign_from_their_outgoing_weights(getkey):
    """A tanh neuron whose incoming weights and bias are zero has no produced entry to read
    its sign from: it is decided from its outgoing weights once every other sign is fixed,
    and the next layer reads past its column (the largest entries of W2's rows sit there,
    with a sign the convention has not fixed yet). The form is then invariant."""
    k = jax.random.split(getkey(), 6)
    w1 = jax.random.normal(k[0], (5, 3), jnp.float64).at[0].set(0.0)
    b1 = jax.random.normal(k[1], (5,), jnp.float64).at[0].set(0.0)
    w2 = jax.random.normal(k[2], (4, 5), jnp.float64).at[:, 0].multiply(10.0).at[1].set(0.0)
    b2 = jax.random.normal(k[3], (4,), jnp.float64).at[1].set(0.0)
    p = [(w1, b1), (w2, b2), (jax.random.normal(k[4], (2, 4), jnp.float64), jnp.zeros(2, jnp.float64))]
    gauge = gj.feedforward_gauge(p, jnp.tanh)
    canon, _ = gj.canonicalize(gauge, p)
    for _ in range(4):
        h = gauge.sample(getkey(), dtype=jnp.float64)
        moved = gauge.act(h, p)
        assert rel(gj.canonicalize(gauge, moved)[0], canon) <= 1e-12
    # the pruned neurons' outgoing weights were read: the largest is positive
    assert canon[1][0][jnp.argmax(jnp.abs(canon[1][0][:, 0])), 0] > 0
