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
    damped Newton on the objective (an Armijo backtracking line search, a fallback to the
    Jacobi-preconditioned gradient, and no step to a non-finite point: finite parameters
    give a finite result), run to tolerance rather than for a fixed number of sweeps. At
    the result the moment map vanishes: each hidden neuron's incoming and outgoing
    squared norms are equal (MATH.md, S4).

    For sites coupled by `Produce` / `Consume` (every feedforward and attention gauge) the
    Hessian is the structured Gram matrix of the log-scale generators, built from the
    squared parameters: each Newton step is a Jacobi-preconditioned CG solve with an
    $O(|\\theta|)$ operator (memory linear in the parameters; a float32
    784-512-512-512-10 MLP far from balanced is balanced and ordered by `canonicalize` in
    about 0.1 s on 2 CPU cores, `benchmarks/orbits.py`). Sites that are also coupled
    through a [`gaugejax.Link`][] (a ResNet's or a neural ODE's streams) use the same
    loop on the autodiff Hessian instead (one JVP per rescaled neuron per step), re-centred
    after every step: the next step is computed at the point reached, not through the
    action from the starting point. A link acts affinely, and from a far point its
    diagonal $e^{d}(A_{ii} + 1/h) - 1/h$ cancels to an error of about
    $\\epsilon e^{|d|}/h$: the result is then `gauge.act(g, params)` only up to that
    rounding, and it is balanced to the tolerance at the point it is (a ReLU ResNet with
    positive diagonal streams moved by `gauge.sample(scale=s)`, s up to 6, balances to a
    relative residual below 1e-15 in float64 and 1e-6 in float32). The same rounding is in
    the far point itself, so no method recovers the orbit's balanced point to better than
    about $\\epsilon e^{|d|}$ relative from it: in that ResNet, $\\|\\theta\\|^2$ of the
    balanced points of eight far points of one orbit spreads by 9e-11 (float64) and 2%
    (float32) relative at s = 6, 2e-13 and 2e-4 at s = 4 (and by as much when the float32
    far points are balanced exactly, in float64).

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
    derivative; Link-coupled sites use the autodiff Hessian at the balanced point. At
    parameters with
    degenerate neurons the balanced point is not continuous (a weight on the empty side
    gives the neuron a balanced point of its own): the derivative there is along
    directions that keep them degenerate.

    **Arguments:**

    - `gauge`, `params`: the gauge and the parameters to balance (the model, or its
      `equinox.filter`-ed array part, and then the result comes back filtered).
    - `rtol`, `atol`: stop when a Newton step moves every log-scale by less than
      `atol + rtol * max|xi|` (default $\\epsilon^{3/4}$ of the dtype).
    - `max_steps`: the Newton step limit. Reaching it returns the last iterate, without
      an error (a float32 model far from balance, say): check
      [`gaugejax.balance_residual`][] when it matters.

    **Returns:** `(balanced_params, g)` with `balanced_params == gauge.act(g, params)`
    (exactly, except on Link-coupled sites: see above).
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
        g = gauge.exp(xi, dtype)
        return gauge.act(g, params, check=False), g
    # Link-coupled sites: the result is the last re-centred point (`_newton_generic`)
    xi, point = _implicit_generic(gauge, params, positive, rtol, atol, max_steps, free)
    return eqx.combine(point, eqx.filter(params, eqx.is_inexact_array, inverse=True)), gauge.exp(xi, dtype)


_ARMIJO = 1e-4
#: inexact Newton: each step's linear system is solved to this relative residual
_CG_RTOL = 1e-6
_CG_MAX_STEPS = 1000
_MAX_HALVINGS = 40
_RESOLVE = 1e3


def _damped_newton(trial, local, gradient, centre, xi, *, dtype, rtol, atol, max_steps):
    """Damped Newton on $F$, the loop both balance paths share: each step is the Newton
    step (or, where that is no descent direction, the preconditioned gradient), with an
    Armijo backtracking line search; a Newton step whose search fails is retried along the
    preconditioned gradient, and a step is only ever taken to a point where $F$ is finite
    (a non-finite step, from an inexact or ill-conditioned solve, is rejected).

    The problem comes as functions of a *centre* `c` (the structured path: the log-scales
    themselves; the Link path: the current parameters, re-centred after every step):

    - `trial(c, d)`: `(new centre, F there)` for the centre moved by log-scales `d` ($F$
      normalised to be O(1));
    - `local(c)`: `(grad, diag, newton, fallback)` at `c`: the (masked) gradient, a
      positive scale per log-scale (the Hessian's diagonal, zero only where the gradient
      is), the Newton step and the preconditioned gradient step `-grad / diag`;
    - `gradient(c)`: the gradient alone.

    `xi` (the log-scales' pytree, zeros) accumulates the steps. Stops when a step moves
    every log-scale by less than `atol + rtol * max|xi|`, when no step improves, or after
    `max_steps` iterations (a retry counts as one). Returns `(xi, centre)`."""
    eps = jnp.finfo(dtype).eps
    leaves = jtu.tree_leaves
    tmap = jax.tree_util.tree_map

    def dot(a, b):
        return sum(jnp.vdot(x, y) for x, y in zip(leaves(a), leaves(b)))

    def largest(tree):
        return jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0) for x in leaves(tree)]))

    def measure(grad, diag):
        # The largest Jacobi step |grad_i| / diag_i, with `diag` the Hessian's diagonal at
        # the current point for the trial point too: a Jacobi version of the natural
        # monotonicity test (the new gradient through the old Hessian). With each point's
        # own diagonal (the relative residual |mu_i| / (|in_i|^2 + |out_i|^2)) it
        # saturates: a nearly pruned neuron (incoming norm 1e-8 of its outgoing) reads 1.0
        # to rounding before and after every step while its moment map shrinks by e^-1 per
        # step, and "no improvement" there stopped balance far from the balanced point.
        return jnp.max(jnp.stack([jnp.max(jnp.where(d > 0, jnp.abs(g) / jnp.where(d > 0, d, 1), 0), initial=0)
                                  for g, d in zip(leaves(grad), leaves(diag))]))

    def search(c, f, grad, diag, step, slope):
        # Backtrack while the predicted decrease is above rounding in F. Below it, F cannot
        # tell a good step from a bad one, so the step is judged by the gradient instead:
        # taken if it reduces `measure` (quadratic convergence to the end), otherwise the
        # iteration has converged to working precision.
        resolvable = -slope > _RESOLVE * eps * f

        def shrink(s):  # the first pass tries the full step (one trace of `trial`)
            t, _, _, first = s
            t = jnp.where(first, jnp.ones((), dtype), 0.5 * t)
            return (t, *trial(c, tmap(lambda s: t * s, step)), jnp.zeros((), bool))

        def too_high(s):
            t, _, f_new, first = s
            return first | (resolvable & ~(f_new <= f + _ARMIJO * t * slope) & (t > 2.0**-_MAX_HALVINGS))

        t, new, f_new, _ = jax.lax.while_loop(too_high, shrink, (jnp.ones((), dtype), c, f, jnp.ones((), bool)))
        improved = jnp.where(resolvable, f_new <= f + _ARMIJO * t * slope,
                             measure(gradient(new), diag) < measure(grad, diag))
        improved = improved & jnp.isfinite(f_new)
        return tmap(lambda s: t * s, step), new, f_new, improved

    def body(carry):
        xi, c, f, it, _, retry, held = carry
        # A Newton step that failed its line search (an inexact float32 solve far from the
        # minimum) is retried along the preconditioned gradient before giving up.
        grad, diag, newton, fallback = jax.lax.cond(retry, lambda: (*held[:2], held[2], held[2]), lambda: local(c))
        # An inexact solve (float32, ill-conditioned Hessian) may not give a descent
        # direction: fall back to the preconditioned gradient, which always is one.
        slope = dot(grad, newton)
        ok = (slope < 0) & jnp.isfinite(slope)
        step = tmap(lambda a, b: jnp.where(ok, a, b), newton, fallback)
        delta, new, f_new, improved = search(c, f, grad, diag, step, jnp.where(ok, slope, dot(grad, fallback)))
        again = ~improved & ok & ~retry
        xi_new = tmap(jnp.add, xi, delta)
        converged = jnp.where(improved, largest(delta) <= atol + rtol * largest(xi_new), ~again)
        keep = lambda a, b: tmap(lambda u, v: jnp.where(improved, u, v), a, b)  # noqa: E731
        return (keep(xi_new, xi), keep(new, c), jnp.where(improved, f_new, f), it + 1, converged, again,
                (grad, diag, fallback))

    def cond(carry):
        return (carry[3] < max_steps) & ~carry[4]

    zero = tmap(jnp.zeros_like, xi)
    false = jnp.zeros((), bool)
    init = (xi, centre, trial(centre, zero)[1], jnp.zeros((), jnp.int32), false, false, (zero, zero, zero))
    xi, centre, *_ = jax.lax.while_loop(cond, body, init)
    return xi, centre


@eqx.filter_jit
def _newton_structured(gauge, params, positive, rtol, atol, max_steps, free=None):
    """Damped Newton (`_damped_newton`) on $F(\\xi) = \\tfrac12\\|\\exp(\\xi)\\cdot\\theta\\|^2$
    with the exact structured Hessian $2G$ (see `gaugejax/_rescaling.py`), each step a
    Jacobi-preconditioned CG solve: globally convergent on this convex problem, quadratic
    near the minimum. The centre is the log-scales themselves (no re-centring: the result
    is `act(exp(xi), params)` exactly).

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

    def trial(xi, delta):
        new = _axpy(1.0, delta, xi)
        moved = _scaled(leaves, pairs, new)
        return new, 0.5 * sum(jnp.sum(moved[p.index] ** 2) for p, _ in pairs) / scale

    def moment(xi):
        cur = [x / jnp.sqrt(scale) if eqx.is_inexact_array(x) else x for x in _scaled(leaves, pairs, xi)]
        grad = _rs.adjoint(gauge, cur, cur, positive)  # moment map / scale
        grad = {n: jnp.where(free[n], g, 0) for n, g in grad.items()}
        diag = _rs.gram_diagonal(gauge, cur, positive)  # |in|^2 + |out|^2 per neuron
        return cur, grad, diag

    def local(xi):
        cur, grad, diag = moment(xi)
        # the Hessian of F is 2 G
        rhs = {n: -x for n, x in grad.items()}
        newton, pre = _rs.solve_gram(gauge, cur, rhs, diag, sites=positive, scale=2.0, rtol=_CG_RTOL,
                                     atol=0.0, max_steps=_CG_MAX_STEPS, free=free)
        return grad, {n: 2 * d for n, d in diag.items()}, newton, pre.mv(rhs)

    xi0 = {n: gauge.site_groups[n].algebra_zeros(dtype) for n in positive}
    xi, _ = _damped_newton(trial, local, lambda xi: moment(xi)[1], xi0, xi0,
                           dtype=dtype, rtol=rtol, atol=atol, max_steps=max_steps)
    return xi


def _link_problem(gauge, params, positive, free):
    """The pieces `_newton_generic` and its derivative share: `params` split into its
    inexact leaves and the rest, the flat layout of the log-scales, which of them are free,
    `moved(point, d)` (the inexact leaves of `exp(d) . point`, `d` flat) and
    `half(point)` ($\\tfrac12\\|\\cdot\\|^2$ over the leaves the sites touch)."""
    dtype = _dtype(params)
    lay = _rs.layout(gauge, positive)
    if free is None:
        free = {n: jnp.ones((), bool) for n in positive}
    free_vec = _rs.flatten({n: jnp.broadcast_to(free[n], shape) for n, (_, shape) in lay.items()}, lay)
    point, static = eqx.partition(params, eqx.is_inexact_array)
    sites = set(positive)
    touched = [plan.index for plan in gauge.plans
               if any(lin.site in sites for lin in plan.linear)
               or any(lp.out_site in sites or lp.in_site in sites for lp in plan.links)]

    def moved(p, d):
        out = gauge.act(gauge.exp(_rs.unflatten(d, lay), dtype), eqx.combine(p, static), check=False)
        return eqx.filter(out, eqx.is_inexact_array)

    def half(p):
        ls = jtu.tree_leaves(eqx.combine(p, static))
        return 0.5 * sum(jnp.sum(ls[i] ** 2) for i in touched)

    return point, lay, free_vec, moved, half


@eqx.filter_jit
def _newton_generic(gauge, params, positive, rtol, atol, max_steps, free=None):
    """Damped Newton (`_damped_newton`) on the autodiff Hessian of $F$, for rescaling sites
    coupled through a [`gaugejax.Link`][] (a ResNet's or a neural ODE's streams). A link
    acts affinely, $A \\mapsto g A g'^{-1} + (g g'^{-1} - I)/h$, so $F$ is not a sum of
    exponentials of linear forms and the structured Gram matrix does not apply: each step
    takes $N$ JVPs of the gradient ($N$ rescaled neurons; fine for lattice gauges of modest
    width) and a Jacobi-scaled Cholesky solve (an indefinite Hessian far from the minimum
    gives a non-finite step, and the loop falls back to the gradient).

    Every accepted step re-centres: the parameters move to the new point, and the next
    step is a Newton step at log-scales 0 there. Acting from the starting point instead,
    a link's diagonal $e^{d}(A_{ii} + 1/h) - 1/h$ cancels to an error of
    $\\epsilon e^{|d|}/h$, which bounds the moment map (with this same loop, a ReLU ResNet
    moved by `gauge.sample(scale=4)` / `(scale=5)` stalled at relative residuals of 1e-8 /
    1.5e-7 in float64 and 2e-3 in float32); at the current point the final steps are small
    and exact.

    Returns `(xi, point)`: the summed log-scales `{site: array}` and the inexact leaves of
    the last point (`None` elsewhere), which is `act(exp(xi), params)` up to the rounding
    of the action."""
    dtype = _dtype(params)
    point, lay, free_vec, moved, half = _link_problem(gauge, params, positive, free)
    # normalise so that F is O(1): the tolerances are then relative
    scale = 2 * half(point)
    scale = jnp.where(scale > 0, scale, 1)
    zero = jnp.zeros((_rs.num_scales(gauge, positive),), dtype)

    def value(p, d):
        return half(moved(p, d)) / scale

    def trial(p, d):
        new = moved(p, d)
        return new, half(new) / scale

    def gradient(p):
        return jnp.where(free_vec, jax.grad(value, argnums=1)(p, zero), 0)

    def local(p):
        def grad_aux(d):
            g = jax.grad(value, argnums=1)(p, d)
            return g, g

        hess, grad = jax.jacfwd(grad_aux, has_aux=True)(zero)  # one trace of the gradient
        grad = jnp.where(free_vec, grad, 0)
        d = jnp.diagonal(hess)
        pos = free_vec & (d > 0)
        ref = jnp.max(jnp.where(pos, d, 0), initial=0)
        diag = jnp.where(pos, d, jnp.where(ref > 0, ref, 1))
        newton = jnp.where(free_vec, _implicit_solve(hess, -grad, free_vec), 0)
        return grad, diag, newton, -grad / diag

    xi, point = _damped_newton(trial, local, gradient, point, zero,
                               dtype=dtype, rtol=rtol, atol=atol, max_steps=max_steps)
    return _rs.unflatten(xi, lay), point


def _implicit_solve(hess: Array, rhs: Array, free: Array) -> Array:
    """`hess^{-1} rhs` restricted to the `free` entries (zero on the others), by the
    Jacobi-scaled Cholesky solve of `_rescaling.cholesky_solve`: the fixed rows and
    columns are replaced by a multiple of the identity scaled like the free diagonal."""
    ref = jnp.max(jnp.where(free, jnp.diagonal(hess), 0), initial=0)
    ref = jnp.where(ref > 0, ref, 1)
    h = jnp.where(free[:, None] & free[None, :], hess, 0) + jnp.diag(jnp.where(free, 0, ref))
    return _rs.cholesky_solve(h, jnp.where(free, rhs, 0))


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
    x = _implicit_solve(2 * gram, -_rs.flatten(rhs, lay), free_vec)
    return xi, _rs.unflatten(x, lay)


@eqx.filter_custom_jvp
def _implicit_generic(gauge, params, positive, rtol, atol, max_steps, free):
    """`_newton_generic`'s `(xi, point)`, differentiable in `params` by the implicit
    function theorem, as `_implicit_structured`, with the autodiff Hessian; everything is
    evaluated at the balanced point, where it is well conditioned: the tangent of
    `params` is carried there by the action at fixed log-scales, $\\dot p$, and then
    $\\dot\\xi = -H^{-1}\\,\\partial_p\\mu\\,[\\dot p]$ and $\\dot{\\mathrm{point}} = \\dot p +
    V\\dot\\xi$ (for positive rescalings, $\\exp(\\xi + \\eta) = \\exp(\\eta)\\exp(\\xi)$)."""
    return _newton_generic(gauge, params, positive, rtol, atol, max_steps, free)


@_implicit_generic.def_jvp
def _implicit_generic_jvp(primals, tangents):
    gauge, params, positive, rtol, atol, max_steps, free = primals
    xi, point = _implicit_generic(*primals)
    zeros = jax.tree.map(jnp.zeros_like, (xi, point))
    if tangents[1] is None:
        return (xi, point), zeros
    diff, lay, free_vec, moved, half = _link_problem(gauge, params, positive, free)
    t_leaves = jtu.tree_structure(params).flatten_up_to(tangents[1])
    t_diff = jtu.tree_unflatten(jtu.tree_structure(params), [
        None if not eqx.is_inexact_array(x) else jnp.zeros_like(x) if t is None else t
        for x, t in zip(jtu.tree_leaves(params), t_leaves)])
    xi_vec = _rs.flatten(xi, lay)
    zero = jnp.zeros_like(xi_vec)
    # the tangent carried to the balanced point by the action at fixed log-scales
    _, p_dot = jax.jvp(lambda p: moved(p, xi_vec), (diff,), (t_diff,))
    moment = jax.grad(lambda p, d: half(moved(p, d)), argnums=1)
    _, rhs = jax.jvp(lambda p: moment(p, zero), (point,), (p_dot,))
    hess = jax.hessian(lambda d: half(moved(point, d)))(zero)
    live = free_vec & (jnp.diagonal(hess) > 0)
    xi_dot = _implicit_solve(hess, -rhs, live)
    _, vertical = jax.jvp(lambda d: moved(point, d), (zero,), (xi_dot,))
    point_dot = jax.tree.map(jnp.add, p_dot, vertical)
    return (xi, point), (_rs.unflatten(xi_dot, lay), point_dot)


def _axpy(t, step, xi):
    return {n: xi[n] + t * step[n] for n in xi}


@eqx.filter_jit
def balance_residual(gauge: Gauge, params: PyTree) -> Array:
    """The largest relative moment-map residual over positive-scaling neurons:
    $\\max_i |\\mu_i| / (\\|\\mathrm{in}_i\\|^2 + \\|\\mathrm{out}_i\\|^2)$, where the
    denominator is the sum of the two squared norms the moment map compares.

    Degenerate neurons (incoming or outgoing weights all zero, and the like, see
    [`gaugejax.degenerate_units`][]) are left out: they have no balanced point, and their
    relative residual is 1 wherever they are on the orbit. A NaN or infinite parameter
    that a neuron scales makes the result NaN."""
    params = gauge._complete(params)  # an equinox.filter-ed model too
    gauge, params, _, _ = without_views(gauge, params)
    mu = moment_map(gauge, params)
    sides, dead, _ = _sides_and_dead(gauge, params)
    if not sides:
        return jnp.zeros(())
    res = []
    for n, (n_in, n_out) in sides.items():
        total = n_in + n_out
        # only degenerate neurons and those with no weights are left out: a NaN (total > 0
        # is false) counts, and the maximum is NaN (it read 0, "balanced", once)
        keep = ~dead[n] & ~(total == 0)
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
