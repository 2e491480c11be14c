"""Symmetry teleportation: move along the orbit, where the loss is constant, to a point
that is better by another measure (MATH.md, "Orbit geometry").

Each step is an exact group action, $\\theta \\mapsto \\exp(\\eta\\,\\hat\\xi)\\cdot\\theta$, with
$\\hat\\xi$ the (normalised) gradient of the objective with respect to the Lie-algebra
coordinates at the identity. The actions are data-independent (only the objective sees
data), so an invariant loss is unchanged to floating-point rounding, whatever the step.

References: Zhao, Dehmamy, Walters, Yu, "Symmetry teleportation for accelerated
optimization" (NeurIPS 2022); Armenta et al., "Neural teleportation" (2023).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from . import _checks
from ._gauge import Gauge
from ._horizontal import _dtype, _require_continuous


def _check_scalar(fn: Callable, params: PyTree, name: str) -> None:
    try:
        out = eqx.filter_eval_shape(fn, params)
    except Exception as e:  # the objective could not even be traced on these params
        raise ValueError(f"`{name}` could not be evaluated on the parameters: {e}") from e
    if not (isinstance(out, jax.ShapeDtypeStruct) and out.shape == () and jnp.issubdtype(out.dtype, jnp.floating)):
        got = out if isinstance(out, jax.ShapeDtypeStruct) else type(out).__name__
        raise ValueError(f"`{name}` must return a real scalar (shape ()), got {got}.")


class _GradNormSquared(eqx.Module):
    # a Module, not a closure: two objectives of one loss compare equal, so a jitted
    # teleport called again with the same loss reuses its compilation
    loss_fn: Callable[[PyTree], Array]

    def __call__(self, params):
        g = eqx.filter_grad(self.loss_fn)(params)
        return sum(jnp.sum(x**2) for x in jtu.tree_leaves(g) if eqx.is_inexact_array(x))


def grad_norm_squared(loss_fn: Callable[[PyTree], Array]) -> Callable[[PyTree], Array]:
    """The objective $\\theta \\mapsto \\|\\nabla L(\\theta)\\|^2$ of Zhao et al.: teleporting
    to where the gradient is larger speeds up the next descent steps."""
    return _GradNormSquared(loss_fn)


def teleport(
    gauge: Gauge,
    params: PyTree,
    loss_fn: Callable[[PyTree], Array] | None = None,
    *,
    objective: Callable[[PyTree], Array] | None = None,
    steps: int = 10,
    lr: float = 0.1,
    normalize: bool = True,
) -> tuple[PyTree, dict[str, Any]]:
    """Teleport `params` along its orbit to (locally) maximise `objective`.

    Gradient ascent in the Lie algebra: at each of `steps` steps, $\\xi = \\nabla_\\xi\\,
    \\mathrm{objective}(\\exp(\\xi)\\cdot\\theta)|_{\\xi=0}$ and
    $\\theta \\leftarrow \\exp(\\eta\\,\\xi/\\|\\xi\\|)\\cdot\\theta$ (or $\\exp(\\eta\\xi)$ without
    `normalize`). Only continuous sites move.

    **Arguments:**

    - `gauge`: a [`gaugejax.Gauge`][] with a continuous site (else a `ValueError`).
    - `params`: the starting point (the model, or its `equinox.filter`-ed array part: the
      objective and the result then see it filtered).
    - `loss_fn`: `params -> scalar` (close over a batch). With no `objective`, the
      objective is $\\|\\nabla L\\|^2$ ([`gaugejax.grad_norm_squared`][]).
    - `objective`: any `params -> scalar` to maximise instead; a non-scalar output raises a
      `ValueError`.
    - `steps`, `lr`: number of ascent steps and the step length in the algebra.
    - `normalize`: take steps of length `lr` (a trust region: the objective can grow
      without bound along a non-compact orbit) rather than `lr` times the gradient.

    **Returns:** `(teleported_params, g)` with `teleported_params == gauge.act(g, params)`.
    """
    _require_continuous(gauge, "teleport")
    filtered = gauge._filtered_io(params)
    if filtered is not None:  # an equinox.filter-ed model: the objective sees it filtered
        full, restore = filtered
        user_loss, user_obj = loss_fn, objective
        loss_fn = None if user_loss is None else (lambda p: user_loss(restore(p)))
        objective = None if user_obj is None else (lambda p: user_obj(restore(p)))
        moved, g = teleport(gauge, full, loss_fn, objective=objective, steps=steps, lr=lr, normalize=normalize)
        return restore(moved), g
    if objective is None:
        if loss_fn is None:
            raise ValueError("teleport needs `loss_fn` (for the default objective |grad L|^2) or `objective`.")
        _check_scalar(loss_fn, params, "loss_fn")
        objective = grad_norm_squared(loss_fn)
    if not callable(objective):
        raise TypeError(f"`objective` must be a callable params -> scalar, got {type(objective).__name__}.")
    _check_scalar(objective, params, "objective")
    steps = _checks.integer(steps, "steps", 0)
    _check_lr(lr)
    # lr as an array: a new step length is not a new compilation
    return _teleport(gauge, params, objective, steps, jnp.asarray(lr), normalize)


def _check_lr(lr: Any) -> None:
    """A scalar step length, finite where it is concrete (NaN made NaN parameters)."""
    if jnp.ndim(lr) != 0:
        raise ValueError(f"`lr` must be a scalar, got shape {jnp.shape(lr)}.")
    if not isinstance(lr, jax.core.Tracer) and not np.isfinite(np.asarray(lr)):
        raise ValueError(f"`lr` must be finite, got {lr!r}.")


@eqx.filter_jit
def _teleport(gauge, params, objective, steps, lr, normalize):
    dtype = _dtype(params)
    zeros = gauge.algebra_zeros(dtype)

    # the scan carries the arrays; other leaves (an equinox model's activation) are static
    dynamic, static = eqx.partition(params, eqx.is_array)

    def step(carry, _):
        d, g = carry
        p = eqx.combine(d, static)
        xi = jax.grad(lambda x: objective(gauge.act(gauge.exp(x, dtype), p, check=False)))(zeros)
        if normalize:
            norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jtu.tree_leaves(xi)))
            xi = jtu.tree_map(lambda x: x / jnp.maximum(norm, jnp.finfo(dtype).tiny), xi)
        h = gauge.exp(jtu.tree_map(lambda x: lr.astype(dtype) * x, xi), dtype)
        moved = eqx.filter(gauge.act(h, p, check=False), eqx.is_array)
        return (moved, gauge.compose(h, g)), None

    (dynamic, g), _ = jax.lax.scan(step, (dynamic, gauge.identity(dtype)), None, length=steps)
    return eqx.combine(dynamic, static), g
