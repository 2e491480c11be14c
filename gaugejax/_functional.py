"""Functional dimension: the rank of the Jacobian of the outputs w.r.t. the parameters.

Directions along a gauge orbit do not change the function, so
$\\mathrm{rank}\\, J \\le \\dim\\theta - \\dim(\\text{orbit})$ for every input set; generic
ReLU networks whose hidden widths do not increase reach it on enough random inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from . import _checks
from ._gauge import params_float_dtype


@dataclasses.dataclass(frozen=True)
class FunctionalDimension:
    """Result of [`gaugejax.functional_dimension`][].

    **Fields:** `rank` (numerical rank of the Jacobian), `num_params`, `num_outputs` (rows
    of the Jacobian), `singular_values` (descending), `tol` (the absolute threshold used)
    and `gap` (ratio of the last singular value counted to the first one dropped: large
    means the rank is unambiguous).
    """

    rank: int
    num_params: int
    num_outputs: int
    singular_values: np.ndarray = dataclasses.field(repr=False)
    tol: float
    gap: float


def functional_dimension(
    fn: Callable[[PyTree, Any], Any], params: PyTree, inputs: Any, *, rtol: float | None = None,
    per_example: bool = False,
) -> FunctionalDimension:
    """Numerical rank of $\\partial f(\\theta, X) / \\partial \\theta$ over a batch of inputs.

    **Arguments:**

    - `fn`: `fn(params, inputs) -> outputs` for the whole batch (or for one input, with
      `per_example=True`).
    - `params`: the parameters (differentiated over every inexact array leaf).
    - `inputs`: a batch of inputs (leading axis); use enough of them that
      `outputs.size >= number of parameters`. Use float64 for a clean rank.
    - `rtol`: relative threshold on singular values (default: NumPy's, `max(M, N) * eps`).
    - `per_example`: `fn` takes one input and the Jacobian is assembled from the inputs'
      own Jacobians, vmapped over the batch (rows in the same order). Far cheaper when
      each input has few outputs: one reverse pass per output of one input, instead of
      one forward pass of the whole batch per parameter. Only for models that treat their
      inputs independently (no batch statistics).

    The Jacobian is compiled once per `fn` object (it is a static argument of
    `equinox.filter_jit`): a new `lambda` or `functools.partial` on every call recompiles
    every time. Pass the same function object to reuse the compilation.
    """
    if rtol is not None and not (np.ndim(rtol) == 0 and 0 <= float(rtol) < 1):
        raise ValueError(f"`rtol` must be a number in [0, 1) (relative to the largest singular value), got {rtol!r}.")
    dtype = params_float_dtype(params)  # one float dtype (mixed ones: an error naming the leaves)
    jac = np.asarray(_jacobian(fn, params, inputs, per_example))
    # the rank threshold follows the coarser of the parameters' and the outputs' precision
    # (float32 parameters with float64 outputs carry float32 rounding: with float64's eps it
    # counted rounding noise as rank, above dim(params) - dim(orbit))
    eps = max(float(jnp.finfo(dtype).eps), float(jnp.finfo(jac.dtype).eps))
    if jac.dtype not in (np.float32, np.float64):  # NumPy's SVD has no float16 / bfloat16
        jac = jac.astype(np.float32)
    n_out = jac.shape[0]
    flat_size = jac.shape[1]
    s = np.linalg.svd(jac, compute_uv=False)
    if rtol is None:
        rtol = max(jac.shape) * eps
        if rtol >= 1:
            raise ValueError(
                f"the default rank threshold max(M, N) * eps = {max(jac.shape)} x {eps:.1e} is not below 1 "
                f"for {jnp.dtype(dtype)}: no singular value would count. Cast the parameters to float32 "
                "or float64 (a half-precision Jacobian's rounding hides its rank), or pass `rtol`."
            )
    rtol = float(rtol)
    tol = float(rtol * s[0]) if s.size else 0.0
    rank = int(np.sum(s > tol))
    gap = float(s[rank - 1] / s[rank]) if 0 < rank < s.size and s[rank] > 0 else float("inf")
    return FunctionalDimension(rank, int(flat_size), int(n_out), s, tol, gap)


@eqx.filter_jit
def _jacobian(fn, params, inputs, per_example: bool = False):
    """The Jacobian of the flattened outputs w.r.t. the flattened parameters, `(rows,
    params)`: of `fn(params, inputs)`, or stacked over the inputs' own (`per_example`)."""
    arrays, static = eqx.partition(params, eqx.is_inexact_array)
    flat, unravel = jax.flatten_util.ravel_pytree(arrays)

    def f(v, x):
        return jax.flatten_util.ravel_pytree(fn(eqx.combine(unravel(v), static), x))[0]

    def jac(x):  # reverse mode for fewer outputs than parameters, forward otherwise
        n_out = jax.eval_shape(f, flat, x).size
        return (jax.jacrev if n_out < flat.size else jax.jacfwd)(f)(flat, x)

    if not per_example:
        return jac(inputs)
    return jax.vmap(jac)(inputs).reshape(-1, flat.size)  # (batch x outputs of one input, params)


def probe_inputs(key: Any, num: int, dim: int, *, dtype: Any = None, max_scale: float = 50.0) -> Any:
    """Inputs for [`gaugejax.functional_dimension`][]: Gaussian directions with radii
    log-uniform in `[1, max_scale]`.

    The Jacobian rank of a ReLU network is a property of the activation regions the inputs
    visit: unit-scale Gaussian inputs around the origin can leave some units (nearly) always
    on, and then measure less than the network's functional dimension. Spreading the radii
    over several orders of magnitude visits the regions far from the origin too.

    **Arguments:**

    - `key`: a JAX PRNG key.
    - `num`: the number of inputs (a positive integer).
    - `dim`: the dimension of each input (a positive integer).
    - `dtype`: the float dtype of the inputs (default JAX's default float).
    - `max_scale`: the largest radius (a number >= 1).

    **Returns:** a `(num, dim)` array: each row a standard Gaussian vector times a radius
    $e^u$, with $u$ uniform in $[0, \\log m]$ and $m$ = `max_scale`.
    """
    if not (np.ndim(max_scale) == 0 and float(max_scale) >= 1):  # NaN fails too
        raise ValueError(f"`max_scale` must be a number >= 1 (the largest radius), got {max_scale!r}.")
    for name, v in (("num", num), ("dim", dim)):
        _checks.integer(v, name)
    k_r, k_x = jax.random.split(key)
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    radii = jnp.exp(jax.random.uniform(k_r, (num, 1), dtype, 0.0, float(np.log(max_scale))))
    return radii * jax.random.normal(k_x, (num, dim), dtype)
