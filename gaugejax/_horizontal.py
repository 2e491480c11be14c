"""Vertical and horizontal tangent vectors (MATH.md, "Orbit geometry").

At parameters $\\theta$ the *vertical map* $V: \\mathfrak g \\to T_\\theta$,
$V\\xi = \\frac{d}{d\\epsilon}\\mathrm{act}(\\exp(\\epsilon\\xi), \\theta)|_{\\epsilon=0}$ (a JVP,
[`gaugejax.Gauge.vertical`][]), spans the tangent space of the orbit. Its adjoint
$V^\\top$ is the VJP of the same linear map. The horizontal projection of a tangent vector
$v$ removes its vertical part,

$$h = v - V\\xi^\\star, \\qquad V^\\top V\\,\\xi^\\star = V^\\top v,$$

the normal equations of $\\min_\\xi \\|v - V\\xi\\|$. Two ways to solve them:

- *matrix-free* (any gauge): conjugate gradients (`lineax.CG`) on the normal operator
  $V^\\top V$, each application one JVP and one VJP of the action;
- *structured* (every continuous site a positive rescaling, coupled linearly): the vertical
  vector of log-scales $\\xi$ on a leaf $x$ is $x \\odot \\sum_k \\sigma_k \\xi_{s_k}$ (sum
  over the leaf's couplings, $\\sigma = +1$ produced, $-1$ consumed), so the Gram matrix
  $G = V^\\top V$ is assembled from the squared parameters alone: neuron $i$ couples to
  neuron $j$ only through the weights they share ($G_{ij} = -W_{ij}^2$ between adjacent
  layers of an MLP, $G_{ii} = \\|\\mathrm{in}_i\\|^2 + \\|\\mathrm{out}_i\\|^2$). It is solved
  by Jacobi-preconditioned CG with the $O(|\\theta|)$ structured operator (no JVPs: one
  pass over the squared parameters per step; the default), or assembled densely and
  factored exactly (Cholesky, `method="dense"`; $O(N^3)$ in the number of neurons).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jaxtyping import Array, PyTree

from . import _checks, _rescaling as _rs
from ._gauge import Gauge, _is_none, params_float_dtype as _dtype
from ._groups import PositiveDiagonal, PositiveMonomial
from ._groups._linalg import is_half, upcast_half


def _vdot(a: PyTree, b: PyTree) -> Array:
    la = [x for x in jtu.tree_leaves(a) if eqx.is_inexact_array(x)]
    lb = [x for x in jtu.tree_leaves(b) if eqx.is_inexact_array(x)]
    return sum((jnp.vdot(x, y) for x, y in zip(la, lb)), jnp.zeros((), la[0].dtype if la else None))


def _require_continuous(gauge: Gauge, what: str) -> None:
    if not isinstance(gauge, Gauge):
        raise TypeError(f"`gauge` must be a gaugejax.Gauge, got {type(gauge).__name__}.")
    if not gauge.continuous_sites:
        sites = ", ".join(f"{n}: {g!r}" for n, g in gauge.sites)
        raise ValueError(
            f"{what} needs a gauge with a continuous part (a site with a Lie algebra), but "
            f"every site of this gauge is discrete ({sites}): the orbit is a finite set, its "
            "tangent space is zero and every vector is already horizontal."
        )


def _check_tangent(gauge: Gauge, params: PyTree, v: PyTree, name: str = "v") -> None:
    """`params` completed (`Gauge._complete`); `v` has its structure, with `None` allowed
    where `params` has a leaf that is not a float array (a gradient of an equinox model)."""
    # None counts as a leaf on both sides: a None field of the parameters (bias=None) is
    # None in a gradient too
    pl, pt = jtu.tree_flatten(params, is_leaf=_is_none)
    vl, vt = jtu.tree_flatten(v, is_leaf=_is_none)
    if pt != vt:
        raise ValueError(
            f"`{name}` must have the structure of the parameters.\nexpected: {pt}\nreceived: {vt}"
        )
    for kp, a, b in zip(jtu.tree_flatten_with_path(params, is_leaf=_is_none)[0], pl, vl):
        if a is None and b is not None:
            got = f"an array of shape {tuple(jnp.shape(b))}" if hasattr(b, "shape") else type(b).__name__
            raise ValueError(f"`{name}` leaf {jtu.keystr(kp[0])!r} is {got}; the parameters hold None "
                             "there (expected None).")
    pairs = [(a, b) for a, b in zip(pl, vl) if a is not None]
    for path, (a, b) in zip(gauge.paths, pairs):
        if eqx.is_inexact_array(a) and (b is None or tuple(jnp.shape(b)) != tuple(a.shape)):
            got = "None" if b is None else f"shape {tuple(jnp.shape(b))}"
            raise ValueError(f"`{name}` leaf {path!r} is {got}; expected shape {tuple(a.shape)}.")


def _is_tracer(tree: PyTree) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jtu.tree_leaves(tree))


def _raise_if_not_finite(gauge: Gauge, params: PyTree, tree: PyTree, what: str, why: str,
                         indices: set[int] | None = None) -> None:
    """Eagerly, raise a `ValueError` naming the first float leaf of `tree` (a pytree like
    `params`; only the leaves at `indices` when given) that holds NaN or inf."""
    leaves = jtu.tree_structure(params).flatten_up_to(tree)
    for i, (path, leaf) in enumerate(zip(gauge.paths, leaves)):
        if indices is not None and i not in indices:
            continue
        # numpy, not jnp: inside an outer `jit` a concrete leaf's jnp ops are staged
        if eqx.is_inexact_array(leaf) and not np.all(np.isfinite(np.asarray(leaf))):
            n_bad = int(np.sum(~np.isfinite(np.asarray(leaf))))
            raise ValueError(f"`{what}` leaf {path!r} contains {n_bad} NaN or inf value(s); {why}")


def vertical_adjoint(gauge: Gauge, params: PyTree, v: PyTree) -> dict[str, Array]:
    """The adjoint of the vertical map, $V^\\top v$: the Lie-algebra element with
    $\\langle V^\\top v, \\xi\\rangle = \\langle v, V\\xi\\rangle$ for every $\\xi$ (a VJP).

    For the gradient of an invariant loss this is zero (the gradient is horizontal); for
    $v = \\theta$ it is the moment map ([`gaugejax.moment_map`][]).

    **Arguments:**

    - `gauge`: a [`gaugejax.Gauge`][] with at least one continuous site.
    - `params`: the base point $\\theta$.
    - `v`: a tangent vector, a pytree like `params`.

    **Returns:** `{site: array}` over the continuous sites.
    """
    _require_continuous(gauge, "vertical_adjoint")
    params = gauge._complete(params)
    _check_tangent(gauge, params, v)
    zeros = gauge.algebra_zeros(_dtype(params))
    _, vjp = jax.vjp(lambda xi: _vert(gauge, params, xi), zeros)
    (out,) = vjp(_clean(params, v))
    return out


def _vert(gauge: Gauge, params: PyTree, xi: Mapping[str, Array]) -> PyTree:
    """The vertical vector of `xi` (as [`gaugejax.Gauge.vertical`][]) as a JVP of the
    action at the identity along the tangent of `exp`; `None` on non-float leaves."""
    t = gauge.vertical(params, xi)
    return jtu.tree_map(lambda a, p: a if eqx.is_inexact_array(p) else None,
                        t, params, is_leaf=_is_none)


def _clean(params: PyTree, v: PyTree) -> PyTree:
    return jtu.tree_map(lambda a, p: jnp.asarray(a, p.dtype) if eqx.is_inexact_array(p) else None,
                        v, params, is_leaf=_is_none)


# ---------------------------------------------------------------------------------------
# the solve
# ---------------------------------------------------------------------------------------
Method = Literal["auto", "structured", "dense", "cg"]

#: the structured CG falls back to the dense Cholesky solve (when it breaks down) up to
#: this many neuron scales (a 4096 x 4096 Gram matrix: 64 MB in float32)
DENSE_FALLBACK_MAX = 4096


def vertical_coordinates(
    gauge: Gauge,
    params: PyTree,
    v: PyTree,
    *,
    method: Method = "auto",
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int | None = None,
) -> dict[str, Array]:
    """The Lie-algebra element $\\xi^\\star$ whose vertical vector is closest to `v`: the
    least-squares solution of $V\\xi \\approx v$, from $V^\\top V\\xi = V^\\top v$.

    **Arguments:**

    - `gauge`, `params`, `v`: as for [`gaugejax.horizontal`][].
    - `method`: `"structured"` (positive-rescaling sites only: Jacobi-preconditioned CG on
      the Gram operator computed from the squared parameters, no JVPs), `"dense"` (the same
      Gram matrix assembled and factored exactly by Cholesky: exact, $O(N^3)$ in the number
      of neurons), `"cg"` (matrix-free CG on $V^\\top V$ with JVPs and VJPs of the action:
      any gauge; unpreconditioned, so at points far from balance it can stop at
      `max_steps` short of its tolerance: on a 4-layer ReLU MLP moved by rescalings sampled
      at `scale=3`, in float32, the result's cosine with a vertical generator reached
      0.02-0.06, against 1e-6 structured or dense; on a linear MLP moved by $GL$ elements
      at `scale=2-3`, 1e-3 in float32 and float64, against 0.1 for `v` itself; it then
      warns, [`gaugejax.HorizontalConvergenceWarning`][]), or `"auto"`
      (structured when the gauge allows it, else CG). Where the structured CG breaks down
      (rounding in float32 far along the orbit) the dense solve takes over, up to
      `DENSE_FALLBACK_MAX` = 4096 scales (else the matrix-free CG).
    - `rtol`, `atol`, `max_steps`: CG tolerances (default $\\epsilon^{0.9}$ of the dtype)
      and its step limit (default $10 \\max(\\text{orbit dim}, 10)$). The solve runs on
      $v / \\max|v|$ (the max over the leaves the gauge acts on) and is scaled back, so
      both tolerances are relative to the size of `v`.

    NaN or inf in `params` or `v`: as for [`gaugejax.horizontal`][] (a `ValueError` eagerly,
    NaN coordinates under `jit`). Half-precision parameters are solved for in float32 and
    the coordinates cast back.

    **Returns:** `{site: array}` over the continuous sites.
    """
    _require_continuous(gauge, "vertical_coordinates")
    params = gauge._complete(params)
    _check_tangent(gauge, params, v)
    _check_method(method)
    _checks.tolerance(rtol, "rtol")
    _checks.tolerance(atol, "atol")
    if max_steps is not None:
        _checks.integer(max_steps, "max_steps")
    diag_ok = _rs.is_structured(gauge)
    if method in ("structured", "dense") and not diag_ok:
        bad = [f"{n}: {g!r}" for n, g in gauge.sites if n in gauge.continuous_sites
               and not isinstance(g, (PositiveDiagonal, PositiveMonomial))]
        viewed = [p.path for p in gauge.plans if p.view is not None]
        raise ValueError(
            f"method={method!r} needs every continuous site to be a positive rescaling "
            f"(PositiveDiagonal or PositiveMonomial) coupled by Produce/Consume on whole leaf "
            "axes; this gauge has " + (str(bad) if bad else f"couplings through views on {viewed}" if viewed
                                       else "links on rescaling sites")
            + ". Use method='cg' (matrix-free, any gauge)."
        )
    dtype = _dtype(params)
    if is_half(dtype):
        xi = vertical_coordinates(gauge, upcast_half(params), upcast_half(v), method=method, rtol=rtol, atol=atol,
                                  max_steps=max_steps)
        return {n: x.astype(dtype) for n, x in xi.items()}
    eps = float(jnp.finfo(dtype).eps)
    rtol = eps**0.9 if rtol is None else rtol
    atol = eps**0.9 if atol is None else atol
    max_steps = 10 * max(gauge.orbit_dim, 10) if max_steps is None else max_steps
    v = _clean(params, v)
    touched = sorted({plan.index for plan in gauge.plans})
    if not _is_tracer((params, v)):
        for what, tree in (("params", params), ("v", v)):
            _raise_if_not_finite(gauge, params, tree, what, "a projection needs finite parameters and "
                                 "tangents.", set(touched))
    # The solve is linear in v: it runs on v / max|v| and is scaled back, so that the
    # tolerances are relative to v (lineax's atol is absolute: a gradient of size 1e-6 was
    # projected to 0.4% in float32). The max is over the leaves the gauge acts on: the
    # others do not enter the solve.
    aligned = _aligned(params, v)
    sizes = [jnp.max(jnp.abs(aligned[i])).astype(dtype) for i in touched
             if aligned[i] is not None and aligned[i].size]
    size = jax.lax.stop_gradient(jnp.max(jnp.stack(sizes)) if sizes else jnp.ones((), dtype))
    size = jnp.where((size > 0) & jnp.isfinite(size), size, jnp.ones((), size.dtype))
    v = jtu.tree_map(lambda x: x / size, v)
    if diag_ok and method != "cg":
        xi, finite = _solve_structured(gauge, params, v, method == "dense", rtol, atol, max_steps)
    else:
        xi, finite, left = _solve_cg(gauge, params, v, rtol, atol, max_steps)
        # NaN input: NaN out, no warning
        _warn_unless_converged(jnp.where(finite, left, 0), max_steps, eps**0.5)
    # Under tracing nothing can be raised without stopping a training loop that handles
    # NaN itself (`optax.apply_if_finite`): NaN or inf in v or in the parameters reaches the
    # right-hand side V^T v, and then the coordinates (so the projection) are NaN on every
    # method. CG would otherwise stop at once and return v unprojected.
    return {n: jnp.where(finite, x * size.astype(x.dtype), jnp.nan) for n, x in xi.items()}


def _check_method(method: Any) -> None:
    if method not in ("auto", "structured", "dense", "cg"):
        raise ValueError(f"`method` must be 'auto', 'structured', 'dense' or 'cg', got {method!r}.")


def _finite_rhs(rhs: Mapping[str, Array]) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in rhs.values()]))


def _aligned(params: PyTree, v: PyTree) -> list[Any]:
    """`v`'s leaves in the order of `params`' leaves (the order the gauge's plans index)."""
    return jtu.tree_structure(params).flatten_up_to(v)


@eqx.filter_jit
def _solve_structured(gauge, params, v, force_dense, rtol, atol, max_steps):
    leaves = jtu.tree_leaves(params)
    rhs = _rs.adjoint(gauge, leaves, _aligned(params, v))
    if force_dense:
        gram, layout = _rs.gram_dense(gauge, leaves)
        return _rs.unflatten(_rs.cholesky_solve(gram, _rs.flatten(rhs, layout)), layout), _finite_rhs(rhs)
    # large: Jacobi-preconditioned CG on the structured operator; the diagonal of G is
    # |in|^2 + |out|^2 per neuron (the squared parameters it scales)
    value, _ = _rs.solve_gram(gauge, leaves, rhs, _rs.gram_diagonal(gauge, leaves), rtol=rtol, atol=atol,
                              max_steps=max_steps)
    finite = _finite_rhs(rhs)
    # Far along the orbit (parameters spread over many orders of magnitude) the Gram
    # operator assembled from squared parameters loses positive-definiteness to rounding in
    # float32, and lineax's CG signals the breakdown with NaN. The exact dense solve then
    # takes over where its matrix is small enough; else the matrix-free CG (unpreconditioned:
    # at such points it may stop at max_steps short of the tolerance, but finite).
    broke = finite & ~_finite_rhs(value)
    if _rs.num_scales(gauge) <= DENSE_FALLBACK_MAX:
        fallback = lambda: _solve_structured(gauge, params, v, True, rtol, atol, max_steps)[0]  # noqa: E731
    else:
        fallback = lambda: _solve_cg(gauge, params, v, rtol, atol, max_steps)[0]  # noqa: E731
    return jax.lax.cond(broke, fallback, lambda: value), finite


@eqx.filter_jit
def _solve_cg(gauge, params, v, rtol, atol, max_steps):
    dtype = _dtype(params)
    zeros = gauge.algebra_zeros(dtype)
    vert = lambda xi: _vert(gauge, params, xi)  # noqa: E731
    # the map is linear: its VJP (at any point) is the adjoint
    _, transpose = jax.vjp(vert, zeros)
    (rhs,) = transpose(v)

    def normal(xi):
        (out,) = transpose(vert(xi))
        return out

    op = lx.FunctionLinearOperator(normal, jax.eval_shape(lambda: zeros), tags=lx.positive_semidefinite_tag)
    sol = lx.linear_solve(op, rhs, lx.CG(rtol=rtol, atol=atol, max_steps=max_steps), throw=False)
    # what is left of the vertical part, |V^T h| / |V^T v| (V^T h = V^T v - V^T V xi)
    res = jax.tree.map(lambda a, b: a - b, normal(sol.value), rhs)
    norm = lambda t: jnp.sqrt(sum(jnp.sum(jnp.abs(x) ** 2) for x in jtu.tree_leaves(t)))  # noqa: E731
    left = jax.lax.stop_gradient(norm(res) / jnp.maximum(norm(rhs), jnp.finfo(dtype).tiny))
    return sol.value, _finite_rhs(rhs), jnp.where(sol.result == lx.RESULTS.successful, 0, left).astype(dtype)


class HorizontalConvergenceWarning(UserWarning):
    """The matrix-free CG of [`gaugejax.horizontal`][] (and of
    [`gaugejax.vertical_coordinates`][]) stopped at `max_steps` short of its tolerance, and
    the projection keeps more than $\\sqrt{\\epsilon}$ of the vertical part,
    $|V^\\top h| / |V^\\top v|$ ($\\epsilon$ the dtype's machine epsilon). Raised eagerly,
    or when a jitted program runs (through `jax.debug.callback`); silence it with
    `warnings.filterwarnings("ignore", category=gaugejax.HorizontalConvergenceWarning)`."""


def _warn_unless_converged(left: Array, max_steps: int, limit: float) -> None:
    """Warn (once per call site, Python's default filter) when the CG solve stopped short
    of its tolerance leaving more than `limit` (the square root of the dtype's epsilon) of
    the vertical part, `left` = $|V^\\top h| / |V^\\top v|$: eagerly at once; under `jit`
    or `vmap` when the program runs."""

    def warn(left):
        worst = float(np.max(np.asarray(left)))
        if worst > limit:
            warnings.warn(
                f"horizontal: the matrix-free CG stopped at max_steps={max_steps} short of its "
                f"tolerance, and the result keeps {worst:.1e} of the vertical part "
                "(|V^T h| / |V^T v|; far from balance the operator is ill-conditioned). Raise "
                "max_steps, compute in float64, or project at a better-balanced point.",
                HorizontalConvergenceWarning, stacklevel=4,
            )

    if isinstance(left, jax.core.Tracer):
        jax.debug.callback(warn, left)
    else:
        warn(left)


def horizontal(
    gauge: Gauge,
    params: PyTree,
    v: PyTree,
    *,
    method: Method = "auto",
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int | None = None,
) -> PyTree:
    """The horizontal part of the tangent vector `v` at `params`:
    $h = v - V(V^\\top V)^{+}V^\\top v$, orthogonal to every vertical vector.

    The gradient of a gauge-invariant loss is already horizontal; an optimizer update
    (momentum, Adam's per-coordinate scaling, weight decay, noise) in general is not.
    Matrix-free for every gauge (a JVP and a VJP of the action per CG step); positive
    rescaling gauges take an exact structured path whose Gram matrix is built from the
    squared parameters (see the module notes and `method`).

    **Arguments:**

    - `gauge`: a [`gaugejax.Gauge`][] with at least one continuous site (a gauge with none
      raises a `ValueError`: every vector is horizontal for it).
    - `params`: the base point $\\theta$.
    - `v`: a tangent vector at `params`, a pytree like `params`.
    - `method`, `rtol`, `atol`, `max_steps`: see [`gaugejax.vertical_coordinates`][].

    NaN or inf in `params` or `v` (on the leaves the gauge acts on) raises a `ValueError`
    naming the leaf when called eagerly. Under `jit` nothing is raised (a training loop may
    handle it, e.g. with `optax.apply_if_finite`): the projection is NaN on those leaves.

    **Returns:** a pytree like `params` (non-array leaves as `None`).

    References: Armenta et al., "Neural teleportation" (2023) for the orbit geometry of
    network parameters; MATH.md, "Orbit geometry".
    """
    params = gauge._complete(params)
    if is_half(_dtype(params)):
        h = horizontal(gauge, upcast_half(params), upcast_half(v), method=method, rtol=rtol, atol=atol,
                       max_steps=max_steps)
        return jtu.tree_map(lambda a, b: a if b is None else a.astype(b.dtype), h, _clean(params, v),
                            is_leaf=_is_none)
    xi = vertical_coordinates(gauge, params, v, method=method, rtol=rtol, atol=atol, max_steps=max_steps)
    return _subtract_vertical(gauge, params, _clean(params, v), xi)


@eqx.filter_jit
def _subtract_vertical(gauge, params, v, xi):
    treedef = jtu.tree_structure(params)
    vl = _aligned(params, v)
    if _rs.is_structured(gauge):
        vx = _rs.vertical(gauge, jtu.tree_leaves(params), xi)
    else:
        vx = _aligned(params, _vert(gauge, params, xi))
    out = [a if (a is None or t is None) else a - t for a, t in zip(vl, vx)]
    return jtu.tree_unflatten(treedef, out)
