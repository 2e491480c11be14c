"""Canonical forms: one distinguished point on every orbit (MATH.md, "Orbit geometry").

`canonicalize(gauge, theta)` returns `(canon, g)` with `canon == act(g, theta)` and
`canon(h . theta) == canon(theta)` for every `h` (ties aside). It is built in stages, each
fixing part of the group and leaving the rest to the next:

1. **Translations** (additive sites): the translated leaf is shifted to zero.
2. **Balancing** (the non-compact continuous part): the minimum-norm point of the orbit
   under positive rescalings and $GL(n)$ (Kempf-Ness: the moment map vanishes there; it is
   unique up to the compact part of the group). Positive rescalings use
   [`gaugejax.balance`][] (Newton on the convex log-scale problem, run to tolerance); a
   $GL$ site with produced Gram $A = \\sum XX^\\top$ and consumed Gram $C = \\sum YY^\\top$
   (over its coupled leaves, matricised along the site's axis) has the closed-form optimum
   $g^\\top g = A^{-1/2}(A^{1/2} C A^{1/2})^{1/2} A^{-1/2}$ (the geometric mean of
   $A^{-1}$ and $C$); coupled sites alternate until the moment map vanishes.
3. **Rotations** ($O(n)$ sites, and what is left of a $GL$ site after balancing): rotate to
   the eigenbasis of $A + C$ (produced plus consumed Gram; $A = C$ at a balanced $GL$
   site), eigenvalues in decreasing order ("SVD-balanced
   factors": for a two-layer linear map $W_2 W_1 = U S V^\\top$ this gives
   $W_1 = S^{1/2} V^\\top$, $W_2 = U S^{1/2}$ up to signs).
4. **Permutations** (permutation, monomial and signed-permutation sites): neurons sorted by
   decreasing total squared norm of everything they touch (incoming and outgoing weights,
   bias), a quantity every other site's remaining action leaves unchanged.
5. **Signs** (sign flips, signed permutations, and the basis vectors of rotation sites):
   the sign making the entry of largest magnitude of the neuron's produced weights
   positive. Sites are visited in dependency order (a feedforward net: first hidden layer
   first), so that the weights read are already in canonical coordinates. A neuron whose
   produced weights are all zero (pruned) is read past by the later sites and then decided
   by its largest consumed weight, once every other sign is fixed.

Ties (equal norms, equal eigenvalues, an entry of largest magnitude shared) are
non-generic; at them the canonical form is not unique.

Not supported: gauges with [`gaugejax.Link`][] couplings on continuous sites, and $GL$
sites coupled twice to one leaf (no closed form; a `NotImplementedError` says so).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from ._balance import balance, degenerate_units, moment_map
from ._gauge import Gauge, _expand, without_views
from ._groups import (
    GL,
    Monomial,
    Orthogonal,
    Permutation,
    PositiveDiagonal,
    PositiveMonomial,
    SignedPermutation,
    SignFlip,
    Translation,
)
from ._horizontal import _dtype, _is_tracer, _raise_if_not_finite


_HIGHEST = jax.lax.Precision.HIGHEST


def check_finite(gauge: Gauge, params: PyTree, what: str = "params") -> PyTree:
    """Raise a `ValueError` naming the first leaf of `params` with NaN or inf (eagerly), or
    attach an `equinox.error_if` check that does so at run time (under `jit`)."""
    gauge._check_params(params)
    if not _is_tracer(params):
        _raise_if_not_finite(gauge, params, params, what,
                             "a canonical form (and any orbit computation) needs finite parameters.")
        return params
    leaves, treedef = jtu.tree_flatten(params)
    out = []
    for path, leaf in zip(gauge.paths, leaves):
        if eqx.is_inexact_array(leaf):
            leaf = eqx.error_if(leaf, ~jnp.all(jnp.isfinite(leaf)),
                                f"`{what}` leaf {path!r} contains NaN or inf.")
        out.append(leaf)
    return jtu.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------------------
# leaf views
# ---------------------------------------------------------------------------------------
def _matricise(x: Array, batch_axes: tuple[int, ...], axis: int) -> Array:
    """`x` as `(*batch, n, m)`: the site's batch axes, its axis, then the rest flattened."""
    front = (*batch_axes, axis)
    y = jnp.moveaxis(x, front, tuple(range(len(front))))
    return y.reshape(*y.shape[: len(front)], -1)


def _site_views(gauge: Gauge, leaves: list[Array], site: str, kind: str | None = None):
    """[(plan, lin, X)] for every linear coupling of `site` (of `kind` if given)."""
    gauge.require_whole_axes("canonicalize")
    out = []
    for plan in gauge.plans:
        for lin in plan.linear:
            if lin.site == site and (kind is None or lin.kind == kind):
                out.append((plan, lin, _matricise(leaves[plan.index], lin.batch_axes, lin.axis)))
    return out


def _gram(views, batch: tuple[int, ...], n: int, dtype) -> Array:
    a = jnp.zeros((*batch, n, n), dtype)
    for _, _, x in views:
        a = a + jnp.matmul(x, jnp.swapaxes(x, -1, -2), precision=_HIGHEST)
    return a


def _sym_fn(a: Array, fn) -> Array:
    w, q = jnp.linalg.eigh(0.5 * (a + jnp.swapaxes(a, -1, -2)))
    return jnp.matmul(q * fn(w)[..., None, :], jnp.swapaxes(q, -1, -2), precision=_HIGHEST)


# ---------------------------------------------------------------------------------------
# group elements built per site
# ---------------------------------------------------------------------------------------
def _perm_elem(group, perm: Array, dtype) -> Any:
    if isinstance(group, Permutation):
        return perm
    ident = group.identity(dtype)
    return Monomial(perm.astype(jnp.int32), ident.scale)


def _sign_elem(group, sign: Array, dtype) -> Any:
    if isinstance(group, SignFlip):
        return sign
    if isinstance(group, SignedPermutation):
        return Monomial(group.identity(dtype).perm, sign)
    # rotation sites: diag(sign)
    eye = jnp.broadcast_to(jnp.eye(group.n, dtype=dtype), (*sign.shape, group.n))
    return jnp.broadcast_to(sign[..., :, None], eye.shape) * eye


def _apply(gauge: Gauge, params: PyTree, g_total: dict, step: dict) -> tuple[PyTree, dict]:
    return gauge.act(step, params, check=False), gauge.compose(step, g_total)


def _with(gauge: Gauge, dtype, **elems) -> dict:
    g = gauge.identity(dtype)
    g.update(elems)
    return g


# ---------------------------------------------------------------------------------------
# stage checks
# ---------------------------------------------------------------------------------------
def _check_supported(gauge: Gauge, who: str = "canonicalize") -> None:
    gauge.require_whole_axes(who)
    groups = gauge.site_groups
    for plan in gauge.plans:
        for lp in plan.links:
            for s in (lp.out_site, lp.in_site):
                if s is not None and groups[s].algebra_dim > 0:
                    raise NotImplementedError(
                        f"{who}: site {s!r} ({groups[s]!r}) is coupled through a Link "
                        f"(leaf {plan.path!r}); the affine action of links has no closed-form "
                        "balanced point in gaugejax yet."
                    )
        seen = [lin.site for lin in plan.linear if isinstance(groups[lin.site], GL)]
        del seen[:0]
        dup = {s for s in seen if seen.count(s) > 1}
        if dup:
            raise NotImplementedError(
                f"{who}: GL site(s) {sorted(dup)} act on two axes of leaf {plan.path!r} "
                "(g W g^-1): the minimum-norm point has no closed form there."
            )


def _check_gl_closed(gauge: Gauge, who: str = "canonicalize") -> None:
    """A GL orbit has a minimum-norm point only if the site's produced and consumed Gram
    matrices can be non-singular: the site may be no wider than what it reads and writes."""
    groups = gauge.site_groups
    for name in _gl_sites(gauge):
        n = groups[name].n
        for kind in ("produce", "consume"):
            m = 0
            for plan in gauge.plans:
                for lin in plan.linear:
                    if lin.site == name and lin.kind == kind:
                        m += int(np.prod(plan.shape)) // (n * int(np.prod([plan.shape[b] for b in lin.batch_axes])))
            if m < n:
                raise ValueError(
                    f"{who}: GL site {name!r} has dimension {n} but its {kind}d leaves "
                    f"span at most {m} directions, so its {kind}d Gram matrix is singular and "
                    "the GL orbit has no minimum-norm point (it is not closed: the norm can be "
                    "pushed to its infimum only in a limit). Use a smaller group for this site "
                    "(e.g. gaugejax.Orthogonal), or make it no wider than its fan-in and fan-out."
                )


def _rotation_sites(gauge: Gauge) -> list[str]:
    return [n for n, g in gauge.sites if isinstance(g, (GL, Orthogonal))]


def _positive_sites(gauge: Gauge) -> list[str]:
    return [n for n, g in gauge.sites if isinstance(g, (PositiveDiagonal, PositiveMonomial))]


def _gl_sites(gauge: Gauge) -> list[str]:
    return [n for n, g in gauge.sites if isinstance(g, GL)]


# ---------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------
def _translate_stage(gauge, params, g_total, dtype):
    groups = gauge.site_groups
    leaves = jtu.tree_leaves(params)
    elems = {}
    for name, group in gauge.sites:
        if isinstance(group, Translation):
            plan = gauge._translation_plan(name)
            elems[name] = -leaves[plan.index]
    if not elems:
        return params, g_total
    del groups
    return _apply(gauge, params, g_total, _with(gauge, dtype, **elems))


def _gl_step(gauge, params, dtype):
    """One sweep of closed-form GL balancing, site by site."""
    groups = gauge.site_groups
    g_sweep = gauge.identity(dtype)
    for name in _gl_sites(gauge):
        group = groups[name]
        leaves = jtu.tree_leaves(params)
        a = _gram(_site_views(gauge, leaves, name, "produce"), group.batch, group.n, dtype)
        c = _gram(_site_views(gauge, leaves, name, "consume"), group.batch, group.n, dtype)
        eps = jnp.finfo(dtype).eps
        scale = jnp.maximum(jnp.trace(a, axis1=-2, axis2=-1) + jnp.trace(c, axis1=-2, axis2=-1), 1)
        eye = jnp.broadcast_to(jnp.eye(group.n, dtype=dtype), a.shape)
        jitter = jnp.broadcast_to((eps * scale)[..., None, None], a.shape)
        a = a + jitter * eye
        c = c + jitter * eye
        a_half = _sym_fn(a, jnp.sqrt)
        a_mhalf = _sym_fn(a, lambda w: 1 / jnp.sqrt(w))
        mid = _sym_fn(jnp.matmul(jnp.matmul(a_half, c, precision=_HIGHEST), a_half, precision=_HIGHEST), jnp.sqrt)
        m = jnp.matmul(jnp.matmul(a_mhalf, mid, precision=_HIGHEST), a_mhalf, precision=_HIGHEST)
        g = _sym_fn(m, jnp.sqrt)  # symmetric positive definite, g^T g = m
        step = _with(gauge, dtype, **{name: g})
        params = gauge.act(step, params, check=False)
        g_sweep = gauge.compose(step, g_sweep)
    return params, g_sweep


def _moment_residual(gauge, params, sites) -> Array:
    mu = moment_map(gauge, params)
    # degenerate neurons have no balanced point (`balance` keeps their scale)
    dead = degenerate_units(gauge, params)
    mu = {s: jnp.where(dead[s], 0, m) if s in dead else m for s, m in mu.items()}
    leaves = jtu.tree_leaves(params)
    total = sum(jnp.sum(x**2) for x in leaves if eqx.is_inexact_array(x))
    return jnp.max(jnp.stack([jnp.max(jnp.abs(mu[s])) for s in sites])) / total


def _balance_stage(gauge, params, g_total, dtype, rtol, max_sweeps):
    pos, gl = _positive_sites(gauge), _gl_sites(gauge)
    if not pos and not gl:
        return params, g_total
    if not gl:
        p, g = balance(gauge, params)
        return p, gauge.compose(g, g_total)

    # only arrays ride in the loop's carry (it would turn a module's float or bool fields,
    # e.g. equinox's Dropout, into arrays)
    arrays, static = eqx.partition(params, eqx.is_array)

    def sweep(carry):
        p, g_acc, it, _ = carry
        p = eqx.combine(p, static)
        if pos:
            p, g = balance(gauge, p)
            g_acc = gauge.compose(g, g_acc)
        p, g = _gl_step(gauge, p, dtype)
        g_acc = gauge.compose(g, g_acc)
        return eqx.filter(p, eqx.is_array), g_acc, it + 1, _moment_residual(gauge, p, pos + gl)

    def cond(carry):
        _, _, it, res = carry
        return (it < max_sweeps) & (res > rtol)

    init = (arrays, g_total, jnp.asarray(0), jnp.asarray(jnp.inf, dtype))
    arrays, g_total, _, _ = jax.lax.while_loop(cond, sweep, init)
    return eqx.combine(arrays, static), g_total


def _rotation_stage(gauge, params, g_total, dtype):
    groups = gauge.site_groups
    for name in _rotation_sites(gauge):
        group = groups[name]
        leaves = jtu.tree_leaves(params)
        # produced plus consumed Gram (equal for a balanced GL site): its eigenbasis is
        # generic even where the site is wider than its fan-in (A alone is then singular)
        a = _gram(_site_views(gauge, leaves, name), group.batch, group.n, dtype)
        _, q = jnp.linalg.eigh(0.5 * (a + jnp.swapaxes(a, -1, -2)))
        q = q[..., ::-1]  # decreasing eigenvalues
        rot = jnp.swapaxes(q, -1, -2)  # new basis: rows are eigenvectors
        params, g_total = _apply(gauge, params, g_total, _with(gauge, dtype, **{name: rot}))
    return params, g_total


def _perm_sites(gauge: Gauge) -> list[str]:
    return [n for n, g in gauge.sites if isinstance(g, (Permutation, PositiveMonomial, SignedPermutation))]


def _sign_sites(gauge: Gauge) -> list[str]:
    return [n for n, g in gauge.sites if isinstance(g, (SignFlip, SignedPermutation, GL, Orthogonal))]


def _permutation_stage(gauge, params, g_total, dtype):
    groups = gauge.site_groups
    for name in _perm_sites(gauge):
        group = groups[name]
        leaves = jtu.tree_leaves(params)
        key = jnp.zeros((*group.batch, group.n), dtype)
        for _, _, x in _site_views(gauge, leaves, name):
            key = key + jnp.sum(x**2, axis=-1)
        # an outer permutation (heads) acting on a batched site is handled by that site's
        # own turn; a batched permutation sorts within each batch entry
        perm = jnp.argsort(-key, axis=-1, stable=True).astype(jnp.int32)
        params, g_total = _apply(gauge, params, g_total, _with(gauge, dtype, **{name: _perm_elem(group, perm, dtype)}))
    return params, g_total


def _sign_order(gauge: Gauge) -> list[tuple[str, str]]:
    """Sign sites in dependency order, each with the coupling kind whose leaves decide it."""
    gauge.require_whole_axes("canonicalize")
    pending = _sign_sites(gauge)
    done: set[str] = set()
    order = []

    def eligible(site: str, kind: str) -> bool:
        found = False
        for plan in gauge.plans:
            for lin in plan.linear:
                if lin.site != site or lin.kind != kind:
                    continue
                own = {*lin.batch_axes, lin.axis}
                others = [o for o in plan.linear if o.axis not in own]
                if all(o.site not in pending or o.site in done for o in others):
                    found = True
        return found

    while len(done) < len(pending):
        progress = False
        for site in pending:
            if site in done:
                continue
            for kind in ("produce", "consume"):
                if eligible(site, kind):
                    order.append((site, kind))
                    done.add(site)
                    progress = True
                    break
        if not progress:
            stuck = [s for s in pending if s not in done]
            raise NotImplementedError(
                f"canonicalize: cannot order the sign choices of sites {stuck}: each of their "
                "leaves also carries another such site, so no sign convention is invariant."
            )
    return order


def _sign_stage(gauge, params, g_total, dtype):
    """Each sign site, in dependency order, from its deciding leaves (`_sign_order`). A neuron
    whose deciding weights are all zero (a pruned neuron: its incoming weights and bias
    zero) has no sign to read there; it is left undecided, other sites read past its
    entries (whose sign is not fixed yet), and a second pass decides it from its other
    side, once every other sign is fixed (one more action for the whole gauge)."""
    groups = gauge.site_groups
    sign_sites = set(_sign_sites(gauge))
    order = _sign_order(gauge)
    rank = {site: k for k, (site, _) in enumerate(order)}
    undecided: dict[str, Array] = {}

    def decide(params, name, kind, done_only):
        leaves = jtu.tree_leaves(params)
        views = []
        for plan, lin, _ in _site_views(gauge, leaves, name, kind):
            own = {*lin.batch_axes, lin.axis}
            others = [o for o in plan.linear if o.axis not in own]
            if done_only and not all(o.site not in sign_sites or rank[o.site] < rank[name] for o in others):
                continue
            x = leaves[plan.index]
            for o in others:  # entries on another site's undecided neurons are read as zero
                if o.site in undecided:
                    x = jnp.where(_expand(undecided[o.site], (*o.batch_axes, o.axis), x.ndim), 0, x)
            views.append(_matricise(x, lin.batch_axes, lin.axis))
        if not views:
            return None, None
        z = jnp.concatenate(views, axis=-1)
        idx = jnp.argmax(jnp.abs(z), axis=-1)
        pick = jnp.take_along_axis(z, idx[..., None], axis=-1)[..., 0]
        return jnp.where(pick < 0, -1, 1).astype(dtype), pick == 0

    for name, kind in order:
        sign, none = decide(params, name, kind, True)
        undecided[name] = none
        params, g_total = _apply(gauge, params, g_total, _with(gauge, dtype, **{name: _sign_elem(groups[name], sign, dtype)}))
    # every other sign is fixed now, except undecided ones, whose entries stay masked: the
    # second-pass signs do not depend on each other, so they are applied in one step
    second = {}
    for name, kind in order:
        sign, _ = decide(params, name, "consume" if kind == "produce" else "produce", False)
        if sign is not None:
            second[name] = _sign_elem(groups[name], jnp.where(undecided[name], sign, jnp.ones_like(sign)), dtype)
    if second:
        params, g_total = _apply(gauge, params, g_total, _with(gauge, dtype, **second))
    return params, g_total


# ---------------------------------------------------------------------------------------
# public
# ---------------------------------------------------------------------------------------
def canonicalize(
    gauge: Gauge,
    params: PyTree,
    *,
    rtol: float | None = None,
    max_sweeps: int = 200,
) -> tuple[PyTree, dict[str, Any]]:
    """The canonical representative of the orbit of `params`, and the group element that
    takes `params` there.

    Stages (see the module notes): translated leaves shifted to zero; the balanced
    (minimum-norm) point under positive rescalings and $GL$ (moment map zero); rotation
    sites in the decreasing eigenbasis of their Gram matrix; neurons of permutation
    sites sorted by decreasing squared norm; signs chosen so that each neuron's
    largest-magnitude produced weight is positive.

    Properties (tested): `canon == gauge.act(g, params)`; the network function is
    unchanged; `canonicalize(act(h, params))` equals `canonicalize(params)` for every `h`
    (ties aside); idempotence. Degenerate neurons (an all-zero side, see
    [`gaugejax.degenerate_units`][]) have no balanced point and keep their scale, so the
    canonical form is canonical up to their scales (and the order their norms give).

    Differentiable (`jax.grad`, `jax.jvp`) for gauges without $GL$ sites: the balance is
    differentiated implicitly (see [`gaugejax.balance`][]), the sort and sign choices are
    locally constant. With $GL$ sites the alternating balancing loop is a `while_loop`,
    which JAX cannot differentiate in reverse mode.

    **Arguments:**

    - `gauge`: a [`gaugejax.Gauge`][].
    - `params`: the parameters (the model, or its `equinox.filter`-ed array part, and
      then the result comes back filtered); NaN or inf raises a `ValueError` naming the
      leaf (an `equinox.error_if` under `jit`).
    - `rtol`: relative moment-map tolerance of the joint $GL$ / rescaling balancing
      (default $\\epsilon^{0.75}$; positive-only gauges use [`gaugejax.balance`][]'s own).
    - `max_sweeps`: the most alternating sweeps when $GL$ sites are present.

    **Returns:** `(canonical_params, g)`.

    References: Kempf and Ness (1979) for the minimum-norm point; Stock et al.,
    "Equi-normalization of neural networks" (ICLR 2019) for balancing by sweeps (here
    replaced by Newton to tolerance).
    """
    if not isinstance(gauge, Gauge):
        raise TypeError(f"`gauge` must be a gaugejax.Gauge, got {type(gauge).__name__}.")
    filtered = gauge._filtered_io(params)
    if filtered is not None:  # an equinox.filter-ed model: canonicalized whole, returned filtered
        canon, g = canonicalize(gauge, filtered[0], rtol=rtol, max_sweeps=max_sweeps)
        return filtered[1](canon), g
    params = check_finite(gauge, params)
    whole = without_views(gauge, params)
    if whole.gauge is not gauge:  # leaves coupled through views: canonicalize them reshaped
        canon, g = canonicalize(whole.gauge, whole.params, rtol=rtol, max_sweeps=max_sweeps)
        return whole.restore(canon), whole.restore_element(g)
    _check_supported(gauge)
    _check_gl_closed(gauge)
    dtype = _dtype(params)
    rtol = float(jnp.finfo(dtype).eps ** 0.75) if rtol is None else rtol
    return _canonicalize(gauge, params, rtol, max_sweeps)


@eqx.filter_jit
def _canonicalize(gauge, params, rtol, max_sweeps):
    dtype = _dtype(params)
    g_total = gauge.identity(dtype)
    params, g_total = _translate_stage(gauge, params, g_total, dtype)
    params, g_total = _balance_stage(gauge, params, g_total, dtype, rtol, max_sweeps)
    params, g_total = _rotation_stage(gauge, params, g_total, dtype)
    params, g_total = _permutation_stage(gauge, params, g_total, dtype)
    params, g_total = _sign_stage(gauge, params, g_total, dtype)
    return params, g_total


def _sq(tree) -> Array:
    return sum(jnp.sum(x**2) for x in jtu.tree_leaves(tree) if eqx.is_inexact_array(x))


def gauge_distance(gauge: Gauge, a: PyTree, b: PyTree, *, relative: bool = False) -> Array:
    """A gauge-invariant distance between two parameter sets of the same architecture:

    $$d(a, b) = \\min_{k} \\|\\bar a - k\\cdot\\bar b\\|,$$

    where $\\bar a, \\bar b$ are the canonical forms ([`gaugejax.canonicalize`][]: the
    non-compact part of the group is fixed by balancing) and $k$ ranges over what is left
    (permutations, signs, rotations), minimised by weight matching / Procrustes
    ([`gaugejax.align`][]). $d(h\\cdot a, h'\\cdot b) = d(a, b)$, $d(a, h\\cdot a) = 0$ (up
    to the tolerance of balancing), and $d$ is symmetric up to the local optimum of the
    matching.

    The minimum over $k$ is a local search (weight matching started from the canonical
    forms; exact matching of several layers is NP-hard), so $d$ is an upper bound on the
    true minimum. It reads only the canonical forms, which is what makes it invariant:
    [`gaugejax.align`][] run on particular representatives (it also starts from their
    identity) can land on a closer point, and a smaller $\\|a - g\\cdot b\\|$. Degenerate
    neurons ([`gaugejax.degenerate_units`][]) have no canonical scale: their orbit is not
    closed, the canonical form keeps the scale they had, and $d(a, h\\cdot a)$ is then
    the size of $h$'s change of that scale on their nonzero side rather than 0.

    **Arguments:**

    - `gauge`: the gauge of both models.
    - `a`, `b`: parameters of the same structure and shapes (else a `ValueError`).
    - `relative`: divide by $\\sqrt{(\\|\\bar a\\|^2 + \\|\\bar b\\|^2)/2}$.

    **Returns:** a scalar.
    """
    from ._align import _check_same_architecture, align

    if not isinstance(gauge, Gauge):
        raise TypeError(f"`gauge` must be a gaugejax.Gauge, got {type(gauge).__name__}.")
    _check_same_architecture(gauge, a, b)
    ca, _ = canonicalize(gauge, a)
    cb, _ = canonicalize(gauge, b)
    aligned, _ = align(gauge, ca, cb, balance_first=False)
    d = jnp.sqrt(_sq(jtu.tree_map(lambda x, y: x - y if eqx.is_inexact_array(x) else None, ca, aligned)))
    if relative:
        den = jnp.sqrt(0.5 * (_sq(ca) + _sq(cb)))
        d = d / jnp.where(den > 0, den, 1)  # two zero models: distance 0
    return d

