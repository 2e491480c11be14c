"""Property-based tests over random widths, depths and activations."""

import jax
import jax.numpy as jnp
from hypothesis import HealthCheck, given, settings, strategies as st

import gaugejax as gj


ACTIVATIONS = [jax.nn.relu, jax.nn.leaky_relu, jnp.tanh, jax.nn.gelu, jax.nn.sigmoid, gj.identity]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    n_in=st.integers(1, 4),
    n_out=st.integers(1, 3),
    act=st.sampled_from(ACTIVATIONS),
    seed=st.integers(0, 2**16),
)
def test_random_mlps_invariant_and_lawful(widths, n_in, n_out, act, seed):
    key = jax.random.key(seed)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    model = gj.nn.MLP([n_in, *widths, n_out], act, key=k1, dtype=jnp.float64)
    gauge = gj.derive_gauge(model)
    x = jax.random.normal(k2, (5, n_in), jnp.float64)
    g = gauge.sample(k3, dtype=jnp.float64)
    h = gauge.sample(k4, dtype=jnp.float64)
    y = model(x)
    scale = float(jnp.max(jnp.abs(y))) + 1e-300
    # invariance (identity activations carry GL: allow its conditioning)
    tol = 1e-9 if act is gj.identity else 1e-12
    assert float(jnp.max(jnp.abs(gauge.act(g, model)(x) - y))) <= tol * scale * 10
    # the group laws
    lhs = gauge.act(gauge.compose(g, h), model)
    rhs = gauge.act(g, gauge.act(h, model))
    for a, b in zip(jax.tree.leaves(lhs), jax.tree.leaves(rhs)):
        assert jnp.allclose(a, b, rtol=1e-10, atol=1e-12)
    back = gauge.act(gauge.inverse(g), gauge.act(g, model))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(model)):
        assert jnp.allclose(a, b, rtol=1e-10, atol=1e-12)
