"""The gauge engine: sites and couplings in, pure pytree-to-pytree maps out.

A [`gaugejax.Gauge`][] is *data*: a set of sites (hidden spaces, each carrying a group)
and a table of couplings (which leaf axis produces or consumes which site). From that
data alone the engine derives the group operations (`identity`, `sample`, `compose`,
`inverse`), the left action `act(g, params)`, the Lie algebra (`exp`, `sample_algebra`),
the infinitesimal action `vertical` and the orbit dimension. Every architecture in
gaugejax (MLPs, ResNets, neural ODEs, transformers) is one such table; none has code of
its own here.

Semidirect products are derived from the table, not declared: when a site's batch axis
(one GL block per head, say) sits on a leaf axis that a permutation site acts on (the
heads), the permutation acts on the blocks, and `compose` / `inverse` re-index the blocks
accordingly: $(P, M)(P', M') = (PP', M[\\pi'^{-1}]\\,M')$.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PRNGKeyArray, PyTree

from . import _paths
from ._coupling import Consume, Coupling, Link, Produce, Translate
from ._groups._linalg import is_half, upcast_half
from ._groups.base import AbstractGroup, default_float, invert_permutation, split_draws
from ._groups.permutation import Permutation
from ._groups.translation import Translation


_HIGHEST = jax.lax.Precision.HIGHEST


class _Linear(NamedTuple):
    axis: int
    site: str
    kind: str  # "produce" | "consume"
    batch_axes: tuple[int, ...]


class _LinkPlan(NamedTuple):
    out_site: str | None
    in_site: str | None
    h: float


class _LeafPlan(NamedTuple):
    index: int
    path: str
    shape: tuple[int, ...]
    linear: tuple[_Linear, ...]
    links: tuple[_LinkPlan, ...]
    translate: str | None
    view: tuple[int, ...] | None = None  # the shape the linear couplings act on


class _Filtered:
    """Stands in for a leaf that `equinox.filter` replaced by `None` (see
    `Gauge._complete`)."""

    def __repr__(self) -> str:
        return "<filtered out>"


_FILTERED = _Filtered()


def _is_none(x: Any) -> bool:
    return x is None


def _is_placeholder(x: Any) -> bool:
    """None, or an empty NamedTuple standing for a left-out leaf (`optax.MaskedNode`)."""
    return x is None or (isinstance(x, tuple) and hasattr(x, "_fields") and not x._fields)


def _refines(shape: tuple[int, ...], view: tuple[int, ...]) -> bool:
    """Whether `view` splits each axis of `shape` into consecutive axes."""
    j = 0
    for s in shape:
        p = 1
        while p < s and j < len(view):
            p *= view[j]
            j += 1
        if p == 1 and s == 1 and j < len(view) and view[j] == 1:
            j += 1
        if p != s:
            return False
    return j == len(view)


def _describe_coupling(c: Coupling) -> str:
    if isinstance(c, (Produce, Consume)):
        extra = f", batch_axes={c.batch_axes}" if c.batch_axes else ""
        extra += f", view={c.view}" if c.view is not None else ""
        return f"{type(c).__name__}(leaf={c.leaf!r}, axis={c.axis}, site={c.site!r}{extra})"
    return repr(c)


def _expand(arr: Array, dims: tuple[int, ...], ndim: int) -> Array:
    """Broadcast `arr`, whose dimensions index leaf axes `dims`, against a leaf of `ndim`."""
    order = sorted(range(len(dims)), key=lambda i: dims[i])
    arr = jnp.transpose(arr, order) if order != list(range(len(dims))) else arr
    shape = [1] * ndim
    for i in order:
        shape[dims[i]] = arr.shape[order.index(i)]
    return arr.reshape(shape)


_LETTERS = "abcdefghijklmnopqrstuvw"


def _matmul_axis(x: Array, m: Array, batch_axes: tuple[int, ...], axis: int) -> Array:
    """`x` with `m` (shape `(*batch, n, n)`) applied along `axis`, batched over `batch_axes`."""
    xs = _LETTERS[: x.ndim]
    out_letter, in_letter = "y", xs[axis]
    ms = "".join(xs[a] for a in batch_axes) + out_letter + in_letter
    outs = xs[:axis] + out_letter + xs[axis + 1 :]
    return jnp.einsum(f"{ms},{xs}->{outs}", m, x, precision=_HIGHEST)


def _gather_axes(x: Array, perms: Mapping[int, Array]) -> Array:
    """`x` re-indexed along each axis in `perms` (`x[..., perm, ...]` on every such axis).

    A permutation of axis 0 is a gather of whole contiguous slabs (close to a copy); every
    other axis is a gather batched over all the remaining axes. On XLA:CPU this is twice
    as fast as one `ix_`-style gather or a `take` along axis 1 (which XLA lowers to a
    strided gather plus a transpose): on a 1024 x 1024 float32 matrix permuted on both
    axes, 0.58 ms vs 1.06 ms, a copy being 0.21 ms. Indices are trusted to be in bounds
    (no clamping): `act(check=True)` validates permutations first.
    """
    mode = jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS
    for ax in sorted(perms):
        perm = perms[ax]
        if ax == 0:
            dnums = jax.lax.GatherDimensionNumbers(
                offset_dims=tuple(range(1, x.ndim)), collapsed_slice_dims=(0,), start_index_map=(0,)
            )
            x = jax.lax.gather(x, perm[:, None], dnums, slice_sizes=(1, *x.shape[1:]), mode=mode)
            continue
        others = tuple(a for a in range(x.ndim) if a != ax)
        # unsigned indices: XLA then skips the negative-index handling (25% faster)
        idx = _expand(perm.astype(jnp.uint32), (ax,), x.ndim)
        idx = jnp.broadcast_to(idx, x.shape)[..., None]
        dnums = jax.lax.GatherDimensionNumbers(
            offset_dims=(),
            collapsed_slice_dims=(ax,),
            start_index_map=(ax,),
            operand_batching_dims=others,
            start_indices_batching_dims=others,
        )
        x = jax.lax.gather(x, idx, dnums, slice_sizes=(1,) * x.ndim, mode=mode)
    return x


def params_float_dtype(params: PyTree) -> Any:
    """The one float dtype of `params` (JAX's default float when there are none); mixed float
    dtypes are refused, since every orbit computation works in one dtype."""
    first: dict[Any, str] = {}  # each dtype's first leaf, to name it
    for path, x in jtu.tree_flatten_with_path(params)[0]:
        if eqx.is_inexact_array(x):
            first.setdefault(jnp.dtype(x.dtype), _paths.canonical(path))
    if len(first) > 1:
        where = ", ".join(f"{dt} (e.g. {leaf!r})" for dt, leaf in sorted(first.items(), key=lambda kv: str(kv[0])))
        raise ValueError(f"the parameters mix float dtypes: {where}; cast them to one.")
    return next(iter(first)) if first else jnp.zeros(()).dtype


def _float_dtypes(tree: Any) -> set[Any]:
    return {
        jnp.dtype(x.dtype)
        for x in jtu.tree_leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    }


def _one_program(method: Callable) -> Callable:
    """Run a `Gauge` method as one compiled program (`equinox.filter_jit`).

    Called eagerly, the dozens of small operations of `act`, `sample` or `inverse` would
    each dispatch (and, on first use, compile) on their own: eager `act` on a transformer
    gauge took 1.7 s a call, its compiled program about a millisecond. Under an outer `jit`,
    `vmap` or `grad` the program is inlined like any nested `jit`. Non-array arguments
    (`scale`, `dtype`, `sites`, `check`) are static: each new value compiles once.
    Validation errors are raised while tracing, as before.
    """
    jitted = eqx.filter_jit(method)

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        return jitted(self, *args, **kwargs)

    return run


class Gauge(eqx.Module):
    """A gauge group acting on a parameter pytree, described by sites and couplings.

    The action is a **left action** (MATH.md conventions): `act(identity(), p) == p` and
    `act(compose(g, h), p) == act(g, act(h, p))`. A produced axis transforms by $g$, a
    consumed axis by $g^{-T}$, so a weight between sites $g'$ (input) and $g$ (output)
    transforms as $W \\mapsto g W g'^{-1}$ and a bias written into $g$ as $b \\mapsto g b$.

    Group elements (and Lie-algebra elements) are dicts `{site name: element}` of arrays:
    they `jit`, `vmap` and differentiate like any pytree.

    **Arguments:**

    - `sites`: a mapping from site name to its group, e.g.
      `{"h1": gaugejax.PositiveMonomial(64)}`.
    - `couplings`: a sequence of [`gaugejax.Produce`][], [`gaugejax.Consume`][],
      [`gaugejax.Link`][] and [`gaugejax.Translate`][].
    - `params`: an example parameter pytree (arrays or `jax.ShapeDtypeStruct`s). Shapes are
      validated against the couplings here, once; a wrong spec raises a `ValueError` that
      names the leaf path, the axis and the expected and received sizes.

    **Fields** (all static, derived once from the arguments): `sites` as a tuple of
    `(name, group)` pairs in declaration order; `couplings` (each naming its leaf by the
    canonical path, whichever accepted spelling was given); `treedef` and `paths` (the
    parameter structure and each leaf's path, as in error messages); `plans` (per touched
    leaf, the couplings that act on it, in application order); `outer` (per site and
    batch axis, the permutation site that re-indexes it in a semidirect product, if any).

    !!! example

        ```python
        params = [(W1, b1), (W2, b2)]  # W1: (64, 32), W2: (10, 64)
        gauge = gaugejax.Gauge(
            sites={"h1": gaugejax.PositiveMonomial(64)},
            couplings=[
                gaugejax.Produce("[0][0]", axis=0, site="h1"),
                gaugejax.Produce("[0][1]", axis=0, site="h1"),
                gaugejax.Consume("[1][0]", axis=1, site="h1"),
            ],
            params=params,
        )
        g = gauge.sample(jax.random.key(0))
        new_params = gauge.act(g, params)
        ```
    """

    sites: tuple[tuple[str, AbstractGroup], ...] = eqx.field(static=True)
    couplings: tuple[Coupling, ...] = eqx.field(static=True)
    treedef: Any = eqx.field(static=True)
    # the structure with None as a leaf, and where the leaves of `treedef` sit in it (a
    # None field of the parameters, bias=None, is a leaf there and not in `treedef`)
    none_treedef: Any = eqx.field(static=True)
    kept: tuple[int, ...] = eqx.field(static=True)
    paths: tuple[str, ...] = eqx.field(static=True)
    plans: tuple[_LeafPlan, ...] = eqx.field(static=True)
    outer: tuple[tuple[str, tuple[str | None, ...]], ...] = eqx.field(static=True)
    # (leaf index, family) of each registered activation among the non-array leaves (an
    # equinox MLP's `activation`): parameters holding another activation there may not
    # admit the gauge's groups
    activations: tuple[tuple[int, str], ...] = eqx.field(static=True, default=())

    def __init__(
        self,
        sites: Mapping[str, AbstractGroup],
        couplings: Sequence[Coupling],
        params: PyTree,
    ):
        if not isinstance(sites, Mapping):
            raise TypeError(f"`sites` must be a mapping {{name: group}}, got {type(sites).__name__}.")
        for name, group in sites.items():
            if not isinstance(name, str):
                raise TypeError(f"site names must be strings, got {name!r}.")
            if not isinstance(group, AbstractGroup):
                raise TypeError(
                    f"site {name!r}: expected a group such as gaugejax.PositiveDiagonal(n), "
                    f"got {group!r}."
                )
        if isinstance(couplings, (Produce, Consume, Link, Translate)):
            raise TypeError(
                f"`couplings` must be a sequence of couplings; got a single {type(couplings).__name__} "
                f"({couplings!r}): wrap it in a list."
            )
        couplings = tuple(couplings)
        for c in couplings:
            if not isinstance(c, (Produce, Consume, Link, Translate)):
                raise TypeError(
                    "couplings must be gaugejax.Produce, Consume, Link or Translate, got "
                    f"{c!r}."
                )
        with_path, treedef = jtu.tree_flatten_with_path(params)
        paths = tuple(_paths.canonical(p) for p, _ in with_path)
        leaves = [leaf for _, leaf in with_path]
        table = _paths.lookup_table(params)

        def resolve(c: Coupling) -> int:
            try:
                path = _paths.normalise(c.leaf)
            except TypeError as e:
                raise TypeError(f"{_describe_coupling(c)}: {e}") from None
            if path not in table:
                raise ValueError(
                    f"{_describe_coupling(c)}: no leaf at path {c.leaf!r} in the parameters."
                    f"{_paths.close_matches(path, list(paths))} The leaves are: "
                    f"{', '.join(repr(p) for p in paths)}."
                )
            i = table[path]
            if not hasattr(leaves[i], "shape"):
                raise ValueError(
                    f"{_describe_coupling(c)}: the leaf at {paths[i]!r} is not an array "
                    f"(got {type(leaves[i]).__name__})."
                )
            return i

        def norm_axis(c: Coupling, axis: int, ndim: int, what: str = "axis") -> int:
            if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
                raise TypeError(f"{_describe_coupling(c)}: {what} must be an integer, got {axis!r}.")
            axis = int(axis)
            if not -ndim <= axis < ndim:
                raise ValueError(
                    f"{_describe_coupling(c)}: {what} {axis} is out of range for the leaf "
                    f"{c.leaf!r} of shape {tuple(leaves[resolve(c)].shape)}."
                )
            return axis % ndim

        site_map = dict(sites)
        used: set[str] = set()

        def need_site(c: Coupling, name: str | None) -> AbstractGroup | None:
            if name is None:
                return None
            if name not in site_map:
                raise ValueError(
                    f"{_describe_coupling(c)}: site {name!r} is not declared; declared sites "
                    f"are {sorted(site_map)}."
                )
            used.add(name)
            group = site_map[name]
            leaf = leaves[resolve(c)]
            if group.algebra_dim > 0 and not jnp.issubdtype(leaf.dtype, jnp.inexact):
                raise ValueError(
                    f"{_describe_coupling(c)}: the leaf {paths[resolve(c)]!r} has dtype {leaf.dtype}, but "
                    f"site {name!r} carries the continuous group {group!r}, whose elements do not keep "
                    "integers integer; couple only floating-point leaves to it."
                )
            return group

        linear: dict[int, list[_Linear]] = {}
        links: dict[int, list[_LinkPlan]] = {}
        translate: dict[int, str] = {}
        # (site -> [(leaf path, axis, size, kind)]) for the dimension check
        sizes: dict[str, list[tuple[str, int, int, str]]] = {}

        views: dict[int, tuple[int, ...] | None] = {}

        def set_view(c: Coupling, i: int, view: Any) -> None:
            shape = tuple(leaves[i].shape)
            if view is not None:
                view = tuple(int(s) for s in view)
                if not _refines(shape, view):
                    raise ValueError(
                        f"{_describe_coupling(c)}: view {view} is not a refinement of leaf "
                        f"{paths[i]!r}'s shape {shape} (each leaf axis must split into "
                        "consecutive view axes)."
                    )
            if i in views and views[i] != view:
                raise ValueError(
                    f"{_describe_coupling(c)}: leaf {paths[i]!r} is coupled with view {views[i]} "
                    f"elsewhere and {view} here; every linear coupling of a leaf uses one view."
                )
            views[i] = view

        def add_linear(c: Coupling, i: int, axis: int, site: str, kind: str, batch_axes) -> None:
            group = need_site(c, site)
            shape = views.get(i) or tuple(leaves[i].shape)
            if isinstance(group, Translation):
                raise ValueError(
                    f"{_describe_coupling(c)}: site {site!r} is a Translation; use "
                    "gaugejax.Translate for it."
                )
            axis = norm_axis(c, axis, len(shape))
            batch_axes = tuple(norm_axis(c, b, len(shape), "batch axis") for b in batch_axes)
            if len(batch_axes) != len(group.batch):
                raise ValueError(
                    f"{_describe_coupling(c)}: site {site!r} has {group!r} with batch shape "
                    f"{group.batch}, so the coupling needs {len(group.batch)} batch axes; "
                    f"got {len(batch_axes)}."
                )
            if axis in batch_axes or len(set(batch_axes)) != len(batch_axes):
                raise ValueError(f"{_describe_coupling(c)}: the axis and batch axes must differ.")
            for b, size in zip(batch_axes, group.batch):
                if shape[b] != size:
                    raise ValueError(
                        f"{_describe_coupling(c)}: site {site!r} is batched with shape "
                        f"{group.batch} but leaf {paths[i]!r} has size {shape[b]} on batch "
                        f"axis {b} (shape {shape}); expected {size}."
                    )
            for other in linear.get(i, []):
                if other.axis == axis:
                    raise ValueError(
                        f"{_describe_coupling(c)}: axis {axis} of leaf {paths[i]!r} is already "
                        f"coupled to site {other.site!r}; an axis carries at most one site."
                    )
            linear.setdefault(i, []).append(_Linear(axis, site, kind, batch_axes))
            sizes.setdefault(site, []).append((paths[i], axis, shape[axis], kind))

        for c in couplings:
            i = resolve(c)
            if isinstance(c, (Produce, Consume)):
                set_view(c, i, c.view)
                add_linear(c, i, c.axis, c.site, c.kind, c.batch_axes)
            elif isinstance(c, Link):
                if leaves[i].ndim != 2 or leaves[i].shape[0] != leaves[i].shape[1]:
                    raise ValueError(
                        f"{_describe_coupling(c)}: a link leaf must be a square matrix A in "
                        f"U = I + hA; leaf {paths[i]!r} has shape {tuple(leaves[i].shape)}."
                    )
                set_view(c, i, None)
                if not (isinstance(c.h, (int, float, np.integer, np.floating)) and not isinstance(c.h, bool)
                        and 0 < c.h < math.inf):
                    raise ValueError(f"{_describe_coupling(c)}: the step h must be a positive finite float, got {c.h!r}.")
                for s in (c.out_site, c.in_site):
                    g = need_site(c, s)
                    if g is not None and g.batch:
                        raise ValueError(f"{_describe_coupling(c)}: link sites must be unbatched; {s!r} has batch {g.batch}.")
                if c.out_site is not None:
                    add_linear(c, i, 0, c.out_site, "produce", ())
                if c.in_site is not None:
                    add_linear(c, i, 1, c.in_site, "consume", ())
                links.setdefault(i, []).append(_LinkPlan(c.out_site, c.in_site, float(c.h)))
            else:  # Translate
                group = need_site(c, c.site)
                if not isinstance(group, Translation):
                    raise ValueError(
                        f"{_describe_coupling(c)}: site {c.site!r} must be a "
                        f"gaugejax.Translation, got {group!r}."
                    )
                if tuple(group.shape) != tuple(leaves[i].shape):
                    raise ValueError(
                        f"{_describe_coupling(c)}: Translation shape {group.shape} does not match "
                        f"leaf {paths[i]!r} of shape {tuple(leaves[i].shape)}."
                    )
                if i in translate:
                    raise ValueError(f"{_describe_coupling(c)}: leaf {paths[i]!r} is translated twice.")
                other = next((j for j, s in translate.items() if s == c.site), None)
                if other is not None:
                    # g t + t' must be one translation of the product; with two leaves
                    # (two linear actions g) it would be two, so this is not a group action
                    raise ValueError(
                        f"{_describe_coupling(c)}: Translation site {c.site!r} already "
                        f"translates leaf {paths[other]!r}; a Translation site translates one "
                        "leaf (declare one site per leaf)."
                    )
                translate[i] = c.site

        for i, lps in links.items():
            if i in translate:
                raise ValueError(f"leaf {paths[i]!r} cannot be both a Link and translated.")
            # A' = g_out A g_in^-1 + (g_out g_in^-1 - I)/h needs every site acting on A in the
            # one link's affine term: a second link, or a Produce / Consume beside it, would
            # act on A linearly only (not a group action)
            if len(lps) > 1:
                raise ValueError(
                    f"leaf {paths[i]!r} carries {len(lps)} Links; a link leaf carries one, "
                    "Link(leaf, out_site, in_site, h), with both ends in it (None holds an end "
                    "at the identity)."
                )
            if len(linear.get(i, [])) > (lps[0].out_site is not None) + (lps[0].in_site is not None):
                others = [o.site for o in linear[i] if o.site not in (lps[0].out_site, lps[0].in_site)]
                raise ValueError(
                    f"leaf {paths[i]!r} is a Link's A (U = I + hA) and is also coupled to "
                    f"{others}: a link leaf takes no other coupling (put the sites on the "
                    "Link's ends)."
                )

        # Every site's couplings must agree on its dimension.
        for site, entries in sizes.items():
            n = site_map[site].n
            bad = [e for e in entries if e[2] != n]
            if not bad:
                continue
            producers = [e for e in entries if e[3] == "produce"]
            ref = next((e for e in producers if e[2] == n), None) or next(
                (e for e in entries if e[2] == n), None
            )
            path, axis, size, kind = bad[0]
            if ref is not None:
                raise ValueError(
                    f"site {site!r} has dimension {n} (group {site_map[site]!r}; "
                    f"{'produced' if ref[3] == 'produce' else 'consumed'} by leaf {ref[0]!r} "
                    f"axis {ref[1]}) but leaf {path!r} {'produces' if kind == 'produce' else 'consumes'} "
                    f"it on axis {axis} of size {size}; expected {n}, received {size}."
                )
            raise ValueError(
                f"site {site!r} has group {site_map[site]!r} of dimension {n} but leaf {path!r} "
                f"{'produces' if kind == 'produce' else 'consumes'} it on axis {axis} of size "
                f"{size}; expected {n}, received {size}."
            )

        unused = sorted(set(site_map) - used)
        if unused:
            raise ValueError(
                f"sites {unused} are declared but no coupling uses them (their orbit "
                "dimension would be counted for nothing)."
            )

        # Semidirect structure: which site permutes each batch dimension of each site.
        outer: dict[str, list[str | None]] = {
            name: [None] * len(group.batch) for name, group in site_map.items()
        }
        seen: dict[tuple[str, int], set[str | None]] = {}
        for i, lins in linear.items():
            by_axis = {lin.axis: lin for lin in lins}
            for lin in lins:
                for j, b in enumerate(lin.batch_axes):
                    o = by_axis.get(b)
                    o_site = o.site if o is not None else None
                    if o is not None:
                        og = site_map[o.site]
                        if not og.is_permutation or og.batch:
                            raise ValueError(
                                f"leaf {paths[i]!r}: batch axis {b} of site {lin.site!r} carries "
                                f"site {o.site!r} ({og!r}); only an unbatched gaugejax.Permutation "
                                "can act on another site's batch axis."
                            )
                    seen.setdefault((lin.site, j), set()).add(o_site)
        for (site, j), found in seen.items():
            if len(found) > 1:
                raise ValueError(
                    f"site {site!r}: its batch dimension {j} is permuted by "
                    f"{sorted(map(str, found))} on different leaves; the semidirect structure "
                    "must be the same on every leaf that carries the site."
                )
            outer[site][j] = next(iter(found))

        plans = []
        for i in sorted(set(linear) | set(links) | set(translate)):
            plans.append(
                _LeafPlan(
                    index=i,
                    path=paths[i],
                    shape=tuple(leaves[i].shape),
                    linear=tuple(linear.get(i, ())),
                    links=tuple(links.get(i, ())),
                    translate=translate.get(i),
                    view=views.get(i),
                )
            )

        self.sites = tuple(site_map.items())
        # each leaf by its canonical path ("['W1']", "layers[0].weight"), however it was
        # written ("0/0", ".layers[0].weight"): tools that compare couplings (same_gauge,
        # editing, inference) then see one spelling per leaf
        self.couplings = tuple(dataclasses.replace(c, leaf=paths[resolve(c)]) for c in couplings)
        self.treedef = treedef
        with_none, self.none_treedef = jtu.tree_flatten(params, is_leaf=_is_none)
        self.kept = tuple(i for i, x in enumerate(with_none) if x is not None)
        self.paths = paths
        self.plans = tuple(plans)
        self.outer = tuple((name, tuple(o)) for name, o in outer.items())
        from . import _activations  # a cycle at import time: _activations -> _groups only

        self.activations = tuple((i, fam) for i, x in enumerate(leaves) if not hasattr(x, "shape")
                                 and callable(x) and (fam := _activations._lookup(x)) is not None)

    # ------------------------------------------------------------------------------------
    # structure
    # ------------------------------------------------------------------------------------
    def require_whole_axes(self, what: str) -> None:
        """Raise if a coupling acts through a reshaped view of a leaf (`what` does not
        support views yet: it reads leaf axes directly)."""
        viewed = [p.path for p in self.plans if p.view is not None]
        if viewed:
            raise NotImplementedError(
                f"{what} does not support couplings through a reshaped view of a leaf; leaves "
                f"{viewed} are coupled through views (split attention heads). `act`, `sample`, "
                "`vertical`, `gaugejax.check_invariance`, `balance`, `canonicalize` and `align` do."
            )

    @property
    def site_groups(self) -> dict[str, AbstractGroup]:
        """`{site name: group}`."""
        return dict(self.sites)

    @property
    def continuous_sites(self) -> tuple[str, ...]:
        """Names of the sites whose group has a Lie algebra of positive dimension."""
        return tuple(name for name, g in self.sites if g.algebra_dim > 0)

    @property
    def orbit_dim(self) -> int:
        """The group's dimension: the sum of the sites' Lie-algebra dimensions. It is the
        dimension of a generic orbit when generic parameters have a discrete stabiliser,
        which is not always so: a $GL$ site wider than what writes it and what reads it
        (the hidden layer of a linear MLP wider than its inputs + 1 and its outputs,
        attention heads wider than the residual stream + 1) has a continuous one.
        [`gaugejax.Gauge.orbit_rank`][] measures the orbit's dimension at a given point;
        [`gaugejax.transformer_orbit_dim`][] subtracts the attention stabiliser."""
        return sum(g.algebra_dim for _, g in self.sites)

    def couplings_of(self, site: str) -> tuple[Coupling, ...]:
        """The couplings that involve `site`."""
        out = []
        for c in self.couplings:
            names = (c.out_site, c.in_site) if isinstance(c, Link) else (c.site,)
            if site in names:
                out.append(c)
        return tuple(out)

    def __repr__(self) -> str:
        lines = [f"Gauge(orbit_dim={self.orbit_dim}, sites:"]
        for name, group in self.sites:
            n_coup = len(self.couplings_of(name))
            lines.append(f"  {name}: {group!r} ({n_coup} couplings)")
        lines.append(")")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------
    # validation
    # ------------------------------------------------------------------------------------
    def _complete(self, params: PyTree, what: str = "the parameters") -> PyTree:
        """`params` with exactly the structure this gauge was built for: the tree itself,
        or, for an `equinox.filter`-ed one (`None` where a non-array leaf was, as optax
        sees an equinox model), the same tree with a placeholder in those places, so that
        leaf indices line up with the gauge's plans. Anything else is refused."""
        treedef = jtu.tree_structure(params)
        if treedef == self.treedef:
            return params
        split = self._with_none(params)
        if split is not None and all(split[0][p.index] is not None for p in self.plans):
            return jtu.tree_unflatten(self.treedef, [_FILTERED if x is None else x for x in split[0]])
        raise ValueError(
            f"{what} do not have the structure this gauge was built for (nor are they an "
            f"`equinox.filter` of it).\nexpected: {self.treedef}\nreceived: {treedef}"
        )

    def _filtered_io(self, params: PyTree, what: str = "the parameters"):
        """For an `equinox.filter`-ed tree of the parameters, `(completed, restore)`:
        the tree completed as `_complete` does, and a function taking a tree of the
        gauge's structure back to the filtered form (`None` where `params` has it); `None`
        when `params` already has the gauge's structure."""
        if jtu.tree_structure(params) == self.treedef:
            return None
        completed = self._complete(params, what)
        _, rebuild = self._with_none(params)

        def restore(tree: PyTree) -> PyTree:
            return rebuild([None if x is _FILTERED else x for x in jtu.tree_leaves(tree)])

        return completed, restore

    def _with_none(self, tree: PyTree) -> tuple[list[Any], Callable[[list[Any]], PyTree]] | None:
        """For a tree with the structure of the parameters except that any leaf may be
        None (a gradient, an optax statistic or an `equinox.filter` of an equinox model) or
        an empty placeholder node (`optax.MaskedNode`, where `optax.masked` leaves a leaf
        out): its leaves aligned with the parameters' leaves (the ones `plans` index; None
        for both), and a function putting such a list back into `tree`'s structure (the
        placeholders kept where the list holds None). None for any other tree."""
        leaves, treedef = jtu.tree_flatten(tree, is_leaf=_is_placeholder)
        if treedef != self.none_treedef:
            return None

        def rebuild(new: list[Any]) -> PyTree:
            out = list(leaves)  # the parameters' own None fields stay None
            for j, x in zip(self.kept, new):
                out[j] = leaves[j] if x is None else x
            return jtu.tree_unflatten(treedef, out)

        return [None if _is_placeholder(leaves[j]) else leaves[j] for j in self.kept], rebuild

    def _check_params(self, params: PyTree) -> list[Any]:
        leaves, treedef = jtu.tree_flatten(params)
        if treedef != self.treedef:
            filtered = self._with_none(params) is not None
            raise ValueError(
                "the parameters do not have the structure this gauge was built for"
                + (": they are an `equinox.filter` of it (None where a non-array leaf was), and "
                   "this function needs the whole parameters (e.g. `equinox.combine(filtered, "
                   "static)`).\n" if filtered else ".\n")
                + f"expected: {self.treedef}\nreceived: {treedef}"
            )
        for plan in self.plans:
            shape = tuple(leaves[plan.index].shape)
            if shape != plan.shape:
                raise ValueError(
                    f"leaf {plan.path!r} has shape {shape} but this gauge was built for "
                    f"shape {plan.shape}."
                )
        if self.activations:
            self._check_activations(leaves)
        return leaves

    def _check_activations(self, leaves: list[Any]) -> None:
        """Refuse parameters whose activation (a registered function at a leaf where the
        gauge was built with another) does not admit a group of the gauge that the old one
        did: a ReLU gauge's positive scales applied to a tanh model."""
        from . import _activations

        for i, family in self.activations:
            new = _activations._lookup(leaves[i]) if callable(leaves[i]) else None
            if new is None or new == family:
                continue
            lost = [f"{n}: {g!r}" for n, g in self.sites if isinstance(g, _activations.ADMITS[family])
                    and not isinstance(g, _activations.ADMITS[new])]
            if lost:
                name = getattr(leaves[i], "__name__", repr(leaves[i]))
                raise ValueError(
                    f"leaf {self.paths[i]!r} "
                    f"is the activation {name!r} ({new}), but this gauge was built for parameters "
                    f"with a {family} activation there, and {name!r} does not admit its sites {lost}: "
                    "derive the gauge for these parameters."
                )

    def _check_element(self, g: Any, check: bool, what: str = "gauge element") -> dict[str, Any]:
        if not isinstance(g, Mapping):
            raise TypeError(
                f"a {what} is a dict {{site name: element}}, got {type(g).__name__}."
            )
        names = [name for name, _ in self.sites]
        missing = [n for n in names if n not in g]
        extra = [n for n in g if n not in dict(self.sites)]
        if missing or extra:
            raise ValueError(
                f"the {what} does not match the gauge's sites: missing {missing}, "
                f"unexpected {extra}; expected sites {names}."
            )
        out = dict(g)
        checks: list[tuple[Array, str]] = []
        for name, group in self.sites:
            expected = jax.eval_shape(lambda: group.identity())
            got_shapes = jtu.tree_map(lambda x: tuple(jnp.shape(x)), out[name])
            want_shapes = jtu.tree_map(lambda x: tuple(x.shape), expected)
            if jtu.tree_structure(out[name]) != jtu.tree_structure(expected) or got_shapes != want_shapes:
                raise ValueError(
                    f"site {name!r} ({group!r}): expected an element with shapes "
                    f"{want_shapes}, got {got_shapes}."
                )
            kinds = jtu.tree_map(lambda x, e: (jnp.issubdtype(jnp.result_type(x), jnp.integer)
                                               == jnp.issubdtype(e.dtype, jnp.integer)), out[name], expected)
            if not all(jtu.tree_leaves(kinds)):
                got = jtu.tree_map(lambda x: str(jnp.result_type(x)), out[name])
                want = jtu.tree_map(lambda e: "integer" if jnp.issubdtype(e.dtype, jnp.integer) else "float",
                                    expected)
                raise TypeError(
                    f"site {name!r} ({group!r}): expected an element of dtypes {want} "
                    f"(permutations are integer index arrays), got {got}."
                )
            if check:
                checks += [(jnp.any(bad), f"the {what} for site {name!r} ({group!r}) {reason}.")
                           for bad, reason in group.check(out[name])]
        if checks:
            # one run-time check for all sites: each `error_if` is a conditional, and on a
            # GPU every conditional waits for its predicate
            bad = jnp.stack([b for b, _ in checks])
            out = eqx.branched_error_if(out, jnp.any(bad), jnp.argmax(bad), [m for _, m in checks])
        return out

    def _check_dtypes(self, g: Mapping[str, Any], leaves: list[Any]) -> None:
        for plan in self.plans:
            dtype = jnp.dtype(leaves[plan.index].dtype)
            used = [lin.site for lin in plan.linear]
            used += [s for lp in plan.links for s in (lp.out_site, lp.in_site) if s is not None]
            if plan.translate is not None:
                used.append(plan.translate)
            for site in used:
                for d in _float_dtypes(g[site]):
                    if d != dtype:
                        raise ValueError(
                            f"dtype mismatch: the element for site {site!r} has dtype {d} but "
                            f"leaf {plan.path!r} has dtype {dtype}; sample the element with "
                            f"dtype={dtype} (or cast the parameters)."
                        )

    def check_params(self, params: PyTree) -> None:
        """Raise a `ValueError` naming the first leaf that holds NaN or inf (eagerly; not
        for use under `jit`)."""
        leaves = self._check_params(params)
        for path, leaf in zip(self.paths, leaves):
            if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact):
                if not bool(jnp.all(jnp.isfinite(leaf))):
                    raise ValueError(f"leaf {path!r} contains NaN or inf.")

    # ------------------------------------------------------------------------------------
    # the action
    # ------------------------------------------------------------------------------------
    def _act_linear(self, g: Mapping[str, Any], x: Array, plan: _LeafPlan) -> Array:
        """Apply the linear couplings of `plan` to `x`: scales, then matrices, then
        gathers (per-block permutations before the permutations of whole axes)."""
        groups = dict(self.sites)
        scale = None
        factors: list[Array] = []  # the expanded scale factors that make up `scale`
        gathers: dict[int, Array] = {}
        for lin in plan.linear:
            f = groups[lin.site].factors(g[lin.site], lin.kind)
            dims = (*lin.batch_axes, lin.axis)
            if f.scale is not None:
                s = _expand(f.scale, dims, x.ndim)
                scale = s if scale is None else scale * s
                factors.append(s)
            if f.matrix is not None:
                if scale is not None:
                    x, scale, factors = x * scale, None, []
                x = _matmul_axis(x, f.matrix, lin.batch_axes, lin.axis)
            if f.perm is not None and lin.batch_axes:
                if scale is not None:
                    x, scale, factors = x * scale, None, []
                idx = _expand(f.perm, dims, x.ndim)
                idx = jnp.broadcast_to(idx, x.shape)
                x = jnp.take_along_axis(x, idx, axis=lin.axis)
            elif f.perm is not None:
                gathers[lin.axis] = f.perm
        if gathers and scale is not None:
            # permute the leaf, then scale it by the permuted scale factors (each a small
            # broadcast array, gathered on its own axes): (P(s x))[i] = s[p[i]] x[p[i]],
            # the same products in the same order, with one pass over the leaf fewer
            moved = None
            for s in factors:
                axes = {ax: p for ax, p in gathers.items() if s.shape[ax] > 1}
                s = _gather_axes(s, axes) if axes else s
                moved = s if moved is None else moved * s
            return _gather_axes(x, gathers) * moved
        if scale is not None:
            x = x * scale
        if gathers:
            x = _gather_axes(x, gathers)
        return x

    def _act_viewed(self, g: Mapping[str, Any], x: Array, plan: _LeafPlan) -> Array:
        """`_act_linear` on an array of the leaf's shape (through the plan's view)."""
        if plan.view is None:
            return self._act_linear(g, x, plan)
        return self._act_linear(g, x.reshape(plan.view), plan).reshape(plan.shape)

    def _act_leaf(self, g: Mapping[str, Any], x: Array, plan: _LeafPlan) -> Array:
        groups = dict(self.sites)
        x = self._act_viewed(g, x, plan)
        for lp in plan.links:
            eye = jnp.eye(x.shape[0], dtype=x.dtype)
            m_out = eye if lp.out_site is None else _dense(groups[lp.out_site], g[lp.out_site], x.dtype)
            m_in_inv = (
                eye
                if lp.in_site is None
                else _dense(groups[lp.in_site], groups[lp.in_site].inverse(g[lp.in_site]), x.dtype)
            )
            x = x + (jnp.matmul(m_out, m_in_inv, precision=_HIGHEST) - eye) / lp.h
        if plan.translate is not None:
            x = x + g[plan.translate]
        return x

    @_one_program
    def act(self, g: Mapping[str, Any], params: PyTree, *, check: bool = True) -> PyTree:
        """The left action of `g` on `params`.

        A weight between sites $g'$ and $g$ maps to $g W g'^{-1}$, a bias written into $g$
        to $g b$; links and translations act affinely (see [`gaugejax.Link`][],
        [`gaugejax.Translate`][]). Diagonal factors are applied as one fused scaling per
        leaf and permutations as one gather per leaf, never as dense matrices. Leaves that
        no coupling touches are returned as they are.

        **Arguments:**

        - `g`: a group element `{site: element}`, e.g. from [`gaugejax.Gauge.sample`][].
        - `params`: a pytree with the structure and shapes the gauge was built for.
        - `check`: validate `g` at run time (non-positive scales for positive groups,
          singular GL elements, non-permutations, NaN or inf), raising an error that names
          the site. Works under `jit` and `vmap` (`equinox.error_if`).

        **Returns:** the transformed parameters (a new pytree; the input is not modified).
        """
        leaves = self._check_params(params)
        g = self._check_element(g, check)
        self._check_dtypes(g, leaves)
        new = list(leaves)
        for plan in self.plans:
            new[plan.index] = self._act_leaf(g, leaves[plan.index], plan)
        return jtu.tree_unflatten(self.treedef, new)

    # ------------------------------------------------------------------------------------
    # group operations
    # ------------------------------------------------------------------------------------
    @_one_program
    def identity(self, dtype: Any = None) -> dict[str, Any]:
        """The identity element (float parts in `dtype`, default JAX's default float)."""
        return {name: group.identity(dtype) for name, group in self.sites}

    @_one_program
    def sample(
        self,
        key: PRNGKeyArray,
        *,
        scale: float | None = 0.5,
        dtype: Any = None,
        sites: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """A random group element.

        **Arguments:**

        - `key`: a JAX PRNG key.
        - `scale`: distance from the identity of the continuous parts: log-scales
          $\\sim N(0, s^2)$ for positive diagonals, $\\exp(s X/\\sqrt{n})$ for $GL(n)$ and
          $O(n)$. `scale=None` draws $O(n)$ from the Haar measure ("far"). Discrete parts
          (permutations, signs) are always uniform.
        - `dtype`: float dtype of the element (match the parameters').
        - `sites`: sample only these sites, holding the others at the identity.
        """
        names = [name for name, _ in self.sites]
        if sites is not None:
            unknown = [s for s in sites if s not in names]
            if unknown:
                raise ValueError(f"unknown sites {unknown}; the gauge's sites are {names}.")
        chosen = [(name, group) for name, group in self.sites if sites is None or name in sites]
        # Sites whose groups sample from shared draws (every group gaugejax ships) get them
        # from one `jax.random.bits` and one `jax.random.normal` call for the whole element;
        # others get a key each. Under vmap every `jax.random` call has a fixed cost above
        # that of a small site's bits, and every Gaussian transform inlines an erfinv
        # polynomial (compile time).
        draws = {name: group.shared_draws(scale, dtype) for name, group in chosen}
        shared = [name for name, _ in chosen if draws[name] is not None]
        from_key = [name for name, _ in chosen if draws[name] is None]
        if from_key:
            keys = jax.random.split(key, len(from_key) + (1 if shared else 0))
            site_keys, key = dict(zip(from_key, keys)), keys[-1]
        if shared:
            words, normals = split_draws(
                key, sum(draws[n][0] for n in shared), sum(draws[n][1] for n in shared), dtype
            )
        out, w0, n0 = {}, 0, 0
        for name, group in self.sites:
            if name in shared:
                nw, nn = draws[name]
                out[name] = group.sample_from_draws(words[w0 : w0 + nw], normals[n0 : n0 + nn], scale, dtype)
                w0, n0 = w0 + nw, n0 + nn
            elif name in from_key:
                out[name] = group.sample(site_keys[name], scale, dtype)
            else:
                out[name] = group.identity(dtype)
        return out

    def _reindex(self, name: str, elem: Any, perms: Mapping[str, Array], invert: bool) -> Any:
        for j, outer in enumerate(dict(self.outer)[name]):
            if outer is None:
                continue
            p = dict(self.sites)[outer].permutation(perms[outer])
            idx = invert_permutation(p) if invert else p
            elem = jtu.tree_map(lambda a, idx=idx, j=j: jnp.take(a, idx, axis=j), elem)
        return elem

    def _translation_plan(self, site: str) -> _LeafPlan:
        return next(p for p in self.plans if p.translate == site)

    @_one_program
    def compose(self, g: Mapping[str, Any], h: Mapping[str, Any]) -> dict[str, Any]:
        """The product `g h`: `act(compose(g, h), p) == act(g, act(h, p))`.

        Semidirect structure (monomials within a site, head permutations acting on
        per-head blocks, translations after linear maps) is composed exactly.
        """
        g = self._check_element(g, False)
        h = self._check_element(h, False)
        out: dict[str, Any] = {}
        for name, group in self.sites:
            if isinstance(group, Translation):
                continue
            out[name] = group.compose(self._reindex(name, g[name], h, invert=True), h[name])
        for name, group in self.sites:
            if isinstance(group, Translation):
                plan = self._translation_plan(name)
                out[name] = g[name] + self._act_viewed(g, h[name], plan)
        return out

    @_one_program
    def inverse(self, g: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse element: `compose(inverse(g), g) == identity()`."""
        g = self._check_element(g, False)
        out: dict[str, Any] = {}
        for name, group in self.sites:
            if isinstance(group, Translation):
                continue
            out[name] = self._reindex(name, group.inverse(g[name]), g, invert=False)
        for name, group in self.sites:
            if isinstance(group, Translation):
                plan = self._translation_plan(name)
                out[name] = -self._act_viewed(out, g[name], plan)
        return out

    # ------------------------------------------------------------------------------------
    # Lie algebra
    # ------------------------------------------------------------------------------------
    def algebra_zeros(self, dtype: Any = None) -> dict[str, Array]:
        """The zero of the Lie algebra: `{site: zeros}` over the continuous sites."""
        return {name: self.site_groups[name].algebra_zeros(dtype) for name in self.continuous_sites}

    @_one_program
    def sample_algebra(
        self, key: PRNGKeyArray, *, scale: float = 1.0, dtype: Any = None
    ) -> dict[str, Array]:
        """A Gaussian Lie-algebra element of size `scale` over the continuous sites."""
        names = self.continuous_sites
        keys = jax.random.split(key, max(len(names), 1))
        groups = self.site_groups
        return {n: groups[n].sample_algebra(k, scale, dtype) for k, n in zip(keys, names)}

    def _check_algebra(self, xi: Any) -> None:
        if not isinstance(xi, Mapping):
            raise TypeError(f"a Lie-algebra element is a dict {{site: array}}, got {type(xi).__name__}.")
        cont = self.continuous_sites
        unknown = [k for k in xi if k not in cont]
        if unknown:
            raise ValueError(
                f"Lie-algebra element has entries {unknown} that are not continuous sites "
                f"(continuous sites: {list(cont)})."
            )
        groups = self.site_groups
        for name, x in xi.items():
            want = tuple(jax.eval_shape(lambda g=groups[name]: g.algebra_zeros()).shape)
            if tuple(jnp.shape(x)) != want:
                raise ValueError(
                    f"site {name!r} ({groups[name]!r}): expected a Lie-algebra element of shape "
                    f"{want}, got {tuple(jnp.shape(x))}."
                )

    @_one_program
    def exp(self, xi: Mapping[str, Array], dtype: Any = None) -> dict[str, Any]:
        """The exponential map, site by site: a group element near the identity whose
        derivative at `xi = 0` is the Lie-algebra direction `xi`. Discrete sites (and
        continuous sites missing from `xi`) are the identity."""
        self._check_algebra(xi)
        if dtype is None:
            dts = _float_dtypes(dict(xi))
            dtype = dts.pop() if len(dts) == 1 else None
        else:  # the element in the dtype asked for, whatever xi's
            xi = {n: x.astype(default_float(dtype)) if eqx.is_inexact_array(x) else x for n, x in xi.items()}
        out = {}
        for name, group in self.sites:
            out[name] = group.exp(xi[name], dtype) if name in xi else group.identity(dtype)
        return out

    @_one_program
    def vertical(self, params: PyTree, xi: Mapping[str, Array]) -> PyTree:
        """The infinitesimal action (vertical vector) of `xi` at `params`:
        $\\frac{d}{d\\epsilon} \\mathrm{act}(\\exp(\\epsilon\\xi), \\theta)\\big|_{\\epsilon=0}$, a JVP.

        Linear in `xi`; its image over the Lie algebra is the tangent space of the orbit.
        Returns a pytree like `params` (zeros on leaves the gauge does not touch, `None` for
        non-array leaves).
        """
        self._check_algebra(xi)
        dtype = params_float_dtype(params)
        ident = self.identity(dtype)
        # push the derivative of exp at 0 (exact per group: no matrix exponential is
        # differentiated) through the action at the identity
        direction = {
            name: group.exp_tangent(xi[name], dtype) if name in xi
            else jtu.tree_map(lambda x: jnp.zeros_like(x) if eqx.is_inexact_array(x) else None, ident[name])
            for name, group in self.sites
        }
        _, tangent = eqx.filter_jvp(lambda g: self.act(g, params, check=False), (ident,), (direction,))
        # Leaves the gauge does not touch have a zero (not a missing) tangent.
        return jtu.tree_map(
            lambda t, p: jnp.zeros_like(p) if t is None and eqx.is_inexact_array(p) else t,
            tangent, params, is_leaf=lambda t: t is None,
        )

    def orbit_rank(self, params: PyTree, *, rtol: float | None = None) -> int:
        """Numerical rank of the vertical map $\\xi \\mapsto$ `vertical(params, xi)` at
        `params`: the dimension of the orbit through this point (equal to
        [`gaugejax.Gauge.orbit_dim`][] unless `params` has a non-trivial stabiliser).
        Half-precision parameters are ranked in float32, which holds their values exactly."""
        dts = _float_dtypes(params)
        dtype = dts.pop() if len(dts) == 1 else jnp.zeros(()).dtype
        if is_half(dtype):
            # half precision: the rank at these parameter values, computed in float32 (which
            # holds them exactly); rounding at bfloat16's epsilon would hide real directions
            dtype = jnp.float32
            params = upcast_half(params)
        zeros = self.algebra_zeros(dtype)
        if not zeros:
            return 0
        jac = _vertical_jacobian(self, params, zeros)
        s = np.linalg.svd(np.asarray(jac), compute_uv=False)
        if rtol is None:
            rtol = max(jac.shape) * np.finfo(np.asarray(jac).dtype).eps
        return int(np.sum(s > rtol * s[0])) if s.size and s[0] > 0 else 0


def _dense(group: AbstractGroup, elem: Any, dtype: Any) -> Array:
    if isinstance(group, Permutation):
        return group.as_matrix(elem, dtype)
    return group.as_matrix(elem).astype(dtype)


@eqx.filter_jit
def _vertical_jacobian(gauge: Gauge, params: PyTree, zeros: dict[str, Array]) -> Array:
    flat, unravel = jax.flatten_util.ravel_pytree(zeros)

    def vert(v):
        t = gauge.vertical(params, unravel(v))
        return jax.flatten_util.ravel_pytree(eqx.filter(t, eqx.is_inexact_array))[0]

    return jax.jacfwd(vert)(flat)


# ---------------------------------------------------------------------------------------
# views made whole
# ---------------------------------------------------------------------------------------
class _Unviewed(NamedTuple):
    gauge: Gauge
    params: PyTree
    restore: Callable[[PyTree], PyTree]  # a pytree like `params` back to the leaves' shapes
    restore_element: Callable[[dict[str, Any]], dict[str, Any]]  # an element back to `gauge`


def without_views(gauge: Gauge, params: PyTree) -> _Unviewed:
    """The same gauge on `params` with every viewed leaf reshaped to its view, so that the
    view's axes are the leaf's own: algorithms that read leaf axes directly (balancing,
    canonical forms, weight matching) then serve gauges with views, e.g. the split heads of
    `equinox.nn.MultiheadAttention`. Group elements carry over unchanged, except those of
    a translation site of a viewed leaf (reshaped too). The view-free gauge is built once
    per gauge and parameter shapes."""
    if all(p.view is None for p in gauge.plans):
        return _Unviewed(gauge, params, lambda t: t, lambda g: g)
    leaves = gauge._check_params(params)
    viewed = {p.index: p for p in gauge.plans if p.view is not None}
    structs = tuple(jax.ShapeDtypeStruct(viewed[i].view if i in viewed else x.shape, x.dtype)
                    if eqx.is_array(x) else x for i, x in enumerate(leaves))
    try:
        whole = _whole_gauge(gauge, structs)
    except TypeError:  # an unhashable non-array leaf: build it uncached
        whole = _whole_gauge.__wrapped__(gauge, structs)

    def reshape(tree, to_view):
        ls = jtu.tree_structure(params).flatten_up_to(tree)
        for i, p in viewed.items():
            if ls[i] is not None:
                ls[i] = ls[i].reshape(p.view if to_view else p.shape)
        return jtu.tree_unflatten(jtu.tree_structure(params), ls)

    shapes = {p.translate: p.shape for p in viewed.values() if p.translate is not None}

    def restore_element(g):
        return {n: x.reshape(shapes[n]) if n in shapes else x for n, x in g.items()}

    return _Unviewed(whole, reshape(params, True), lambda t: reshape(t, False), restore_element)


@functools.lru_cache(maxsize=32)
def _whole_gauge(gauge: Gauge, structs: tuple) -> Gauge:
    couplings = [type(c)(c.leaf, c.axis, c.site, c.batch_axes) if isinstance(c, (Produce, Consume)) else c
                 for c in gauge.couplings]
    sites = dict(gauge.sites)
    for p in gauge.plans:
        if p.view is not None and p.translate is not None:
            sites[p.translate] = Translation(p.view)
    return Gauge(sites, couplings, jtu.tree_unflatten(gauge.treedef, list(structs)))
