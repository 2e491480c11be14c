"""Positive rescalings, structured: the vertical map, its adjoint and its Gram matrix from
the squared parameters alone (no JVPs), and the Newton solve for the balanced point.

For log-scales $\\xi$ on positive-rescaling sites coupled linearly (`Produce` /
`Consume`, no `Link`), the action multiplies every entry $x_k$ of a leaf by
$\\exp(s_k(\\xi))$ with $s_k(\\xi) = \\sum_c \\sigma_c \\xi_{c}$ summed over the leaf's
couplings ($\\sigma = +1$ produced, $-1$ consumed). Hence, at $\\theta' = \\exp(\\xi)\\cdot\\theta$:

- the vertical vector is $V\\eta = \\theta' \\odot s(\\eta)$ and its adjoint sums
  $\\sigma\\, \\theta' \\odot t$ over the axes a site does not index;
- $\\tfrac12\\|\\theta'\\|^2$ has gradient $\\mu = V^\\top\\theta'$ (the moment map: per neuron
  $\\|\\mathrm{in}\\|^2 - \\|\\mathrm{out}\\|^2$) and Hessian $2\\,G$ with
  $G = V^\\top V = \\sum_k \\theta'^2_k\\, \\nabla s_k \\nabla s_k^\\top$: neuron $i$ couples to
  neuron $j$ only through the weights they share.

[`gaugejax.horizontal`][] solves with $G$; [`gaugejax.balance`][] runs Newton's method
with it, each step's system solved by Jacobi-preconditioned CG on the matrix-free
operator ($O(|\\theta|)$ per iteration, no JVPs, no factorisation), instead of building
the Hessian from $N$ JVPs of the action ($N$ = number of rescaled neurons).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array

from ._gauge import Gauge, _expand
from ._groups import PositiveDiagonal, PositiveMonomial


def rescaling_sites(gauge: Gauge) -> tuple[str, ...]:
    """The sites whose continuous part is a positive rescaling, in declaration order."""
    return tuple(n for n, g in gauge.sites if isinstance(g, (PositiveDiagonal, PositiveMonomial)))


def is_structured(gauge: Gauge, sites: Sequence[str] | None = None) -> bool:
    """Whether `sites` (default: every continuous site) are all positive rescalings coupled
    by `Produce` / `Consume` only, so that the structured formulas apply exactly."""
    groups = gauge.site_groups
    sites = gauge.continuous_sites if sites is None else tuple(sites)
    if not all(isinstance(groups[n], (PositiveDiagonal, PositiveMonomial)) for n in sites):
        return False
    if any(plan.view is not None for plan in gauge.plans):
        return False  # the matrix-free path goes through `act`, which handles views
    return not any(lp.out_site in sites or lp.in_site in sites
                   for plan in gauge.plans for lp in plan.links)


def couplings(gauge: Gauge, sites: Sequence[str] | None = None):
    """Per leaf plan that `sites` touch: `(plan, [(site, dims, sign), ...])` where `dims`
    are the leaf axes the site's log-scales index (batch axes, then the site axis)."""
    gauge.require_whole_axes("the structured rescaling solvers")
    sites = set(gauge.continuous_sites if sites is None else sites)
    out = []
    for plan in gauge.plans:
        cs = [(lin.site, (*lin.batch_axes, lin.axis), 1.0 if lin.kind == "produce" else -1.0)
              for lin in plan.linear if lin.site in sites]
        if cs:
            out.append((plan, cs))
    return out


def vertical(gauge: Gauge, leaves: list[Array], xi: Mapping[str, Array],
             sites: Sequence[str] | None = None) -> list[Array | None]:
    """$V\\xi$ leaf by leaf (`None` on leaves the sites do not touch)."""
    out: list[Array | None] = [None] * len(leaves)
    for plan, cs in couplings(gauge, sites):
        x = leaves[plan.index]
        s = sum(sign * _expand(xi[site].astype(x.dtype), dims, x.ndim) for site, dims, sign in cs)
        out[plan.index] = x * s
    return out


def reduce_to(x: Array, dims: tuple[int, ...]) -> Array:
    """Sum `x` over every axis not in `dims`; the result is indexed by `dims` in order."""
    others = tuple(a for a in range(x.ndim) if a not in dims)
    y = jnp.sum(x, axis=others) if others else x
    kept = sorted(dims)
    return jnp.transpose(y, [kept.index(d) for d in dims])


def _zeros(gauge: Gauge, sites: Sequence[str], dtype: Any) -> dict[str, Array]:
    groups = gauge.site_groups
    return {n: groups[n].algebra_zeros(dtype) for n in sites}


def adjoint(gauge: Gauge, leaves: list[Array], t: list[Array | None],
            sites: Sequence[str] | None = None) -> dict[str, Array]:
    """$V^\\top t$ as `{site: log-scale array}`."""
    sites = gauge.continuous_sites if sites is None else tuple(sites)
    dtype = next(x.dtype for x in leaves if eqx.is_inexact_array(x))
    out = _zeros(gauge, sites, dtype)
    for plan, cs in couplings(gauge, sites):
        xt = leaves[plan.index] * t[plan.index]
        for site, dims, sign in cs:
            out[site] = out[site] + sign * reduce_to(xt, dims)
    return out


def gram_apply(gauge: Gauge, leaves: list[Array], xi: Mapping[str, Array],
               sites: Sequence[str] | None = None) -> dict[str, Array]:
    """$G\\xi = V^\\top V\\xi$, matrix-free, $O(|\\theta|)$."""
    return adjoint(gauge, leaves, vertical(gauge, leaves, xi, sites), sites)


def gram_diagonal(gauge: Gauge, leaves: list[Array],
                  sites: Sequence[str] | None = None) -> dict[str, Array]:
    """The diagonal of $G$: $\\|\\mathrm{in}_i\\|^2 + \\|\\mathrm{out}_i\\|^2$ per neuron.

    A leaf coupled to one site on two axes ($A \\mapsto DAD^{-1}$, a neural-ODE gauge,
    batched over the time grid or not) has entries $A_{ii}$ that the action leaves alone;
    they are taken out again, so this is exactly the diagonal of `gram_dense`."""
    sites = gauge.continuous_sites if sites is None else tuple(sites)
    dtype = next(x.dtype for x in leaves if eqx.is_inexact_array(x))
    out = _zeros(gauge, sites, dtype)
    for plan, cs in couplings(gauge, sites):
        sq = leaves[plan.index] ** 2
        for site, dims, _ in cs:
            out[site] = out[site] + reduce_to(sq, dims)
        for k, (site, dims, sign) in enumerate(cs):
            for site2, dims2, sign2 in cs[k + 1:]:
                if site2 != site:
                    continue
                # d s / d xi_j = sign + sign2 on the entries that both couplings index by j
                # (every batch index and the site index equal): the cross term 2 sign sign2
                both = jnp.ones((1,) * sq.ndim, bool)
                for d1, d2 in zip(dims, dims2):
                    if d1 != d2:
                        both = both & (jax.lax.broadcasted_iota(jnp.int32, sq.shape, d1)
                                       == jax.lax.broadcasted_iota(jnp.int32, sq.shape, d2))
                out[site] = out[site] + 2 * sign * sign2 * reduce_to(jnp.where(both, sq, 0), dims)
    return out


def solve_gram(gauge: Gauge, leaves: list[Array], rhs: Mapping[str, Array], diag: Mapping[str, Array], *,
               sites: Sequence[str] | None = None, scale: float = 1.0, rtol: float, atol: float,
               max_steps: int, free: Mapping[str, Array] | None = None,
               ) -> tuple[dict[str, Array], lx.FunctionLinearOperator]:
    """Solve `scale * G xi = rhs` (G the Gram matrix of the log-scale generators at `leaves`)
    by Jacobi-preconditioned CG, with `diag` the diagonal of G (`gram_diagonal`: the
    squared parameters each neuron scales). With `free` (`{site: bool array}`) the system is
    restricted to the free log-scales, `P G P xi = P rhs`, and the others are zero; a neuron
    with no mass (zero diagonal, a zero Gram row) is never free. Returns the solution and
    the preconditioner (a descent-direction fallback for Newton steps).

    The fixed entries are solved as an identity block with right-hand side 1 (and zeroed
    afterwards) rather than as zero rows: lineax's CG scales its tolerance entry by entry
    by `|rhs|`, so a zero entry would read as 0/0 and stop it at once."""
    struct = jax.eval_shape(lambda: dict(rhs))
    fixed = {n: (d <= 0) if free is None else (d <= 0) | ~free[n] for n, d in diag.items()}

    def keep(v):
        return {n: jnp.where(fixed[n], 0, w) for n, w in v.items()}

    def mv(v):
        gv = keep(gram_apply(gauge, leaves, keep(v), sites))
        return {n: jnp.where(fixed[n], v[n], scale * gv[n]) for n in v}

    op = lx.FunctionLinearOperator(mv, struct, tags=lx.positive_semidefinite_tag)
    inv = {n: jnp.where(fixed[n], 0, 1 / (scale * jnp.where(fixed[n], 1, d))) for n, d in diag.items()}
    pre = lx.FunctionLinearOperator(lambda v: {n: inv[n] * v[n] for n in v}, struct,
                                    tags=lx.positive_semidefinite_tag)
    # lineax cannot differentiate through `options`; the preconditioner changes only how
    # fast CG converges, not the solution, so the solve's derivative does not need it
    inv_cg = jax.lax.stop_gradient({n: jnp.where(fixed[n], 1, i) for n, i in inv.items()})
    cg_pre = lx.FunctionLinearOperator(lambda v: {n: inv_cg[n] * v[n] for n in v}, struct,
                                       tags=lx.positive_semidefinite_tag)
    b = {n: jnp.where(fixed[n], 1, r) for n, r in rhs.items()}
    # lineax stops when |r_i| <= atol + rtol |b_i| for every entry: with atol = 0 an exactly
    # zero entry of the rhs (a neuron already balanced) reads 0/0 and stops it at once.
    # The floor rtol * max|b| (over the free entries) makes the test relative to the rhs.
    size = jnp.max(jnp.stack([jnp.max(jnp.where(fixed[n], 0, jnp.abs(r)), initial=0) for n, r in rhs.items()]))
    atol = atol + rtol * jax.lax.stop_gradient(size)
    sol = lx.linear_solve(op, b, lx.CG(rtol=rtol, atol=atol, max_steps=max_steps),
                          options={"preconditioner": cg_pre}, throw=False)
    return keep(sol.value), pre


def layout(gauge: Gauge, sites: Sequence[str] | None = None) -> dict[str, tuple[int, tuple[int, ...]]]:
    """`{site: (offset, shape)}` of the sites' log-scales in one flat vector."""
    groups = gauge.site_groups
    out: dict[str, tuple[int, tuple[int, ...]]] = {}
    offset = 0
    for n in gauge.continuous_sites if sites is None else sites:
        shape = (*groups[n].batch, groups[n].n)
        out[n] = (offset, shape)
        offset += int(np.prod(shape))
    return out


def num_scales(gauge: Gauge, sites: Sequence[str] | None = None) -> int:
    """How many log-scales the sites hold (the size of the Gram matrix)."""
    return sum(int(np.prod(shape)) for _, shape in layout(gauge, sites).values())


def gram_dense(gauge: Gauge, leaves: list[Array], sites: Sequence[str] | None = None):
    """The Gram matrix $G = V^\\top V$ of the log-scale generators, assembled from the
    squared parameters: $O(|\\theta|)$ work plus the $N^2$ matrix. Returns `(G, layout)`."""
    lay = layout(gauge, sites)
    size = num_scales(gauge, sites)
    dtype = next(x.dtype for x in leaves if eqx.is_inexact_array(x))
    gram = jnp.zeros((size, size), dtype)
    for plan, cs in couplings(gauge, tuple(lay)):
        x2 = leaves[plan.index] ** 2
        for site_a, dims_a, sa in cs:
            for site_b, dims_b, sb in cs:
                keep = tuple(sorted(set(dims_a) | set(dims_b)))
                vals = reduce_to(x2, keep)  # indexed by `keep`

                def flat(site, dims):
                    off, shape = lay[site]
                    idx = jnp.zeros(vals.shape, jnp.int32)
                    stride = 1
                    for d, n in zip(reversed(dims), reversed(shape)):
                        io = jax.lax.broadcasted_iota(jnp.int32, vals.shape, keep.index(d))
                        idx = idx + io * stride
                        stride *= n
                    return idx + off

                rows, cols = flat(site_a, dims_a), flat(site_b, dims_b)
                gram = gram.at[rows.ravel(), cols.ravel()].add((sa * sb) * vals.ravel())
    return gram, lay


def flatten(xi: Mapping[str, Array], lay) -> Array:
    return jnp.concatenate([xi[n].ravel() for n in lay])


def unflatten(vec: Array, lay) -> dict[str, Array]:
    out = {}
    for n, (off, shape) in lay.items():
        out[n] = vec[off : off + int(np.prod(shape))].reshape(shape)
    return out


def cholesky_solve(gram: Array, rhs: Array) -> Array:
    """Exact solve of the PSD system. The matrix is scaled by its diagonal first (Jacobi:
    neurons whose weights differ by orders of magnitude make G ill-conditioned, and a
    float32 factorisation of the unscaled matrix lost most digits); a relative jitter of
    eps keeps it defined where a neuron has no weights (a zero row: its right-hand side is
    zero too)."""
    eps = jnp.finfo(gram.dtype).eps
    d = jnp.diagonal(gram)
    s = jnp.where(d > 0, 1 / jnp.sqrt(jnp.where(d > 0, d, 1)), 1)
    scaled = s[:, None] * gram * s[None, :]
    chol = jnp.linalg.cholesky(scaled + eps * jnp.eye(gram.shape[0], dtype=gram.dtype))

    def solve(b):
        y = jax.scipy.linalg.solve_triangular(chol, b, lower=True)
        return jax.scipy.linalg.solve_triangular(chol.T, y, lower=False)

    b = s * rhs
    y = solve(b)
    # one step of iterative refinement against the un-jittered matrix
    y = y + solve(b - scaled @ y)
    return s * y
