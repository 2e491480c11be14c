"""The balanced point by structured Newton (gaugejax/_rescaling.py) against the autodiff
Newton it replaces, and at widths where the autodiff Hessian does not fit in memory."""

import jax
import jax.numpy as jnp
import pytest

import gaugejax as gj
from gaugejax import _balance, _rescaling


F64 = jnp.float64


def _mlp(sizes, key):
    return gj.nn.MLP(sizes, jax.nn.relu, key=key, dtype=F64)


@pytest.mark.slow
def test_structured_newton_equals_autodiff_newton(getkey):
    model = _mlp([6, 16, 12, 3], getkey())
    gauge = gj.derive_gauge(model, group=gj.PositiveDiagonal)
    far = gauge.act(gauge.sample(getkey(), scale=1.5, dtype=F64), model)
    sites = _rescaling.rescaling_sites(gauge)
    assert _rescaling.is_structured(gauge, sites)
    xi_s = _balance._newton_structured(gauge, far, sites, 1e-12, 1e-12, 256)
    xi_a = _balance._newton_generic(gauge, far, sites, 1e-12, 1e-12, 256)
    for n in sites:
        assert float(jnp.max(jnp.abs(xi_s[n] - xi_a[n]))) <= 1e-9


def test_wide_and_far_from_balanced(getkey):
    """2 x 384 hidden units with log-scales of size 3: the old Hessian took 768 JVPs of the
    action per Newton step; the structured one is a CG solve on the squared parameters."""
    model = _mlp([32, 384, 384, 10], getkey())
    gauge = gj.derive_gauge(model)  # positive monomial sites: balance uses their scales
    far = gauge.act(gauge.sample(getkey(), scale=3.0, dtype=F64), model)
    assert float(gj.balance_residual(gauge, far)) > 0.5
    balanced, g = gj.balance(gauge, far)
    assert float(gj.balance_residual(gauge, balanced)) <= 1e-10
    x = jax.random.normal(getkey(), (16, 32), F64)
    assert float(jnp.max(jnp.abs(balanced(x) - far(x)))) <= 1e-10 * float(jnp.max(jnp.abs(far(x))))
    sq = lambda m: float(sum(jnp.sum(a**2) for a in jax.tree.leaves(m)))  # noqa: E731
    assert sq(balanced) < sq(far)
    # the returned element takes the input there
    moved = gauge.act(g, far)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(balanced))) == 0.0


@pytest.mark.slow
def test_vmapped_balance(getkey):
    model = _mlp([5, 8, 7, 2], getkey())
    gauge = gj.derive_gauge(model, group=gj.PositiveDiagonal)
    gs = jax.vmap(lambda k: gauge.sample(k, scale=1.0, dtype=F64))(jax.random.split(getkey(), 4))
    batch = jax.vmap(lambda g: gauge.act(g, model))(gs)
    balanced, _ = jax.vmap(lambda p: gj.balance(gauge, p))(batch)
    res = jax.vmap(lambda p: gj.balance_residual(gauge, p))(balanced)
    assert float(jnp.max(res)) <= 1e-10
    # one orbit, one balanced point
    first = jax.tree.map(lambda a: a[0], balanced)
    for i in range(1, 4):
        other = jax.tree.map(lambda a: a[i], balanced)  # noqa: B023
        assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other))) <= 1e-8


def test_float32_inexact_newton_stays_finite(getkey):
    """In float32 the CG solve of an ill-conditioned Gram matrix can return a non-descent
    (or huge) step near the minimum, where F no longer resolves the decrease; such steps
    must be rejected (a trained digits MLP once balanced to NaN)."""
    model = gj.nn.MLP([60, 16, 16, 10], jax.nn.relu, key=getkey(), dtype=jnp.float32)
    gauge = gj.derive_gauge(model)
    for _ in range(3):
        far = gauge.act(gauge.sample(getkey(), scale=2.0, dtype=jnp.float32), model)
        balanced, _ = gj.balance(gauge, far)
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(balanced))
        assert float(gj.balance_residual(gauge, balanced)) <= 1e-5
