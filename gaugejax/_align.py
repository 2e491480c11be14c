"""Alignment and merging of two models of one architecture (MATH.md, "Orbit geometry").

`align(gauge, a, b)` finds $g$ with $g\\cdot b \\approx a$:

1. the non-compact part of the group (positive rescalings, $GL$, translations) is fixed by
   bringing both models to their balanced points (as in [`gaugejax.canonicalize`][]);
2. what is left (permutations, signs, rotations) is matched by coordinate descent on
   $\\langle a, k\\cdot b\\rangle$, one site at a time with the others held (Git Re-Basin's
   weight matching): a linear assignment for permutation and monomial sites (signs from the
   sign of the matched correlation for signed permutations), orthogonal Procrustes for
   $O(n)$ sites and for what is left of a $GL$ site after balancing;
3. the descent is started twice, from the identity and from the element that maps the
   canonical form of `b` onto that of `a` ([`gaugejax.canonicalize`][]: neurons sorted by
   norm, signs by convention, rotations to the Gram eigenbasis), and the better end point
   is kept. For a planted $b = h\\cdot a$ the second start is $h^{-1}$ itself (both models
   have one canonical form), a fixed point of the descent: recovery is exact, where a
   descent from the identity alone can stall in a wrong local optimum.

The assignment solver runs under `jit` (`optax.assignment.hungarian_algorithm`); on CPU
`scipy.optimize.linear_sum_assignment` may serve as a host fast path (`solver="scipy"`,
through `jax.pure_callback`).

References: Ainsworth, Hayase, Srinivasa, "Git Re-Basin" (ICLR 2023); Jordan et al.,
"REPAIR: REnormalizing Permuted Activations for Interpolation Repair" (ICLR 2023).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import Array, PyTree

from . import _paths
from ._canonical import (
    _balance_stage,
    _check_gl_closed,
    _check_supported,
    _matricise,
    _permutation_stage,
    _rotation_stage,
    _sign_stage,
    _translate_stage,
    check_finite,
)
from ._gauge import Gauge, without_views
from ._groups import (
    GL,
    Monomial,
    Orthogonal,
    Permutation,
    PositiveMonomial,
    SignedPermutation,
    SignFlip,
)
from ._groups.base import invert_permutation
from ._horizontal import _dtype


_HIGHEST = jax.lax.Precision.HIGHEST
Solver = Literal["auto", "jax", "scipy"]


def _check_same_architecture(gauge: Gauge, a: PyTree, b: PyTree) -> None:
    _check_same_leaves(a, b)
    gauge._check_params(a)


def _check_same_leaves(a: PyTree, b: PyTree) -> None:
    """Same structure, and the same shape and dtype on every array leaf (no gauge
    needed)."""
    la, ta = _paths.flatten(a)
    lb, tb = jtu.tree_flatten(b)
    # leaf by leaf first: two widths of one model differ in their treedefs too (equinox
    # keeps sizes as static fields), and the leaf is the more useful thing to name
    if len(la) == len(lb):
        for (path, x), y in zip(la, lb):
            if not (eqx.is_array(x) or eqx.is_array(y)):
                # an equinox model keeps its activation as a leaf: a ReLU and a tanh model
                # of one shape have one treedef, and different gauges
                if not _same_static(x, y):
                    raise ValueError(
                        f"the two models do not have the same architecture: leaf {path!r} is "
                        f"{_describe(x)} in the first and {_describe(y)} in the second."
                    )
                continue
            sx, sy = tuple(jnp.shape(x)), tuple(jnp.shape(y))
            dx, dy = jnp.result_type(x), jnp.result_type(y)
            if sx != sy or dx != dy:
                raise ValueError(
                    f"the two models do not have the same architecture: leaf {path!r} is "
                    f"{dx}{list(sx)} in the first and {dy}{list(sy)} in the second."
                )
    if ta != tb:
        raise ValueError(
            "the two models do not have the same architecture (pytree structure).\n"
            f"first:  {ta}\nsecond: {tb}"
        )


# ---------------------------------------------------------------------------------------
# linear assignment
# ---------------------------------------------------------------------------------------
def _lsa_jax(cost: Array) -> Array:
    """perm with sum_i cost[i, perm[i]] minimal, batched over leading dims, under jit."""
    flat = cost.reshape(-1, *cost.shape[-2:])

    def one(c):
        rows, cols = optax.assignment.hungarian_algorithm(c)
        return jnp.zeros(c.shape[0], jnp.int32).at[rows].set(cols.astype(jnp.int32))

    return jax.vmap(one)(flat).reshape(cost.shape[:-1])


def _lsa_scipy(cost: Array) -> Array:
    from scipy.optimize import linear_sum_assignment

    def host(c):
        c = np.asarray(c)
        flat = c.reshape(-1, *c.shape[-2:])
        out = np.empty(flat.shape[:-1], np.int32)
        for k, m in enumerate(flat):
            rows, cols = linear_sum_assignment(m)
            out[k, rows] = cols
        return out.reshape(c.shape[:-1])

    shape = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
    return jax.pure_callback(host, shape, cost, vmap_method="sequential")


def _lsa(cost: Array, solver: str) -> Array:
    # the matching is piecewise constant in the cost: no derivative flows through it (and
    # the host solver's callback could not be differentiated)
    cost = jax.lax.stop_gradient(cost)
    return _lsa_scipy(cost) if solver == "scipy" else _lsa_jax(cost)


def _resolve_solver(solver: str) -> str:
    if solver not in ("auto", "jax", "scipy"):
        raise ValueError(f"`solver` must be 'auto', 'jax' or 'scipy', got {solver!r}.")
    if solver == "auto":
        try:
            import scipy.optimize  # noqa: F401
        except ImportError:  # pragma: no cover
            return "jax"
        return "scipy" if jax.default_backend() == "cpu" else "jax"
    return solver


# ---------------------------------------------------------------------------------------
# sites
# ---------------------------------------------------------------------------------------
def _match_kind(group) -> str | None:
    if isinstance(group, (Permutation, PositiveMonomial)):
        return "perm"
    if isinstance(group, SignedPermutation):
        return "signed_perm"
    if isinstance(group, SignFlip):
        return "sign"
    if isinstance(group, (Orthogonal, GL)):
        return "rotation"
    return None


def _matched_sites(gauge: Gauge) -> list[str]:
    return [n for n, g in gauge.sites if _match_kind(g) is not None]


def _views(gauge: Gauge, leaves: list[Array], site: str) -> list[Array]:
    gauge.require_whole_axes("weight matching")
    out = []
    for plan in gauge.plans:
        for lin in plan.linear:
            if lin.site == site:
                out.append(_matricise(leaves[plan.index], lin.batch_axes, lin.axis))
    return out


def _correlation(gauge: Gauge, a_leaves, b_leaves, site: str) -> Array:
    """M[..., i, j] = sum over the site's couplings of <a row i, b row j>."""
    m = None
    for xa, xb in zip(_views(gauge, a_leaves, site), _views(gauge, b_leaves, site)):
        c = jnp.matmul(xa, jnp.swapaxes(xb, -1, -2), precision=_HIGHEST)
        m = c if m is None else m + c
    return m


def _element_from(group, kind: str, m: Array, solver: str, dtype) -> Any:
    """The element k of `group` maximising sum_ij k_ij m_ij (k acting on b's rows)."""
    if kind == "rotation":
        u, _, vt = jnp.linalg.svd(m)
        return jnp.matmul(u, vt, precision=_HIGHEST)
    if kind == "sign":
        s = jnp.where(jnp.diagonal(m, axis1=-2, axis2=-1) < 0, -1, 1).astype(dtype)
        return s
    if kind == "perm":
        perm = _lsa(-m, solver)
        return perm if isinstance(group, Permutation) else Monomial(perm, jnp.ones(perm.shape, dtype))
    # signed permutation: |m| assignment, then sign of the matched entry; new row i is
    # sign_i * b[perm[i]], and Monomial scales before permuting, so scale[perm[i]] = sign_i
    perm = _lsa(-jnp.abs(m), solver)
    picked = jnp.take_along_axis(m, perm[..., None], axis=-1)[..., 0]
    sign = jnp.where(picked < 0, -1, 1).astype(dtype)
    scale = jnp.take_along_axis(sign, invert_permutation(perm), axis=-1)
    return Monomial(perm, scale)


def _canonical_init(gauge: Gauge, a_bal, b_bal, dtype) -> dict:
    """k0 = k_a^{-1} k_b, with k_a, k_b the compact stages of the canonical form (rotation
    to the Gram eigenbasis, sorting by norm, sign convention) of the balanced models: exact
    for a planted b = h . a (both reach the same canonical point), a start elsewhere."""
    ka = _compact_canon(gauge, a_bal, dtype)
    kb = _compact_canon(gauge, b_bal, dtype)
    return gauge.compose(gauge.inverse(ka), kb)


def _compact_canon(gauge: Gauge, params, dtype) -> dict:
    g = gauge.identity(dtype)
    params, g = _rotation_stage(gauge, params, g, dtype)
    params, g = _permutation_stage(gauge, params, g, dtype)
    params, g = _sign_stage(gauge, params, g, dtype)
    return g


def _objective(a_leaves, b_leaves) -> Array:
    return sum(jnp.vdot(x, y) for x, y in zip(a_leaves, b_leaves) if eqx.is_inexact_array(x))


def _site_step(gauge: Gauge, a_leaves, b, k: dict, site: str, solver: str, dtype) -> dict:
    """`k` with `site`'s element replaced by the one maximising <a, k . b> with the other
    sites held (exact when the site touches each leaf on one axis)."""
    group = gauge.site_groups[site]
    held = dict(k)
    held[site] = group.identity(dtype)
    b_minus = jtu.tree_leaves(gauge.act(held, b, check=False))
    m = _correlation(gauge, a_leaves, b_minus, site)
    # row i of m pairs a's block i with b's block p[i] (the action gathers whole blocks by
    # an outer permutation p, e.g. heads, after acting on each block in b's own order): the
    # element found for row i belongs to b's block p[i]
    elem = _element_from(group, _match_kind(group), m, solver, dtype)
    return {**k, site: gauge._reindex(site, elem, k, invert=True)}


def _descent(gauge: Gauge, a, b, k0: dict, solver: str, max_sweeps: int, dtype):
    sites = _matched_sites(gauge)
    a_leaves = jtu.tree_leaves(a)

    def sweep(k):
        for site in sites:
            k = _site_step(gauge, a_leaves, b, k, site, solver, dtype)
        return k

    def cond(carry):
        _, it, obj, prev, _, _ = carry
        return (it < max_sweeps) & ((it < 2) | (obj > prev + 1e-12 * jnp.abs(prev)))

    def body(carry):
        k, it, obj, _, best_k, best = carry
        k = sweep(k)
        new = _objective(a_leaves, jtu.tree_leaves(gauge.act(k, b, check=False)))
        # keep the best point seen: a site coupled twice to one leaf (g W g^-1) makes the
        # per-site step a linearisation, which can overshoot
        better = new > best
        best_k = jtu.tree_map(lambda x, y: jnp.where(better, y, x), best_k, k)
        return k, it + 1, new, obj, best_k, jnp.maximum(best, new)

    init_obj = _objective(a_leaves, jtu.tree_leaves(gauge.act(k0, b, check=False)))
    neg = jnp.asarray(-jnp.inf, init_obj.dtype)
    *_, k, obj = jax.lax.while_loop(cond, body, (k0, jnp.asarray(0), init_obj, neg, k0, init_obj))
    return k, obj


def _fix_noncompact(gauge: Gauge, params, dtype, rtol, max_sweeps):
    g = gauge.identity(dtype)
    params, g = _translate_stage(gauge, params, g, dtype)
    params, g = _balance_stage(gauge, params, g, dtype, rtol, max_sweeps)
    return params, g


def align(
    gauge: Gauge,
    a: PyTree,
    b: PyTree,
    *,
    solver: Solver = "auto",
    max_sweeps: int = 50,
    balance_first: bool = True,
    init: Literal["best", "identity", "canonical"] = "best",
) -> tuple[PyTree, dict[str, Any]]:
    """Align model `b` to model `a`: the group element $g$ (approximately) minimising
    $\\|g\\cdot b - a\\|$, and $g\\cdot b$.

    See the module notes for the algorithm. Planted problems ($b = h\\cdot a$ with $h$ a
    random permutation, signed permutation or positive monomial gauge) are solved exactly,
    except for the scale of a degenerate neuron ([`gaugejax.degenerate_units`][]: its
    weights on one side all zero), which balancing cannot fix: the function is matched
    exactly, its nonzero weights up to that scale.

    **Arguments:**

    - `gauge`: the gauge of both models.
    - `a`, `b`: parameters of one architecture (a different structure, shape or dtype raises
      a `ValueError` naming the leaf).
    - `solver`: linear-assignment solver: `"jax"` (optax's Hungarian algorithm, under
      `jit`, any backend), `"scipy"` (host `linear_sum_assignment` via `pure_callback`),
      `"auto"` (scipy on CPU, else jax).
    - `max_sweeps`: the most coordinate-descent sweeps (it stops when the objective stops
      increasing).
    - `balance_first`: fix the non-compact part (rescalings, $GL$, translations) of both
      models by balancing before matching. Without it only the compact part is matched.
    - `init`: start the descent from the `"identity"`, from the `"canonical"` matching
      (see the module notes), or from both keeping the better (`"best"`).

    **Returns:** `(aligned_b, g)` with `aligned_b == gauge.act(g, b)`.
    """
    if not isinstance(gauge, Gauge):
        raise TypeError(f"`gauge` must be a gaugejax.Gauge, got {type(gauge).__name__}.")
    _check_same_architecture(gauge, a, b)
    if init not in ("best", "identity", "canonical"):
        raise ValueError(f"`init` must be 'best', 'identity' or 'canonical', got {init!r}.")
    a = check_finite(gauge, a, "a")
    b = check_finite(gauge, b, "b")
    wa, wb = without_views(gauge, a), without_views(gauge, b)
    if wa.gauge is not gauge:  # leaves coupled through views: match them reshaped
        aligned, g = align(wa.gauge, wa.params, wb.params, solver=solver, max_sweeps=max_sweeps,
                           balance_first=balance_first, init=init)
        return wb.restore(aligned), wb.restore_element(g)
    if balance_first:
        _check_supported(gauge, "align")
        _check_gl_closed(gauge, "align")
    solver = _resolve_solver(solver)
    dtype = _dtype(a)
    return _align(gauge, a, b, solver, max_sweeps, balance_first, init,
                  float(jnp.finfo(dtype).eps ** 0.75))


@eqx.filter_jit
def _align(gauge, a, b, solver, max_sweeps, balance_first, init, rtol):
    dtype = _dtype(a)
    if balance_first:
        a_bal, ga = _fix_noncompact(gauge, a, dtype, rtol, 200)
        b_bal, gb = _fix_noncompact(gauge, b, dtype, rtol, 200)
    else:
        a_bal, b_bal = a, b
        ga = gb = gauge.identity(dtype)
    candidates = []
    if init in ("best", "identity"):
        candidates.append(_descent(gauge, a_bal, b_bal, gauge.identity(dtype), solver, max_sweeps, dtype))
    if init in ("best", "canonical"):
        k0 = _canonical_init(gauge, a_bal, b_bal, dtype)
        candidates.append(_descent(gauge, a_bal, b_bal, k0, solver, max_sweeps, dtype))
    k, obj = candidates[0]
    for k2, obj2 in candidates[1:]:
        better = obj2 > obj
        k = jtu.tree_map(lambda x, y: jnp.where(better, y, x), k, k2)
        obj = jnp.maximum(obj, obj2)
    # g = ga^{-1} k gb: balance b, match, undo a's balancing
    g = gauge.compose(gauge.inverse(ga), gauge.compose(k, gb))
    return gauge.act(g, b, check=False), g


def _describe(x: Any) -> str:
    for f in (x, getattr(x, "fun", None), getattr(x, "__wrapped__", None)):  # custom_jvp, jit
        name = getattr(f, "__qualname__", None)
        if isinstance(name, str) and callable(x):
            return f"function {name!r}"
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _same_static(x: Any, y: Any, _seen: set | None = None) -> bool:
    """Whether two non-array leaves are the same: identical, equal, or functions with the
    same code, defaults and closure (the activation a model factory writes as a lambda, or
    wraps in `jax.jit`, once per call)."""
    if x is y:
        return True
    seen = set() if _seen is None else _seen
    if (id(x), id(y)) in seen:  # a function whose closure holds itself
        return True
    seen.add((id(x), id(y)))
    same = functools.partial(_same_static, _seen=seen)
    if hasattr(x, "shape") and hasattr(y, "dtype") and hasattr(y, "shape") and hasattr(x, "dtype"):
        return x.shape == y.shape and x.dtype == y.dtype and bool(np.array_equal(np.asarray(x), np.asarray(y)))
    if isinstance(x, functools.partial) and isinstance(y, functools.partial):
        return (same(x.func, y.func) and len(x.args) == len(y.args) and all(map(same, x.args, y.args))
                and x.keywords.keys() == y.keywords.keys() and all(same(x.keywords[k], y.keywords[k]) for k in x.keywords))
    if isinstance(x, types.FunctionType) and isinstance(y, types.FunctionType):
        cx, cy = x.__closure__ or (), y.__closure__ or ()
        return (x.__code__ == y.__code__ and len(cx) == len(cy)
                and same(x.__defaults__, y.__defaults__) and same(x.__kwdefaults__, y.__kwdefaults__)
                and all(same(a.cell_contents, b.cell_contents) for a, b in zip(cx, cy)))
    for attr in ("__wrapped__", "fun"):  # jax.jit, functools.wraps, custom_jvp wrappers
        if hasattr(x, attr) and hasattr(y, attr) and type(x) is type(y):
            return same(getattr(x, attr), getattr(y, attr))
    if isinstance(x, tuple) and isinstance(y, tuple):
        return len(x) == len(y) and all(map(same, x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if type(x) is type(y) and type(x).__eq__ is object.__eq__ and hasattr(x, "__dict__"):
        return same(vars(x), vars(y))  # a callable object made per call, without its own ==
    try:
        return bool(x == y)
    except Exception:  # an object whose == is not a truth value
        return False


# ---------------------------------------------------------------------------------------
# interpolation and REPAIR
# ---------------------------------------------------------------------------------------
def interpolate(a: PyTree, b: PyTree, t: float | Array) -> PyTree:
    """The straight line $(1 - t)\\,a + t\\,b$ in parameter space (leaves that are not
    float arrays are taken from `a`). Both must have the same structure, shapes and dtypes
    (else a `ValueError` naming the leaf)."""
    _check_same_leaves(a, b)
    t = jnp.asarray(t)
    if t.ndim != 0:
        raise ValueError(f"`t` must be a scalar; got shape {t.shape} (vmap over t for several points).")
    return jtu.tree_map(
        lambda x, y: ((1 - t).astype(x.dtype) * x + t.astype(x.dtype) * y) if eqx.is_inexact_array(x) else x,
        a, b,
    )


def loss_barrier(
    loss_fn: Callable[[PyTree], Array],
    a: PyTree,
    b: PyTree,
    *,
    num: int = 25,
) -> dict[str, Array]:
    """The loss along the linear path between `a` and `b`, and its barrier
    $\\max_t\\,[L((1-t)a + tb) - ((1-t)L(a) + tL(b))]$ (Frankle et al., "Linear mode
    connectivity", 2020).

    **Arguments:**

    - `loss_fn`: `params -> scalar` (close over the data). A non-scalar output raises a
      `ValueError`.
    - `a`, `b`: the endpoints (usually `b` already aligned to `a` with
      [`gaugejax.align`][]).
    - `num`: number of points, endpoints included (at least 2).

    **Returns:** `{"t": (num,), "loss": (num,), "barrier": scalar}`.
    """
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 2:
        raise ValueError(f"`num` must be an int >= 2 (the path's endpoints are included), got {num!r}.")
    num = int(num)
    out = jax.eval_shape(loss_fn, a)
    if not (hasattr(out, "shape") and out.shape == ()):
        raise ValueError(f"`loss_fn` must return a scalar; it returned {out}.")
    ts = jnp.linspace(0, 1, num)
    losses = jax.lax.map(lambda t: loss_fn(interpolate(a, b, t)), ts)
    ts = ts.astype(losses.dtype)
    line = (1 - ts) * losses[0] + ts * losses[-1]
    return {"t": ts, "loss": losses, "barrier": jnp.max(losses - line)}


def repair(
    gauge: Gauge,
    merged: PyTree,
    a: PyTree,
    b: PyTree,
    preactivations: Callable[[PyTree], Mapping[str, Array]],
    *,
    t: float = 0.5,
    eps: float = 1e-8,
    shift_mean: bool = True,
) -> PyTree:
    """REPAIR: renormalise the merged network so that every neuron's pre-activation has the
    mean and standard deviation interpolated from the two endpoints.

    For neuron $i$ of site $s$ with merged statistics $(\\mu, \\sigma)$ and target
    $(\\mu^\\ast, \\sigma^\\ast) = (1-t)(\\mu_a, \\sigma_a) + t(\\mu_b, \\sigma_b)$, the
    leaves that produce $s$ are rescaled by $\\sigma^\\ast/\\sigma$ along the site's axis and
    the site's bias (a produced 1-D leaf) shifted so the mean becomes $\\mu^\\ast$. Sites
    are corrected one at a time in the order `preactivations` returns them, recomputing the
    statistics after each.

    **Arguments:**

    - `gauge`: the gauge (its couplings say which leaves produce each site).
    - `merged`: e.g. `interpolate(a, aligned_b, t)`.
    - `a`, `b`: the two endpoints (`b` aligned).
    - `preactivations`: `params -> {site: (batch, n)}`, the pre-activations of unbatched
      sites on a batch of data (close over the data). A batched site (per-head) raises a
      `ValueError`.
    - `t`: the interpolation weight of `b`.
    - `eps`: added to variances.
    - `shift_mean`: correct the means too. A site without a bias (no produced 1-D leaf)
      cannot be shifted and raises a `ValueError` naming it; `shift_mean=False` corrects
      only the standard deviations.

    **Returns:** the repaired parameters.
    """
    gauge.require_whole_axes("repair")
    _check_same_architecture(gauge, merged, a)
    _check_same_architecture(gauge, merged, b)
    groups = gauge.site_groups
    pre_a, pre_b = preactivations(a), preactivations(b)
    stats_a = {k: (jnp.mean(v, 0), jnp.std(v, 0)) for k, v in pre_a.items()}
    stats_b = {k: (jnp.mean(v, 0), jnp.std(v, 0)) for k, v in pre_b.items()}
    for site in stats_a:
        if site not in groups:
            raise ValueError(f"`preactivations` returned site {site!r}, not a site of the gauge ({list(groups)}).")
        if groups[site].batch:
            raise ValueError(
                f"repair: site {site!r} ({groups[site]!r}) is batched; repair renormalises "
                "unbatched sites only (per-head sites have no per-neuron pre-activation of shape "
                "(batch, n))."
            )
        n = groups[site].n
        for which, arr in (("a", pre_a[site]), ("b", pre_b[site])):
            if jnp.ndim(arr) != 2 or jnp.shape(arr)[1] != n:
                raise ValueError(
                    f"`preactivations` returned shape {tuple(jnp.shape(arr))} for site {site!r} of "
                    f"model `{which}`; expected (batch, {n}) (the site's width)."
                )
        z = preactivations(merged)[site]
        mu, sd = jnp.mean(z, 0), jnp.std(z, 0)
        mu_t = (1 - t) * stats_a[site][0] + t * stats_b[site][0]
        sd_t = (1 - t) * stats_a[site][1] + t * stats_b[site][1]
        r = sd_t / jnp.sqrt(sd**2 + eps)
        leaves, treedef = jtu.tree_flatten(merged)
        producers = [(plan, lin) for plan in gauge.plans for lin in plan.linear
                     if lin.site == site and lin.kind == "produce" and not lin.batch_axes]
        if not producers:
            raise ValueError(f"repair: no leaf produces site {site!r}, so nothing can renormalise it.")
        biases = [plan.index for plan, _ in producers if leaves[plan.index].ndim == 1]
        if shift_mean and not biases:
            raise ValueError(
                f"repair: site {site!r} has no bias (no 1-D leaf produces it), so its mean "
                "cannot be shifted to the target; pass shift_mean=False to correct only the "
                "standard deviations."
            )
        for plan, lin in producers:
            x = leaves[plan.index]
            shape = [1] * x.ndim
            shape[lin.axis] = x.shape[lin.axis]
            new = x * r.reshape(shape).astype(x.dtype)
            if shift_mean and plan.index == biases[0]:  # one bias takes the whole shift
                new = new + (mu_t - r * mu).astype(x.dtype)
            leaves[plan.index] = new
        merged = jtu.tree_unflatten(treedef, leaves)
    return merged
