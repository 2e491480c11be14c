"""MATH.md S18: tokens as particles; the time-dependent G(t) gauge and the residual-stack limit."""

import jax
import jax.numpy as jnp
import numpy as np

from gaugejax._particles import LieLoop, gauge_transform, particle_flow, residual_stack


N, D, T = 5, 3, 1.0


def _system(key):
    k = jax.random.split(key, 5)
    B = 0.5 * jax.random.normal(k[0], (D, D), jnp.float64)
    V = 0.5 * jax.random.normal(k[1], (D, D), jnp.float64)
    C = 0.3 * jax.random.normal(k[2], (D, D), jnp.float64)
    x0 = jax.random.normal(k[3], (N, D), jnp.float64)
    K = 0.7 * jax.random.normal(k[4], (D, D), jnp.float64)
    return B, V, C, x0, K


def test_s18_time_dependent_gauge_preserves_the_flow_map(getkey):
    B, V, C, x0, K = _system(getkey())
    const = lambda t: (B, V, C)  # noqa: E731
    y = particle_flow(const, x0, T)
    y_gauged = particle_flow(gauge_transform(B, V, C, LieLoop(K, T)), x0, T)
    assert float(jnp.max(jnp.abs(y_gauged - y))) <= 1e-7
    # the coefficients really changed along the way
    Bp, _, Cp = gauge_transform(B, V, C, LieLoop(K, T))(jnp.asarray(0.3 * T))
    assert float(jnp.max(jnp.abs(Bp - B))) > 1e-2 and float(jnp.max(jnp.abs(Cp - C))) > 1e-2
    # negative control: G(T) != I (boundary condition violated) changes the flow map
    y_open = particle_flow(gauge_transform(B, V, C, LieLoop(K, T, closed=False)), x0, T)
    assert float(jnp.max(jnp.abs(y_open - y))) > 1e-2


def test_residual_stack_converges_at_rate_one_over_L(getkey):
    B, V, C, x0, _ = _system(getkey())
    const = lambda t: (B, V, C)  # noqa: E731
    y = particle_flow(const, x0, T)
    Ls = [16, 32, 64, 128]
    stack = jax.jit(residual_stack, static_argnums=(0, 2))
    errs = [float(jnp.max(jnp.abs(stack(const, x0, T, L) - y))) for L in Ls]
    slope = np.polyfit(np.log(Ls), np.log(errs), 1)[0]
    assert -1.1 <= slope <= -0.9, (slope, errs)
