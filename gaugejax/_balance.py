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

from . import _checks, _rescaling as _rs
from ._gauge import Gauge, _expand, params_float_dtype as _dtype, without_views


def _sq_norm(tree: PyTree) -> Array:
    return sum(jnp.sum(x**2) for x in jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array)))


@eqx.filter_jit
def moment_map(gauge: Gauge, params: PyTree) -> dict[str, Array]:
    """The moment map of every continuous site at `params`, as a Lie-algebra element
    `{site: array}`: $\\mu = \\nabla_\\xi \\tfrac12\\|\\exp(\\xi)\\cdot\\theta\\|^2$ at $\\xi = 0$.

    For a linear action (every gauge without [`gaugejax.Link`][] couplings) it is a
    conserved quantity (Noether charge) of gradient flow on a gauge-invariant loss, and
    zero exactly at the balanced point. A link acts affinely, and then the conserved
    charges are [`gaugejax.noether_charges`][] (the moment map at $U/h = A + I/h$), not
    this.
    """
    params = gauge._complete(params)  # an equinox.filter-ed model too
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

    For sites coupled by `Produce` / `Consume` (every feedforward and attention gauge) the
    Hessian is the structured Gram matrix of the log-scale generators, built from the
    squared parameters: each Newton step is a Jacobi-preconditioned CG solve with an
    $O(|\\theta|)$ operator, followed by an Armijo backtracking line search (memory linear
    in the parameters; a float32 784-512-512-512-10 MLP far from balanced is balanced and
    ordered by `canonicalize` in about 0.1 s on 2 CPU cores, `benchmarks/orbits.py`). Sites
    that are also coupled through a [`gaugejax.Link`][] (a ResNet's streams) use Newton on
    the autodiff Hessian instead (one JVP per rescaled neuron per step).

    A neuron whose incoming or outgoing weights are all zero (a *degenerate* neuron: dead
    by construction, pruned, or zero-initialised; in a recurrent gauge also one with a
    weight on no cycle) has no balanced point: its orbit is not
    closed, and the norm only approaches its infimum as the nonzero side is scaled to
    zero. Such neurons keep their scale (the problem is solved over the other
    log-scales, which then have a unique minimum) and are left out of
    [`gaugejax.balance_residual`][]; [`gaugejax.degenerate_units`][] lists them (sites
    coupled through a [`gaugejax.Link`][] are not split into sides and never flagged).

    Differentiable in `params`, in reverse and forward mode (`jax.grad`, `jax.jvp`, under
    `jit` and `vmap`): the derivative of the balanced point is implicit, from the moment
    map's vanishing, and Newton's loop is not differentiated. For `Produce` / `Consume`
    sites this factors the $N \\times N$ Gram matrix of the $N$ rescaled neurons once per
    derivative; Link-coupled sites use optimistix's implicit adjoint. At parameters with
    degenerate neurons the balanced point is not continuous (a weight on the empty side
    gives the neuron a balanced point of its own): the derivative there is along
    directions that keep them degenerate.

    **Arguments:**

    - `gauge`, `params`: the gauge and the parameters to balance (the model, or its
      `equinox.filter`-ed array part, and then the result comes back filtered).
    - `rtol`, `atol`: stop when a Newton step moves every log-scale by less than
      `atol + rtol * max|xi|` (default $\\epsilon^{3/4}$ of the dtype).
    - `max_steps`: the Newton step limit. Reaching it returns the last iterate, without
      an error (far from balance in float32, say): check
      [`gaugejax.balance_residual`][] when it matters.

    **Returns:** `(balanced_params, g)` with `balanced_params == gauge.act(g, params)`.
    """
    _checks.tolerance(rtol, "rtol")
    _checks.tolerance(atol, "atol")
    _checks.integer(max_steps, "max_steps")
    filtered = gauge._filtered_io(params)
    if filtered is not None:  # an equinox.filter-ed model: balanced whole, returned filtered
        balanced, g = balance(gauge, filtered[0], rtol=rtol, atol=atol, max_steps=max_steps)
        return filtered[1](balanced), g
    whole = without_views(gauge, params)
    if whole.gauge is not gauge:  # leaves coupled through views: balance them reshaped
        balanced, g = balance(whole.gauge, whole.params, rtol=rtol, atol=atol, max_steps=max_steps)
        return whole.restore(balanced), whole.restore_element(g)
    positive = _rs.rescaling_sites(gauge)
    dtype = _dtype(params)
    if not positive:
        return params, gauge.identity(dtype)
    eps = jnp.finfo(dtype).eps
    rtol = float(eps**0.75) if rtol is None else rtol
    atol = float(eps**0.75) if atol is None else atol
    free = {n: ~d for n, d in _fixed_units(gauge, params).items()}
    if _rs.is_structured(gauge, positive):
        xi = _implicit_structured(gauge, params, positive, rtol, atol, max_steps, free)
    else:
        xi = _newton_generic(gauge, params, positive, rtol, atol, max_steps, free)
    g = gauge.exp(xi, dtype)
    return gauge.act(g, params, check=False), g


def _newton_generic(gauge, params, positive, rtol, atol, max_steps, free=None):
    # Rescaling sites coupled through links (a ResNet's streams): the objective is no
    # longer a sum of exponentials of linear forms, so Newton runs on the autodiff
    # Hessian (N JVPs per step; fine for lattice gauges of modest width).
    dtype = _dtype(params)
    zeros = {n: gauge.site_groups[n].algebra_zeros(dtype) for n in positive}
    scale = _sq_norm(params)

    def objective(xi, _):
        return _sq_norm(gauge.act(gauge.exp(xi, dtype), params, check=False)) / scale

    def gradient(xi, _):
        if free is None:
            return jax.grad(objective)(xi, None)
        # degenerate neurons (`free` false) keep their scale: their equation is xi = 0
        g = jax.grad(objective)({n: jnp.where(free[n], x, 0) for n, x in xi.items()}, None)
        return {n: jnp.where(free[n], g[n], xi[n]) for n in xi}

    # The gradient is the (normalised) moment map; Newton on it converges quadratically
    # on this strictly convex problem.
    sol = optx.root_find(
        gradient, optx.Newton(rtol=rtol, atol=atol), zeros, max_steps=max_steps, throw=False
    )
    return sol.value


def _scaled(leaves: list, pairs, xi: Mapping[str, Array]) -> list:
    """The leaves of $\\exp(\\xi)\\cdot\\theta$ (every entry times $e^{s(\\xi)}$)."""
    out = list(leaves)
    for plan, cs in pairs:
        x = leaves[plan.index]
        s = sum(sign * _expand(xi[site], dims, x.ndim) for site, dims, sign in cs)
        out[plan.index] = x * jnp.exp(s)
    return out


@eqx.filter_custom_jvp
def _implicit_structured(gauge, params, positive, rtol, atol, max_steps, free):
    """The balanced log-scales, differentiable in `params` (forward and reverse mode).

    The primal is Newton's `while_loop`; the derivative comes from the implicit function
    theorem on the moment map $\\mu(\\xi^*(\\theta), \\theta) = 0$:
    $\\dot\\xi^* = -(2G)^{-1}\\,\\partial_\\theta\\mu\\,[\\dot\\theta]$, with the Gram matrix $G$
    at the balanced point assembled densely and factored (Cholesky: $O(N^2)$ memory and
    $O(N^3)$ time in the number $N$ of rescaled neurons, once per derivative). The solve
    is linear in the tangent, so reverse mode transposes it. (A CG solve would avoid the
    factorisation, but neither `jax.scipy.sparse.linalg.cg` (its `custom_linear_solve`
    does not transpose inside a JVP rule here) nor lineax's CG (its tolerance is relative
    entry by entry, and a tangent has exact zeros) serves.) Degenerate neurons'
    log-scales stay 0."""
    return _newton_structured(gauge, params, positive, rtol, atol, max_steps, free)


@_implicit_structured.def_jvp
def _implicit_structured_jvp(primals, tangents):
    gauge, params, positive, rtol, atol, max_steps, free = primals
    xi = _implicit_structured(*primals)
    if tangents[1] is None:
        return xi, jax.tree.map(jnp.zeros_like, xi)
    leaves = jtu.tree_leaves(params)
    # aligned with `leaves`: None where a leaf has no tangent (symbolic zero, non-float);
    # flattened up to params' structure so that a None *in* params (bias=None) shifts nothing
    t_leaves = jtu.tree_structure(params).flatten_up_to(tangents[1])
    pairs = _rs.couplings(gauge, positive)
    idx = [plan.index for plan, _ in pairs]

    def moment(xs):
        ls = list(leaves)
        for i, x in zip(idx, xs):
            ls[i] = x
        cur = _scaled(ls, pairs, xi)
        return _rs.adjoint(gauge, cur, cur, positive)

    dots = [jnp.zeros_like(leaves[i]) if t_leaves[i] is None else t_leaves[i] for i in idx]
    _, rhs = jax.jvp(moment, ([leaves[i] for i in idx],), (dots,))
    cur = _scaled(leaves, pairs, xi)
    gram, lay = _rs.gram_dense(gauge, cur, positive)
    free_vec = _rs.flatten({n: jnp.broadcast_to(free[n], rhs[n].shape) for n in positive}, lay)
    free_vec = free_vec & (jnp.diagonal(gram) > 0)
    # 2G on the free log-scales, a multiple of the identity on the fixed ones (their
    # tangent is zero), scaled like G's diagonal to keep the factorisation well-conditioned
    ref = jnp.max(jnp.where(free_vec, 2 * jnp.diagonal(gram), 0), initial=0)
    ref = jnp.where(ref > 0, ref, 1)
    hess = jnp.where(free_vec[:, None] & free_vec[None, :], 2 * gram, 0) + jnp.diag(jnp.where(free_vec, 0, ref))
    x = _rs.cholesky_solve(hess, jnp.where(free_vec, -_rs.flatten(rhs, lay), 0))
    return xi, _rs.unflatten(x, lay)


_ARMIJO = 1e-4
#: inexact Newton: each step's linear system is solved to this relative residual
_CG_RTOL = 1e-6
_CG_MAX_STEPS = 1000
_MAX_HALVINGS = 40
_RESOLVE = 1e3


@eqx.filter_jit
def _newton_structured(gauge, params, positive, rtol, atol, max_steps, free=None):
    """Damped Newton on $F(\\xi) = \\tfrac12\\|\\exp(\\xi)\\cdot\\theta\\|^2$ with the exact
    structured Hessian $2G$ (see `gaugejax/_rescaling.py`) and an Armijo backtracking line
    search: globally convergent on this convex problem, quadratic near the minimum.

    Only the log-scales where `free` (`{site: bool array}`, default all) is true move
    (degenerate neurons stay at 0): the gradient is masked and each step solves the Newton
    system restricted to them."""
    if free is None:
        free = {n: jnp.ones((), bool) for n in positive}
    leaves = jtu.tree_leaves(params)
    dtype = _dtype(params)
    pairs = _rs.couplings(gauge, positive)
    # normalise so that F is O(1): the tolerances are then relative
    scale = sum(jnp.sum(leaves[plan.index] ** 2) for plan, _ in pairs)
    scale = jnp.where(scale > 0, scale, 1)

    def scaled(xi):
        return _scaled(leaves, pairs, xi)

    def value(xi):
        return 0.5 * sum(jnp.sum(x**2) for x in (scaled(xi)[p.index] for p, _ in pairs)) / scale

    def moment(xi):
        cur = [x / jnp.sqrt(scale) if eqx.is_inexact_array(x) else x for x in scaled(xi)]
        grad = _rs.adjoint(gauge, cur, cur, positive)  # moment map / scale
        grad = {n: jnp.where(free[n], g, 0) for n, g in grad.items()}
        diag = _rs.gram_diagonal(gauge, cur, positive)  # |in|^2 + |out|^2 per neuron
        return cur, grad, diag

    def residual(grad, diag):  # the relative moment map, as balance_residual
        return jnp.max(jnp.stack([jnp.max(jnp.abs(grad[n]) / jnp.where(diag[n] > 0, diag[n], 1))
                                  for n in positive]))

    def direction(cur, grad, diag):
        # the Hessian of F is 2 G
        rhs = {n: -x for n, x in grad.items()}
        newton, pre = _rs.solve_gram(gauge, cur, rhs, diag, sites=positive, scale=2.0, rtol=_CG_RTOL,
                                     atol=0.0, max_steps=_CG_MAX_STEPS, free=free)
        # An inexact solve (float32, ill-conditioned Gram) may not give a descent
        # direction: fall back to the preconditioned gradient, which always is one.
        slope = _dot(grad, newton, positive)
        ok = (slope < 0) & jnp.isfinite(slope)
        fallback = pre.mv(rhs)
        step = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), newton, fallback)
        return step, jnp.where(ok, slope, _dot(grad, fallback, positive)), fallback

    def body(carry):
        xi, f, it, _ = carry
        cur, grad, diag = moment(xi)
        step, slope, fallback = direction(cur, grad, diag)
        new, f_new, improved, size = search(xi, f, grad, diag, step, slope)
        # A Newton step that fails its line search (an inexact float32 solve far from the
        # minimum) is retried along the preconditioned gradient before giving up.
        retry = lambda: search(xi, f, grad, diag, fallback, _dot(grad, fallback, positive))  # noqa: E731
        new, f_new, improved, size = jax.lax.cond(improved, lambda: (new, f_new, improved, size), retry)
        ref = jnp.max(jnp.stack([jnp.max(jnp.abs(new[n])) for n in positive]))
        converged = (size <= atol + rtol * ref) | ~improved
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(improved, a, b), new, xi)
        return new, jnp.where(improved, f_new, f), it + 1, converged

    def search(xi, f, grad, diag, step, slope):
        def shrink(c):
            t, _ = c
            t = 0.5 * t
            return t, value(_axpy(t, step, xi))

        # Backtrack while the predicted decrease is above rounding in F. Below it, F cannot
        # tell a good step from a bad one, so the step is judged by the moment map instead:
        # taken if it reduces the relative residual (quadratic convergence to the end),
        # otherwise the iteration has converged to working precision.
        resolvable = -slope > _RESOLVE * jnp.finfo(dtype).eps * f

        def too_high(c):
            t, f_new = c
            return resolvable & ~(f_new <= f + _ARMIJO * t * slope) & (t > 2.0**-_MAX_HALVINGS)

        t, f_new = jax.lax.while_loop(too_high, shrink, (jnp.ones((), dtype), value(_axpy(1.0, step, xi))))
        new = _axpy(t, step, xi)
        _, grad_new, diag_new = moment(new)
        improved = jnp.where(resolvable, f_new <= f + _ARMIJO * t * slope,
                             residual(grad_new, diag_new) < residual(grad, diag))
        improved = improved & jnp.isfinite(f_new)
        size = jnp.max(jnp.stack([jnp.max(jnp.abs(t * step[n])) for n in positive]))
        return new, f_new, improved, size

    def cond(carry):
        _, _, it, converged = carry
        return (it < max_steps) & ~converged

    xi0 = {n: gauge.site_groups[n].algebra_zeros(dtype) for n in positive}
    init = (xi0, value(xi0), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    xi, _, _, _ = jax.lax.while_loop(cond, body, init)
    return xi


def _dot(a, b, names) -> Array:
    return sum(jnp.vdot(a[n], b[n]) for n in names)


def _axpy(t, step, xi):
    return {n: xi[n] + t * step[n] for n in xi}


@eqx.filter_jit
def balance_residual(gauge: Gauge, params: PyTree) -> Array:
    """The largest relative moment-map residual over positive-scaling neurons:
    $\\max_i |\\mu_i| / (\\|\\mathrm{in}_i\\|^2 + \\|\\mathrm{out}_i\\|^2)$, where the
    denominator is the sum of the two squared norms the moment map compares.

    Degenerate neurons (incoming or outgoing weights all zero, and the like, see
    [`gaugejax.degenerate_units`][]) are left out: they have no balanced point, and their
    relative residual is 1 wherever they are on the orbit."""
    params = gauge._complete(params)  # an equinox.filter-ed model too
    gauge, params, _, _ = without_views(gauge, params)
    mu = moment_map(gauge, params)
    sides, dead, _ = _sides_and_dead(gauge, params)
    if not sides:
        return jnp.zeros(())
    res = []
    for n, (n_in, n_out) in sides.items():
        total = n_in + n_out
        keep = ~dead[n] & (total > 0)
        res.append(jnp.max(jnp.where(keep, jnp.abs(mu[n]) / jnp.where(keep, total, 1), 0)))
    return jnp.max(jnp.stack(res))


@eqx.filter_jit
def degenerate_units(gauge: Gauge, params: PyTree) -> dict[str, Array]:
    """The degenerate neurons of the positive-scaling sites: `{site: bool array}` (shape
    `(*batch, n)`), true where a neuron's incoming weights (and bias) or its outgoing
    weights are all exactly zero, and, in a recurrent gauge (a chain of leaves from a site
    back to itself), every neuron of a strongly connected group whose weights to or from
    the rest lie on no cycle: a group fed from the inputs that never reaches an output (or
    the reverse), or two closed groups joined in one direction only (both are flagged).

    Their rescaling orbit is not closed: scaling the nonzero side towards zero lowers
    $\\|\\theta\\|^2$ forever, so there is no balanced point. [`gaugejax.balance`][] keeps
    their scale and [`gaugejax.balance_residual`][] leaves them out. A closed group of
    neurons that feed only each other (or a neuron that feeds only itself) is not
    degenerate: it balances, and its common scale, which acts on nothing, is left as it
    is. Sites coupled through a [`gaugejax.Link`][] (a ResNet's streams) are reported all
    false: their neurons are not split into an incoming and an outgoing side."""
    gauge, params, _, _ = without_views(gauge, params)
    return _sides_and_dead(gauge, params)[1]


def _sides_and_dead(gauge: Gauge, params: PyTree) -> tuple[dict, dict[str, Array], dict[str, Array]]:
    """`_side_norms` of every positive-scaling site, which neurons are degenerate, and
    which neurons `balance` pins besides them (one per closed recurrent group)."""
    sides = _side_norms(gauge, params, _rs.rescaling_sites(gauge), _dtype(params))
    linked = _linked_sites(gauge)
    dead = {n: jnp.zeros_like(a, bool) if n in linked else (a == 0) | (b == 0) for n, (a, b) in sides.items()}
    return sides, *_off_cycle(gauge, params, dead, linked)


@eqx.filter_jit
def _fixed_units(gauge: Gauge, params: PyTree) -> dict[str, Array]:
    """The neurons whose log-scale `balance` keeps at zero: the degenerate ones, and one
    neuron of each closed recurrent group (whose common scale acts on nothing)."""
    _, dead, pinned = _sides_and_dead(gauge, params)
    return {n: d | pinned[n] for n, d in dead.items()}


def _off_cycle(gauge: Gauge, params: PyTree, dead: dict[str, Array], linked: set[str]):
    """`(degenerate, pinned)`: `dead` and every neuron of a strongly connected component
    joined to another one (other than B's), and the lowest-indexed neuron of each closed
    group.

    Balancing is line-sum-symmetric scaling of the neuron graph (an edge from neuron j to
    neuron i wherever a nonzero entry is consumed from j and produced into i; the model's
    inputs, outputs, biases and the sites that are not rescaled are one boundary node B of
    fixed scale): the norm has a minimum over the log-scales exactly when every edge lies
    on a cycle, that is, when no edge joins two strongly connected components. A zero side
    (`dead`, merged into B) is the common failure. In a recurrent gauge (a cycle of sites)
    there are two more: a group of neurons fed from B that never reaches it back, or one
    that reaches B and is never fed from it, or one joined to another closed group in one
    direction only, runs away (flagged); a closed group that touches nothing else is
    balanced, but its common scale acts on no parameter, so `balance` pins one of its
    neurons to keep the Newton system regular (the group's moment sums to zero, so the
    pinned neuron is balanced with the rest).

    The components come from boolean propagation over the nonzero entries: the neurons
    reachable from B and reaching it are B's component; every other neuron connected to B
    (weakly, by a min-label sweep) is flagged; a weakly connected group apart from B is
    fine exactly when its lowest-indexed neuron reaches and is reached from all of it.
    (For a leaf that couples two rescaled sites on one side, an entry counts as reached
    when all its inputs are: exact for graphs, a sufficient test otherwise.) A gauge whose
    sites form no cycle (every feedforward and attention gauge) has no such neurons, and
    none of this is traced."""
    sites = tuple(n for n in dead if n not in linked)
    none = {n: jnp.zeros_like(d) for n, d in dead.items()}
    if not sites or not _has_site_cycle(gauge, sites):
        return dead, none
    leaves = jtu.tree_leaves(params)
    edges = []  # (nonzero mask, [(site, dims, kind)]) per leaf the sites touch
    for plan in gauge.plans:
        cs = [(lin.site, (*lin.batch_axes, lin.axis), lin.kind) for lin in plan.linear if lin.site in sites]
        if cs:
            x = jax.lax.stop_gradient(leaves[plan.index])
            edges.append(((x.reshape(plan.view) if plan.view is not None else x) != 0, cs))

    def to_site(entry, dims, ndim, reduce):
        others = tuple(a for a in range(ndim) if a not in dims)
        got = reduce(entry, axis=others) if others else entry
        kept = sorted(dims)
        return jnp.transpose(got, [kept.index(d) for d in dims])

    def fixed_point(step, init):
        def body(carry):
            cur, _ = carry
            new = step(cur)
            return new, jnp.any(jnp.stack([jnp.any(new[n] != cur[n]) for n in sites]))

        return jax.lax.while_loop(lambda c: c[1], body, (init, jnp.ones((), bool)))[0]

    def spread(start, src_kind: str, dst_kind: str):
        def step(reached):
            new = dict(reached)
            for nz, cs in edges:
                hit = nz
                for site, dims, kind in cs:
                    if kind == src_kind:
                        hit = hit & _expand(reached[site], dims, nz.ndim)
                for site, dims, kind in cs:
                    if kind == dst_kind:
                        new[site] = new[site] | to_site(hit, dims, nz.ndim, jnp.any)
            return new

        return fixed_point(step, start)

    def components(label):  # weakly connected: the least label over shared entries; B is -1
        def step(cur):
            new = dict(cur)
            for nz, cs in edges:
                kinds = {kind for _, _, kind in cs}
                low = jnp.full(nz.shape, -1 if len(kinds) < 2 else jnp.iinfo(jnp.int32).max, jnp.int32)
                for site, dims, _ in cs:
                    low = jnp.minimum(low, _expand(cur[site], dims, nz.ndim))
                low = jnp.where(nz, low, jnp.iinfo(jnp.int32).max)
                for site, dims, _ in cs:
                    new[site] = jnp.minimum(new[site], to_site(low, dims, nz.ndim, jnp.min))
            return new

        return fixed_point(step, label)

    start = {n: dead[n] for n in sites}
    on_b = {n: f & b for (n, f), b in zip(spread(start, "consume", "produce").items(),
                                          spread(start, "produce", "consume").values())}
    offset, index = 0, {}
    for n in sites:
        size = dead[n].size
        index[n] = offset + jnp.arange(size, dtype=jnp.int32).reshape(dead[n].shape)
        offset += size
    label = components({n: jnp.where(dead[n], -1, index[n]) for n in sites})
    root = {n: label[n] == index[n] for n in sites}
    # from each closed group's root (B's entries reach only B's group: ignored below)
    from_root = spread(root, "consume", "produce")
    to_root = spread(root, "produce", "consume")
    apart = {n: label[n] >= 0 for n in sites}
    bad = jnp.zeros((offset,), bool)
    for n in sites:
        miss = apart[n] & ~(from_root[n] & to_root[n])
        bad = bad.at[jnp.where(apart[n], label[n], 0).ravel()].max(miss.ravel())
    flagged = {n: jnp.where(apart[n], bad[jnp.maximum(label[n], 0)], ~on_b[n]) for n in sites}
    degenerate = {n: d if n not in flagged else d | flagged[n] for n, d in dead.items()}
    pinned = {n: p if n not in flagged else root[n] & apart[n] & ~flagged[n] for n, p in none.items()}
    return degenerate, pinned


def _has_site_cycle(gauge: Gauge, sites: tuple[str, ...]) -> bool:
    """Whether some chain of leaves leads from a site back to itself (a leaf that consumes
    one site and produces another is an arc between them): a recurrent gauge."""
    arcs = {n: set() for n in sites}
    for plan in gauge.plans:
        ins = {lin.site for lin in plan.linear if lin.site in arcs and lin.kind == "consume"}
        outs = {lin.site for lin in plan.linear if lin.site in arcs and lin.kind == "produce"}
        for a in ins:
            arcs[a] |= outs
    state = dict.fromkeys(sites, 0)  # 0 unseen, 1 on the stack, 2 done

    def visit(a):
        state[a] = 1
        for b in arcs[a]:
            if state[b] == 1 or (state[b] == 0 and visit(b)):
                return True
        state[a] = 2
        return False

    return any(state[a] == 0 and visit(a) for a in sites)


def _linked_sites(gauge: Gauge) -> set[str]:
    return {s for plan in gauge.plans for lp in plan.links for s in (lp.out_site, lp.in_site)}


def _side_norms(gauge: Gauge, params: PyTree, sites, dtype: Any) -> dict[str, tuple[Array, Array]]:
    """Per neuron of each site, `(|in|^2, |out|^2)`: the sums of the squared entries it
    produces and consumes (through `Produce` / `Consume` couplings; a `Link` is neither)."""
    gauge.require_whole_axes("balance")
    groups = gauge.site_groups
    sides = {n: [jnp.zeros((*groups[n].batch, groups[n].n), dtype) for _ in range(2)] for n in sites}
    leaves = jtu.tree_leaves(params)
    for plan in gauge.plans:
        x = leaves[plan.index]
        if plan.view is not None:
            x = x.reshape(plan.view)
        for lin in plan.linear:
            if lin.site in sides:
                side = 0 if lin.kind == "produce" else 1
                x2 = _rs.reduce_to(x.astype(dtype) ** 2, (*lin.batch_axes, lin.axis))
                sides[lin.site][side] = sides[lin.site][side] + x2
    return {n: (a, b) for n, (a, b) in sides.items()}
