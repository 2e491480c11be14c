"""Bad input gets a clear error naming the leaf, site or argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj


def _pairs(dtype=jnp.float64):
    k = jax.random.split(jax.random.key(0), 4)
    return [(jax.random.normal(k[0], (5, 3), dtype), jax.random.normal(k[1], (5,), dtype)),
            (jax.random.normal(k[2], (2, 5), dtype), jax.random.normal(k[3], (2,), dtype))]


def test_axis_size_disagrees_with_leaf():
    params = _pairs()
    with pytest.raises(ValueError, match=r"site 'h'.*\[1\]\[0\].*axis 1.*expected 4, received 5"):
        gj.Gauge({"h": gj.PositiveDiagonal(4)}, [gj.Consume("[1][0]", 1, "h")], params)


def test_producer_consumer_mismatch_names_both():
    params = [(jnp.ones((5, 3)), jnp.ones(5)), (jnp.ones((2, 4)), jnp.ones(2))]
    with pytest.raises(ValueError, match=r"site 'h1'.*\[0\]\[0\].*\[1\]\[0\].*consumes.*expected 5, received 4"):
        gj.feedforward_gauge(params, jax.nn.relu)


def test_unknown_leaf_and_site_and_axis():
    params = _pairs()
    with pytest.raises(ValueError, match="no leaf at path"):
        gj.Gauge({"h": gj.PositiveDiagonal(5)}, [gj.Produce("[0][2]", 0, "h")], params)
    with pytest.raises(ValueError, match="site 'g' is not declared"):
        gj.Gauge({"h": gj.PositiveDiagonal(5)}, [gj.Produce("[0][0]", 0, "g")], params)
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        gj.Gauge({"h": gj.PositiveDiagonal(5)}, [gj.Produce("[0][0]", 3, "h")], params)
    with pytest.raises(ValueError, match="declared but no coupling uses them"):
        gj.Gauge({"h": gj.PositiveDiagonal(5), "x": gj.SignFlip(2)}, [gj.Produce("[0][0]", 0, "h")], params)


def _gauge(group, dtype=jnp.float64):
    params = _pairs(dtype)
    return params, gj.Gauge({"h": group}, [gj.Produce("[0][0]", 0, "h"), gj.Produce("[0][1]", 0, "h"),
                                           gj.Consume("[1][0]", 1, "h")], params)


@pytest.mark.parametrize("jit", [False, True])
def test_non_positive_scale(jit):
    params, gauge = _gauge(gj.PositiveDiagonal(5))
    g = {"h": jnp.array([1.0, 2.0, -1.0, 1.0, 1.0])}
    act = jax.jit(gauge.act) if jit else gauge.act
    with pytest.raises(Exception, match="site 'h'.*non-positive scale"):
        jax.block_until_ready(act(g, params))


def test_singular_gl():
    params, gauge = _gauge(gj.GL(5))
    g = {"h": jnp.diag(jnp.array([1.0, 1.0, 0.0, 1.0, 1.0]))}
    with pytest.raises(Exception, match="site 'h'.*singular"):
        gauge.act(g, params)


def test_nan_in_element_and_params():
    params, gauge = _gauge(gj.PositiveDiagonal(5))
    with pytest.raises(Exception, match="site 'h'.*NaN"):
        gauge.act({"h": jnp.array([1.0, jnp.nan, 1.0, 1.0, 1.0])}, params)
    bad = [(params[0][0].at[0, 0].set(jnp.inf), params[0][1]), params[1]]
    with pytest.raises(ValueError, match=r"leaf '\[0\]\[0\]' contains NaN or inf"):
        gauge.check_params(bad)
    fn = lambda p, x: x @ p[0][0].T
    with pytest.raises(ValueError, match=r"leaf '\[0\]\[0\]'"):
        gj.check_invariance(fn, gauge, bad, jnp.ones((2, 3)), key=jax.random.key(0))


def test_invalid_permutation():
    params, gauge = _gauge(gj.Permutation(5))
    with pytest.raises(Exception, match="not a permutation"):
        gauge.act({"h": jnp.array([0, 0, 1, 2, 3], jnp.int32)}, params)


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_num_samples(n):
    params, gauge = _gauge(gj.Permutation(5))
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        gj.check_invariance(lambda p, x: x, gauge, params, jnp.ones(2), key=jax.random.key(0), num_samples=n)


def test_mixed_dtypes():
    params, gauge = _gauge(gj.PositiveDiagonal(5), jnp.float32)
    g = gauge.sample(jax.random.key(0), dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"dtype mismatch.*site 'h'.*float64.*leaf '\[0\]\[0\]'.*float32"):
        gauge.act(g, params)


def test_activation_group_not_a_symmetry():
    params = _pairs()
    with pytest.raises(ValueError, match=r"site 'h1'.*gelu.*does not admit PositiveDiagonal"):
        gj.feedforward_gauge(params, jax.nn.gelu, group=gj.PositiveDiagonal)
    with pytest.raises(ValueError, match=r"site 'h1'.*tanh.*does not admit PositiveMonomial"):
        gj.feedforward_gauge(params, jnp.tanh, group=gj.PositiveMonomial)
    # allowed when asked for explicitly
    gj.feedforward_gauge(params, jax.nn.gelu, group=gj.PositiveDiagonal, unsafe=True)


def test_wrong_structure_and_element_sites():
    params, gauge = _gauge(gj.PositiveDiagonal(5))
    with pytest.raises(ValueError, match="structure"):
        gauge.act(gauge.identity(), params[:1])
    with pytest.raises(ValueError, match="missing"):
        gauge.act({}, params)
    with pytest.raises(ValueError, match="site 'h'.*expected an element with shapes"):
        gauge.act({"h": jnp.ones(4)}, params)


def test_no_gauge_for_unknown_model():
    with pytest.raises(TypeError, match="no gauge is known"):
        gj.derive_gauge(object())


def test_mixed_param_dtypes_in_sweep():
    params = [(jnp.ones((5, 3), jnp.float32), jnp.ones(5, jnp.float64)), (jnp.ones((2, 5)), jnp.ones(2))]
    gauge = gj.feedforward_gauge(params, jax.nn.relu, group=gj.Permutation)
    with pytest.raises(ValueError, match="mix float dtypes"):
        gj.check_invariance(lambda p, x: x, gauge, params, np.ones(2), key=jax.random.key(0))
