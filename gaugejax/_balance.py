"""Moment maps and the balanced (minimum-norm) point of an orbit (MATH.md, S4 and S19).

For a continuous site with Lie algebra element $\\xi$, the moment map is the gradient
$\\mu = \\nabla_\\xi \\tfrac12 \\|\\exp(\\xi)\\cdot\\theta\\|^2\\big|_{\\xi = 0}$, i.e. the
adjoint of the vertical map applied to $\\theta$. For positive rescalings of hidden
neuron $i$ of layer $l$ it is $\\|W_l[i,:]\\|^2 + b_l[i]^2 - \\|W_{l+1}[:,i]\\|^2$; it
vanishes exactly at the minimum of $\\|\\theta\\|^2$ over the orbit (Kempf-Ness), which is
a convex problem in the log-scales.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, PyTree

from ._gauge import Gauge, _expand, params_float_dtype as _dtype
from ._groups import PositiveDiagonal, PositiveMonomial


def _sq_norm(tree: PyTree) -> Array:
    return sum(jnp.sum(x**2) for x in jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array)))


@eqx.filter_jit
def moment_map(gauge: Gauge, params: PyTree) -> dict[str, Array]:
    """The moment map of every continuous site at `params`, as a Lie-algebra element
    `{site: array}`: $\\mu = \\nabla_\\xi \\tfrac12\\|\\exp(\\xi)\\cdot\\theta\\|^2$ at $\\xi = 0$.

    It is a conserved quantity (Noether charge) of gradient flow on a gauge-invariant
    loss, and zero exactly at the balanced point.
    """
    zeros = gauge.algebra_zeros(_dtype(params))

    def half_norm(xi):
        return 0.5 * _sq_norm(gauge.act(gauge.exp(xi), params, check=False))

    return jax.grad(half_norm)(zeros)


def balance(
    gauge: Gauge,
    params: PyTree,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 256,
) -> tuple[PyTree, dict[str, Any]]:
    """The minimum-norm point of the orbit of `params` under the positive-scaling sites.

    Minimises $\\|\\exp(\\xi)\\cdot\\theta\\|^2$ over the log-scales $\\xi$ of every
    [`gaugejax.PositiveDiagonal`][] and [`gaugejax.PositiveMonomial`][] site with
    Newton's method on the (convex) objective, run to tolerance rather than for a fixed
    number of sweeps. At the result the moment map vanishes: each hidden neuron's
    incoming and outgoing squared norms are equal (MATH.md, S4).

    **Returns:** `(balanced_params, g)` with `balanced_params == gauge.act(g, params)`.
    """
    positive = [
        n for n, grp in gauge.sites if isinstance(grp, (PositiveDiagonal, PositiveMonomial))
    ]
    dtype = _dtype(params)
    if not positive:
        return params, gauge.identity(dtype)
    eps = jnp.finfo(dtype).eps
    rtol = float(eps**0.75) if rtol is None else rtol
    atol = float(eps**0.75) if atol is None else atol
    zeros = {n: gauge.site_groups[n].algebra_zeros(dtype) for n in positive}
    scale = _sq_norm(params)

    def objective(xi, _):
        return _sq_norm(gauge.act(gauge.exp(xi, dtype), params, check=False)) / scale

    def gradient(xi, _):
        return jax.grad(objective)(xi, None)

    # The gradient is the (normalised) moment map; Newton on it converges quadratically
    # on this strictly convex problem.
    sol = optx.root_find(
        gradient, optx.Newton(rtol=rtol, atol=atol), zeros, max_steps=max_steps, throw=False
    )
    xi = sol.value
    g = gauge.exp(xi, dtype)
    return gauge.act(g, params, check=False), g


@eqx.filter_jit
def balance_residual(gauge: Gauge, params: PyTree) -> Array:
    """The largest relative moment-map residual over positive-scaling neurons:
    $\\max_i |\\mu_i| / (\\|\\mathrm{in}_i\\|^2 + \\|\\mathrm{out}_i\\|^2)$, where the
    denominator is the sum of the two squared norms the moment map compares."""
    mu = moment_map(gauge, params)
    positive = [n for n, grp in gauge.sites if isinstance(grp, (PositiveDiagonal, PositiveMonomial))]
    if not positive:
        return jnp.zeros(())
    dtype = _dtype(params)
    # |in|^2 + |out|^2 per neuron: the moment map of the squared parameters with every
    # consumed axis counted positively, obtained from act with scale e on produce and e on consume.
    total = _abs_moment(gauge, params, positive, dtype)
    return jnp.max(jnp.stack([jnp.max(jnp.abs(mu[n]) / total[n]) for n in positive]))


def _abs_moment(gauge: Gauge, params: PyTree, sites: list[str], dtype: Any) -> Mapping[str, Array]:
    # d/dxi 1/2 |g theta|^2 with g acting on produced axes by e^xi and consumed by e^xi too
    # (instead of e^-xi) gives |in|^2 + |out|^2.
    zeros = {n: gauge.site_groups[n].algebra_zeros(dtype) for n in sites}

    def half_norm(xi):
        full = {n: gauge.site_groups[n].exp(xi[n]) if n in xi else gauge.site_groups[n].identity(dtype) for n, _ in gauge.sites}
        total = jnp.zeros((), dtype)
        leaves = jtu.tree_leaves(params)
        for plan in gauge.plans:
            x = leaves[plan.index]
            scale = jnp.ones((), dtype)
            for lin in plan.linear:
                if lin.site in xi:
                    f = gauge.site_groups[lin.site].factors(full[lin.site], "produce")
                    scale = scale * _expand(f.scale, (*lin.batch_axes, lin.axis), x.ndim)
            total = total + jnp.sum((scale * x) ** 2)
        return 0.5 * total

    return jax.grad(half_norm)(zeros)
