"""MATH.md S18: tokens as particles; the time-dependent G(t) gauge and the residual-stack limit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj


N, D, T = 5, 3, 1.0


def _system(key):
    k = jax.random.split(key, 4)
    B = 0.5 * jax.random.normal(k[0], (D, D), jnp.float64)
    V = 0.5 * jax.random.normal(k[1], (D, D), jnp.float64)
    C = 0.3 * jax.random.normal(k[2], (D, D), jnp.float64)
    x0 = jax.random.normal(k[3], (N, D), jnp.float64)
    return B, V, C, x0


def test_s18_time_dependent_gauge_preserves_the_flow_map(getkey):
    B, V, C, x0 = _system(getkey())
    y = gj.particle_flow(gj.particle_coefficients(B, V, C), x0, T)
    # G(t) = exp X(t), X(0) = X(T) = 0: a closed loop in GL(d) (the neural-ODE module's path)
    loop = gj.SmoothLiePath.random(D, num_modes=2, scale=1.0, T=T, key=getkey(), dtype=jnp.float64)
    gauged = gj.particle_gauge_transform(B, V, C, loop)
    y_gauged = gj.particle_flow(gauged, x0, T)
    assert float(jnp.max(jnp.abs(y_gauged - y))) <= 1e-7
    # the coefficients really changed along the way
    Bp, _, Cp = gauged(jnp.asarray(0.3 * T))
    assert float(jnp.max(jnp.abs(Bp - B))) > 1e-2 and float(jnp.max(jnp.abs(Cp - C))) > 1e-2
    # negative control: G(T) != I (boundary condition violated) changes the flow map
    open_path = gj.SmoothLiePath(loop.coeffs, T, end=0.7 * jax.random.normal(getkey(), (D, D), jnp.float64))
    y_open = gj.particle_flow(gj.particle_gauge_transform(B, V, C, open_path), x0, T)
    assert float(jnp.max(jnp.abs(y_open - y))) > 1e-2


def test_zero_and_negative_times(getkey):
    """T = 0 is the identity; a negative T solves backward, the inverse of the flow to -T."""
    B, V, C, x0 = _system(getkey())
    c = gj.particle_coefficients(B, V, C)
    assert float(jnp.max(jnp.abs(gj.particle_flow(c, x0, 0.0) - x0))) == 0.0
    y = gj.particle_flow(c, x0, T)
    assert float(jnp.max(jnp.abs(y - x0))) > 1e-1
    assert float(jnp.max(jnp.abs(gj.particle_flow(c, y, -T) - x0))) <= 1e-8


def test_residual_stack_converges_at_rate_one_over_L(getkey):
    B, V, C, x0 = _system(getkey())
    const = gj.particle_coefficients(B, V, C)
    y = gj.particle_flow(const, x0, T)
    Ls = [16, 32, 64, 128]
    stack = jax.jit(gj.particle_residual_stack, static_argnums=(0, 2))
    errs = [float(jnp.max(jnp.abs(stack(const, x0, T, L) - y))) for L in Ls]
    slope = np.polyfit(np.log(Ls), np.log(errs), 1)[0]
    assert -1.1 <= slope <= -0.9, (slope, errs)


def test_bad_input():
    with pytest.raises(ValueError, match="`B`"):
        gj.particle_gauge_transform(jnp.zeros((2, 3)), jnp.zeros((3, 3)), jnp.zeros((3, 3)), lambda t: jnp.eye(3))
    at = gj.particle_gauge_transform(jnp.zeros((3, 3)), jnp.zeros((3, 3)), jnp.zeros((3, 3)),
                                     lambda t: jnp.eye(2) * (1.0 + t))
    with pytest.raises(ValueError, match="path"):
        at(jnp.asarray(0.5))
    B, V, C, x0 = _system(jax.random.key(0))
    coeffs = gj.particle_coefficients(B, V, C)
    for bad in (x0[0], jnp.ones((N, D + 1))):  # a raw einsum error before
        with pytest.raises(ValueError, match=r"`x0` must be \(n, d\) particles with d = 3"):
            gj.particle_flow(coeffs, bad, T)
        with pytest.raises(ValueError, match=r"`x0` must be \(n, d\)"):
            gj.particle_residual_stack(coeffs, bad, T, 4)
    for L in (0, -3):  # returned x0 unchanged
        with pytest.raises(ValueError, match="`L` must be a positive integer"):
            gj.particle_residual_stack(coeffs, x0, T, L)
    for L in (3.0, True, np.float64(2.0)):  # passed the check, then a TypeError in fori_loop
        with pytest.raises(ValueError, match="`L` must be a positive integer"):
            gj.particle_residual_stack(coeffs, x0, T, L)
    with pytest.raises(ValueError, match="`L` must be a positive integer"):  # traced, but a float
        jax.jit(gj.particle_residual_stack, static_argnums=0)(coeffs, x0, T, jnp.asarray(3.0, jnp.float64))
    for bad_T in (float("nan"), jnp.asarray(jnp.inf, jnp.float64)):  # NaN returned x0 unchanged
        with pytest.raises(ValueError, match="particle_flow: `T` must be a finite number"):
            gj.particle_flow(coeffs, x0, bad_T)
        with pytest.raises(ValueError, match="particle_residual_stack: `T` must be a finite number"):
            gj.particle_residual_stack(coeffs, x0, bad_T, 4)


def test_integer_inputs_and_float32():
    B, V, C, x0 = _system(jax.random.key(1))
    coeffs = gj.particle_coefficients(B, V, C)
    ints = jnp.asarray([[1, 0, 2], [0, 1, 1]])
    np.testing.assert_array_equal(gj.particle_residual_stack(coeffs, ints, T, 4),
                                  gj.particle_residual_stack(coeffs, ints.astype(jnp.float64), T, 4))
    path = gj.SmoothLiePath.random(D, key=jax.random.key(2), dtype=jnp.float64)
    at = gj.particle_gauge_transform(B, V, C, path)
    np.testing.assert_array_equal(at(1)[2], at(1.0)[2])  # an integer time failed in jax.jvp
    f32 = gj.particle_coefficients(*(m.astype(jnp.float32) for m in (B, V, C)))
    assert gj.particle_flow(f32, x0.astype(jnp.float32), T, rtol=1e-5, atol=1e-5).dtype == jnp.float32
    # float32 particles with float64 coefficients are promoted (a diffrax / scan error before)
    x32 = x0.astype(jnp.float32)
    np.testing.assert_array_equal(gj.particle_residual_stack(coeffs, x32, T, 4),
                                  gj.particle_residual_stack(coeffs, x32.astype(jnp.float64), T, 4))
    assert gj.particle_flow(coeffs, x32, T).dtype == jnp.float64
