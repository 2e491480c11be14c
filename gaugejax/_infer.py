"""Infer the gauge group of a JAX model from its traced program, then certify it.

`infer_gauge(fn, params, *example_inputs)` traces `fn(params, *inputs)` to a jaxpr and
propagates *axis identities* through every primitive. Each axis of each parameter leaf
starts as its own vector space; an operation that relates two axes (a contraction, a bias
add, a residual add, a batch dimension of a product) merges their spaces. A space that
parameter leaves produce and consume, that never touches an input or output axis, becomes
a *site* of a [`gaugejax.Gauge`][]; its group is the meet, over every operation on the
way, of the largest group the operation admits (MATH.md "Conventions"):

| operation on the axis | largest group |
|---|---|
| contraction with a dual axis, bias add, residual add, transpose, reshape keeping it | $GL(n)$ |
| contraction of an axis with itself ($x^\\top x$: scale-free RMSNorm, tied embeddings) | $O(n)$ |
| positively homogeneous elementwise map (`max(x, 0)`, `abs`, sign tests) | positive monomials |
| odd elementwise map (`tanh`, `sin`, `sinh`, `atan`, `erf`) | signed permutations |
| any other elementwise map, a sum or max over the axis (LayerNorm's mean), elementwise products | permutations |
| a batch dimension of `dot_general` (attention heads) | permutations |
| a gather with data-dependent indices, a reshape regrouping axes (other than splitting one into pieces, e.g. heads, or merging pieces), a slice, an unknown primitive, an input or output axis | the identity (not a site) |

Only the computation the outputs depend on is analysed (dead code, e.g. an error estimate a
fixed step size ignores, constrains nothing). `lax.scan` (up to 256 steps) is unrolled; a
`while_loop` is analysed one iteration at a time with its carry tied before and after
(equivariance for any trip count, by induction); the branches of a `cond` are analysed on
the same operands with their results tied (a branch that only raises an `equinox.error_if`
error is skipped). equinox's internal primitives (the loop buffers and vmap-aware selects
that diffrax's solvers use) are analysed through the jaxpr of their implementation, so a
diffrax solve is traced like any other loop. Zeros and non-finite fills (inf/NaN: unwritten
buffer slots, NaN guards) count as fixed by every action. A residual step $x + h(Ax + \\ldots)$ with a square leaf $A$ becomes a
[`gaugejax.Link`][] between two stream sites (the ResNet lattice gauge).

The meet is taken in the lattice $GL \\supset O, \\mathrm{Mon} \\supset \\ldots \\supset S_n
\\supset 1$, with $O \\cap \\mathrm{Mon}^+ = S_n$ and $O \\cap \\mathrm{Mon} = $ signed
permutations. Which of a space's leaf axes *produce* and which *consume* it is solved as a
two-colouring (a contraction pairs a vector with a covector); an odd cycle (a vector
contracted with itself) leaves only groups with $g^{-T} = g$.

Sites are batched over another site (one $GL(d_k)$ per head) when every tensor that holds
the axis also holds the other one and nothing reduces the other while the axis is alive.
A bias added to a quantity whose perturbation is constant along an axis that a softmax
then normalises (the key bias, MATH.md S16) gets a [`gaugejax.Translation`][] site.

Every inferred gauge is certified with [`gaugejax.check_invariance`][] before it is
returned; a failing gauge raises [`gaugejax.GaugeCertificationError`][] naming the sites
that fail alone.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from . import _paths
from ._coupling import Consume, Coupling, Link, Produce, Translate
from ._gauge import Gauge
from ._groups import (
    GL,
    AbstractGroup,
    Orthogonal,
    Permutation,
    PositiveDiagonal,
    PositiveMonomial,
    SignedPermutation,
    SignFlip,
    Translation,
)
from ._sweep import InvarianceReport, _params_dtype, _rel_error, check_invariance


# ----------------------------------------------------------------------------------------
# the group lattice
# ----------------------------------------------------------------------------------------
#: each level is the set of the canonical subgroups it contains; the meet is intersection
_LEVELS: dict[str, frozenset[str]] = {
    "GL": frozenset({"gl", "o", "mono", "posmono", "signed", "perm"}),
    "O": frozenset({"o", "signed", "perm"}),
    "Monomial": frozenset({"mono", "posmono", "signed", "perm"}),
    "PositiveMonomial": frozenset({"posmono", "perm"}),
    "SignedPermutation": frozenset({"signed", "perm"}),
    "Permutation": frozenset({"perm"}),
    "Identity": frozenset(),
}
_BY_SET = {v: k for k, v in _LEVELS.items()}
_RANK = {"GL": 6, "O": 5, "Monomial": 5, "PositiveMonomial": 4, "SignedPermutation": 4, "Permutation": 2, "Identity": 0}


def meet(a: str, b: str) -> str:
    """The largest group contained in both lattice levels `a` and `b`."""
    return _BY_SET[_LEVELS[a] & _LEVELS[b]]


#: the activation families of gaugejax._activations, as lattice levels
FAMILY_LEVEL = {
    "linear": "GL",
    "positive_homogeneous": "PositiveMonomial",
    "odd": "SignedPermutation",
    "elementwise": "Permutation",
}


def family(group: AbstractGroup) -> str:
    """The family name of a site group, robust to subclasses (e.g. a LAPACK-free GL):
    `"GL"`, `"Orthogonal"`, `"PositiveMonomial"`, ... or the class name."""
    for cls, name in (
        (GL, "GL"), (Orthogonal, "Orthogonal"), (PositiveMonomial, "PositiveMonomial"),
        (SignedPermutation, "SignedPermutation"), (Permutation, "Permutation"),
        (PositiveDiagonal, "PositiveDiagonal"), (SignFlip, "SignFlip"), (Translation, "Translation"),
    ):
        if isinstance(group, cls):
            return name
    name = type(group).__name__
    return "GL" if "GL" in name else name


#: groups whose consumed axes transform like the produced ones (g^{-T} = g)
_SELF_DUAL = {"Orthogonal", "Permutation", "SignedPermutation", "SignFlip"}


def _make_group(level: str, n: int, batch: tuple[int, ...]) -> AbstractGroup:
    if level == "GL":
        return GL(n, batch)
    if level == "O":
        return Orthogonal(n, batch)
    if level in ("PositiveMonomial", "Monomial"):
        return PositiveMonomial(n, batch)
    if level == "SignedPermutation":
        return SignedPermutation(n, batch)
    if level == "Permutation":
        return Permutation(n, batch)
    raise ValueError(level)


# ----------------------------------------------------------------------------------------
# errors and results
# ----------------------------------------------------------------------------------------
class InferenceError(ValueError):
    """Raised when a model cannot be traced or its arguments are not what inference needs."""


class GaugeCertificationError(AssertionError):
    """Raised when an inferred (or edited) gauge fails its invariance sweep.

    **Fields:** `inferred` (the [`gaugejax.InferredGauge`][], uncertified, for editing),
    `failing_sites` (the sites that fail alone), `report` (the whole sweep's report).
    """

    def __init__(self, message: str, inferred: InferredGauge, failing_sites: list[str], report: Any):
        super().__init__(message)
        self.inferred = inferred
        self.failing_sites = failing_sites
        self.report = report


@dataclasses.dataclass(frozen=True)
class Restriction:
    """Why (part of) a space carries less than $GL(n)$.

    **Fields:** `axes` (the `(leaf path, axis)` pairs of the space; empty for a space no
    leaf touches), `site` (the site's name, or `None` when the space was restricted to the
    identity and is not a site), `group` (what this operation allows: a lattice level such
    as `"Permutation"` or `"Identity"`), `primitive` (the jaxpr primitive), `reason` (in
    words) and `where` (the source line that emitted the primitive, when known).
    """

    axes: tuple[tuple[str, int], ...]
    site: str | None
    group: str
    primitive: str
    reason: str
    where: str = ""

    def __str__(self) -> str:
        axes = ", ".join(f"{p}:{a}" for p, a in self.axes[:4]) + (" ..." if len(self.axes) > 4 else "")
        loc = f" at {self.where}" if self.where else ""
        return f"[{axes}] -> {self.group}: {self.primitive}: {self.reason}{loc}"


@dataclasses.dataclass(frozen=True)
class InferredGauge:
    """The result of [`gaugejax.infer_gauge`][]: a [`gaugejax.Gauge`][] plus the evidence.

    **Fields:**

    - `gauge`: the inferred gauge (sites and couplings fed to [`gaugejax.Gauge`][]).
    - `restrictions`: every [`gaugejax.Restriction`][]: which axes were restricted by which
      primitive and why (including spaces restricted to the identity, which are not sites).
    - `notes`: other findings (shared leaves, translation candidates that failed, ...).
    - `report`: the certifying [`gaugejax.InvarianceReport`][], or `None` if not certified.
    - `fn`, `params`, `inputs`: what was traced (kept for re-certification after edits).

    Edit with [`gaugejax.InferredGauge.drop`][] and [`gaugejax.InferredGauge.replace`][]
    (both return a new, uncertified result), then [`gaugejax.InferredGauge.certify`][].
    """

    gauge: Gauge
    restrictions: tuple[Restriction, ...]
    notes: tuple[str, ...]
    report: InvarianceReport | None
    fn: Callable = dataclasses.field(repr=False)
    params: Any = dataclasses.field(repr=False)
    inputs: tuple = dataclasses.field(repr=False)

    # -- views ---------------------------------------------------------------------------
    @property
    def sites(self) -> dict[str, AbstractGroup]:
        """`{site: group}`."""
        return self.gauge.site_groups

    @property
    def certified(self) -> bool:
        """Whether an invariance sweep passed for this exact gauge."""
        return self.report is not None and self.report.passed

    def restrictions_of(self, site: str) -> tuple[Restriction, ...]:
        """The restrictions recorded for `site`."""
        return tuple(r for r in self.restrictions if r.site == site)

    def __str__(self) -> str:
        g = self.gauge
        if not self.certified:
            status = "NOT certified"
        elif self.report.num_samples == 0:
            status = "certified (no sites: nothing to check)"
        else:
            status = (f"certified ({self.report.num_samples} samples, max rel. error "
                      f"{self.report.max_rel_error:.1e})")
        lines = [f"InferredGauge: {len(g.sites)} sites, orbit dim {g.orbit_dim}, {status}"]
        for name, group in g.sites:
            lines.append(f"  site {name}: {group!r}")
            for c in g.couplings_of(name):
                lines.append(f"      {_describe(c)}")
            for r in self.restrictions_of(name):
                loc = f" ({r.where})" if r.where else ""
                lines.append(f"      restricted to {r.group} by {r.primitive}: {r.reason}{loc}")
        fixed = [r for r in self.restrictions if r.site is None and r.axes]
        if fixed:
            lines.append("  not sites (restricted to the identity):")
            seen = set()
            for r in fixed:
                key = (r.axes, r.reason)
                if key in seen:
                    continue
                seen.add(key)
                axes = ", ".join(f"{p}:{a}" for p, a in r.axes[:4]) + (" ..." if len(r.axes) > 4 else "")
                loc = f" ({r.where})" if r.where else ""
                lines.append(f"    [{axes}] by {r.primitive}: {r.reason}{loc}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)

    # -- editing -------------------------------------------------------------------------
    def _rebuild(self, sites: dict[str, AbstractGroup], couplings: list[Coupling], note: str) -> InferredGauge:
        gauge = Gauge(sites, couplings, self.params)
        return dataclasses.replace(self, gauge=gauge, report=None, notes=(*self.notes, note))

    def drop(self, site: str) -> InferredGauge:
        """A copy without `site` (and its couplings); uncertified."""
        groups = self.gauge.site_groups
        if site not in groups:
            raise ValueError(f"no site {site!r}; the sites are {list(groups)}.")
        sites = {k: v for k, v in groups.items() if k != site}
        couplings = [c for c in self.gauge.couplings if c not in self.gauge.couplings_of(site)]
        return self._rebuild(sites, couplings, f"site {site!r} dropped by the user")

    def replace(self, site: str, group: AbstractGroup | Callable[[int], AbstractGroup]) -> InferredGauge:
        """A copy where `site` carries `group` (a group, or a class / callable called with
        the site's width; a batched site keeps its batch shape when a class is given);
        uncertified. Nothing checks that the model admits it: call
        [`gaugejax.InferredGauge.certify`][]."""
        groups = self.gauge.site_groups
        if site not in groups:
            raise ValueError(f"no site {site!r}; the sites are {list(groups)}.")
        old = groups[site]
        if not isinstance(group, AbstractGroup):
            try:
                group = group(old.n, old.batch)
            except TypeError:
                group = group(old.n)
        if not isinstance(group, AbstractGroup):
            raise TypeError(f"`group` must be a gaugejax group or build one from a width; got {group!r}.")
        sites = {k: (group if k == site else v) for k, v in groups.items()}
        return self._rebuild(sites, list(self.gauge.couplings), f"site {site!r} set to {group!r} by the user")

    def certify(self, *, key: Any = None, num_samples: int = 16, scale: float | None = 0.5,
                rtol: float | None = None) -> InferredGauge:
        """Run the invariance sweep; return a certified copy or raise
        [`gaugejax.GaugeCertificationError`][] naming the failing sites (found by sweeping
        each site alone when the whole gauge fails)."""
        return _certify(self, key=key, num_samples=num_samples, scale=scale, rtol=rtol)

    def agrees_with(self, declared: Gauge) -> GaugeDifference:
        """Compare with a declared gauge; see [`gaugejax.same_gauge`][]."""
        return same_gauge(self.gauge, declared)


def _describe(c: Coupling) -> str:
    if isinstance(c, (Produce, Consume)):
        b = f" batch_axes={c.batch_axes}" if c.batch_axes else ""
        b += f" (viewed as {c.view})" if c.view is not None else ""
        return f"{'produce' if isinstance(c, Produce) else 'consume'} {c.leaf}:{c.axis}{b}"
    if isinstance(c, Translate):
        return f"translate {c.leaf}"
    return repr(c)


# ----------------------------------------------------------------------------------------
# flattening the jaxpr
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Eqn:
    prim: str
    params: dict
    ins: list  # value ids (int) or _Lit
    outs: list[int]
    where: str


@dataclasses.dataclass(frozen=True)
class _Lit:
    val: Any
    shape: tuple[int, ...]


#: scans up to this length are unrolled (their iterations analysed one by one)
MAX_UNROLL = 256

#: equinox's internal primitives (loop buffers, vmap-aware selects and reductions, used by
#: diffrax's solvers): analysed through the jaxpr of their implementation
_IMPL_INLINED = {"vprim", "maybe_set", "select_if_vmap", "unvmap_any", "unvmap_all", "unvmap_max",
                 "nonbatchable"}

_CALLS = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "remat", "checkpoint", "remat2", "named_call"}


def _sub_jaxpr(eqn) -> Any:
    for k in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if k in eqn.params:
            return eqn.params[k]
    return None


def _scan_split(eqn, in_shapes: list[tuple[int, ...]]) -> tuple[int, int]:
    """(number of constants, number of carries) of a `lax.scan` equation: from its
    `num_consts` / `num_carry` parameters where the installed jax has them, else from the
    shapes (a scanned-over operand or stacked output has one more axis than the body's
    value; a carry or constant has the body's shape; constants come first, then carries)."""
    p = eqn.params
    if "num_consts" in p and "num_carry" in p:
        return int(p["num_consts"]), int(p["num_carry"])
    inner = p["jaxpr"].jaxpr
    outs = [(tuple(o.aval.shape), tuple(i.aval.shape)) for o, i in zip(eqn.outvars, inner.outvars)]
    ncarry = next((k for k, (o, i) in enumerate(outs) if o != i), len(outs))
    if len(in_shapes) != len(inner.invars):
        raise NotImplementedError(
            f"lax.scan: {len(in_shapes)} operands for a body of {len(inner.invars)} inputs and no "
            f"`num_consts` parameter (parameters: {sorted(p)}); this jax version's scan is not supported.")
    nx = 0
    for shape, iv in zip(reversed(in_shapes), reversed(inner.invars)):
        if tuple(shape) != (int(p["length"]), *iv.aval.shape):
            break
        nx += 1
    return len(in_shapes) - ncarry - nx, ncarry


def _raises(jaxpr) -> bool:
    """A branch that reports an `equinox.error_if` error: it raises and never returns a value
    (only its sibling branches compute the result)."""
    for q in jaxpr.eqns:
        if q.primitive.name == "pure_callback":
            f = getattr(q.params.get("callback"), "callback_func", None)
            if getattr(f, "__module__", "") == "equinox._errors":
                return True
    return False


def _where(eqn) -> str:
    try:
        from jax._src import source_info_util

        return source_info_util.summarize(eqn.source_info)
    except Exception:  # pragma: no cover - private API
        return ""


class _Flat:
    def __init__(self):
        self.eqns: list[_Eqn] = []
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.dtypes: dict[int, Any] = {}
        self.counter = 0

    def new(self, aval) -> int:
        i = self.counter
        self.counter += 1
        self.shapes[i] = tuple(int(s) for s in aval.shape)
        self.dtypes[i] = aval.dtype
        return i

    def run(self, jaxpr, env: dict) -> None:
        for eqn in jaxpr.eqns:
            ins = []
            for v in eqn.invars:
                if type(v).__name__ == "Literal":
                    ins.append(_Lit(v.val, tuple(np.shape(v.val))))
                else:
                    ins.append(env[v])
            name = eqn.primitive.name
            if name == "scan" and int(eqn.params.get("length", 10**9)) <= MAX_UNROLL:
                self.unroll_scan(eqn, ins, env)
                continue
            if name == "while":
                self.while_loop(eqn, ins, env)
                continue
            if name == "cond":
                self.cond(eqn, ins, env)
                continue
            sub = _sub_jaxpr(eqn) if name in _CALLS else None
            if sub is None and name in _IMPL_INLINED:
                impl = functools.partial(eqn.primitive.impl, **eqn.params)
                sub = jax.make_jaxpr(impl)(*[jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars])
            if sub is not None:
                closed = sub if hasattr(sub, "consts") else None
                inner = sub.jaxpr if closed is not None else sub
                consts = list(closed.consts) if closed is not None else []
                outs = self.inline(inner, consts, ins[len(ins) - len(inner.invars):])
                for ov, o in zip(eqn.outvars, outs):
                    if type(ov).__name__ != "DropVar":
                        env[ov] = o
                continue
            outs = []
            for ov in eqn.outvars:
                i = self.new(ov.aval)
                if type(ov).__name__ != "DropVar":
                    env[ov] = i
                outs.append(i)
            self.eqns.append(_Eqn(name, dict(eqn.params), ins, outs, _where(eqn)))

    def inline(self, inner, consts: list, args: list) -> list[int]:
        """Analyse a sub-jaxpr in place (a call, an inlined primitive, a branch); its outputs."""
        sub_env: dict = {}
        for cv, c in zip(inner.constvars, consts):
            sub_env[cv] = self.const(c)
        for iv, a in zip(inner.invars, args):
            sub_env[iv] = a if isinstance(a, int) else self.literal(a)
        self.run(inner, sub_env)
        return [self.literal(_Lit(o.val, tuple(np.shape(o.val)))) if type(o).__name__ == "Literal"
                else sub_env[o] for o in inner.outvars]

    def cond(self, eqn, ins: list, env: dict) -> None:
        """Analyse every branch of a `lax.cond`/`lax.switch` on the same operands; a `__join__`
        pseudo-primitive ties each output's axes across the branches (if every branch is
        equivariant with the same output action, so is the choice between them, as long as
        the branch index is invariant, which the analysis of its computation ensures)."""
        ins = [a if isinstance(a, int) else self.literal(a) for a in ins]
        index, operands = ins[0], ins[1:]
        branches = [br for br in eqn.params["branches"] if not _raises(br.jaxpr)] or eqn.params["branches"]
        per_branch = [self.inline(br.jaxpr, list(br.consts), operands) for br in branches]
        for k, ov in enumerate(eqn.outvars):
            i = self.new(ov.aval)
            self.eqns.append(_Eqn("__join__", {}, [outs[k] for outs in per_branch] + [index], [i], _where(eqn)))
            if type(ov).__name__ != "DropVar":
                env[ov] = i

    def unroll_scan(self, eqn, ins: list, env: dict) -> None:
        """Inline a `lax.scan` iteration by iteration: iteration `i` reads slice `i` of each
        scanned-over value (an `__index__` pseudo-primitive) and the stacked outputs are a
        `stack` of the iterations' outputs."""
        p = eqn.params
        closed = p["jaxpr"]
        inner = closed.jaxpr
        length = int(p["length"])
        ins = [a if isinstance(a, int) else self.literal(a) for a in ins]
        nc, ncarry = _scan_split(eqn, [self.shapes[a] for a in ins])
        consts, carry, xs = ins[:nc], ins[nc:nc + ncarry], ins[nc + ncarry:]
        ys: list[list[int]] = []
        order = range(length - 1, -1, -1) if p.get("reverse") else range(length)
        for it in order:
            sub_env: dict = {}
            for cv, c in zip(inner.constvars, closed.consts):
                sub_env[cv] = self.const(c)
            slices = []
            for x in xs:
                aval = jax.ShapeDtypeStruct(self.shapes[x][1:], self.dtypes[x])
                i = self.new(aval)
                self.eqns.append(_Eqn("__index__", {"index": it}, [x], [i], "lax.scan (unrolled)"))
                slices.append(i)
            for iv, a in zip(inner.invars, [*consts, *carry, *slices]):
                sub_env[iv] = a
            self.run(inner, sub_env)
            outs = []
            for ov in inner.outvars:
                if type(ov).__name__ == "Literal":
                    outs.append(self.literal(_Lit(ov.val, tuple(np.shape(ov.val)))))
                else:
                    outs.append(sub_env[ov])
            carry = outs[:ncarry]
            ys.append(outs[ncarry:])
        if p.get("reverse"):
            ys = ys[::-1]
        results = list(carry)
        for k, ov in enumerate(eqn.outvars[ncarry:]):
            i = self.new(ov.aval)
            self.eqns.append(_Eqn("stack", {"axis": 0}, [y[k] for y in ys], [i], "lax.scan (unrolled)"))
            results.append(i)
        for ov, r in zip(eqn.outvars, results):
            if type(ov).__name__ != "DropVar":
                env[ov] = r

    def while_loop(self, eqn, ins: list, env: dict) -> None:
        """Analyse one iteration of a `while_loop` (and its condition) with the carry's axes
        required to be the same space before and after it (a `__loop__` pseudo-primitive
        ties them): equivariance of one iteration, with the carry transforming the same way
        in and out, gives equivariance of the whole loop by induction."""
        p = eqn.params
        ins = [a if isinstance(a, int) else self.literal(a) for a in ins]
        nc, nb = int(p["cond_nconsts"]), int(p["body_nconsts"])
        cconsts, bconsts, init = ins[:nc], ins[nc:nc + nb], ins[nc + nb:]
        carry = []
        for c in init:  # the carry as the body sees it: the initial value or any later one
            ci = self.new(jax.ShapeDtypeStruct(self.shapes[c], self.dtypes[c]))
            self.eqns.append(_Eqn("__carry__", {}, [c], [ci], "lax.while_loop (the carry)"))
            carry.append(ci)
        (pred,) = self.inline(p["cond_jaxpr"].jaxpr, list(p["cond_jaxpr"].consts), [*cconsts, *carry])
        outs = self.inline(p["body_jaxpr"].jaxpr, list(p["body_jaxpr"].consts), [*bconsts, *carry])
        for ov, c_in, c_out in zip(eqn.outvars, carry, outs):
            i = self.new(ov.aval)
            self.eqns.append(_Eqn("__loop__", {}, [c_in, c_out, pred], [i], "lax.while_loop (one iteration)"))
            if type(ov).__name__ != "DropVar":
                env[ov] = i

    def const(self, c) -> int:
        i = self.new(jax.ShapeDtypeStruct(np.shape(c), np.asarray(c).dtype if not hasattr(c, "dtype") else c.dtype))
        self.eqns.append(_Eqn("__const__", {"value": c}, [], [i], ""))
        return i

    def literal(self, lit: _Lit) -> int:
        i = self.new(jax.ShapeDtypeStruct(lit.shape, np.asarray(lit.val).dtype))
        self.eqns.append(_Eqn("__const__", {"value": lit.val}, [], [i], ""))
        return i


# ----------------------------------------------------------------------------------------
# axis identities: union-find with parity
# ----------------------------------------------------------------------------------------
class _Classes:
    def __init__(self):
        self.parent: list[int] = []
        self.par: list[int] = []
        self.level: dict[int, str] = {}
        self.events: dict[int, list[tuple[str, str, str, str]]] = {}
        # root -> (sizes, [(child node, parity of the child relative to the root's frame)]):
        # the space is a tensor product of the children's (a reshape split it, or merged them)
        self.split: dict[int, tuple[tuple[int, ...], list[tuple[int, int]]]] = {}

    def node(self) -> int:
        n = len(self.parent)
        self.parent.append(n)
        self.par.append(0)
        self.level[n] = "GL"
        self.events[n] = []
        return n

    def find(self, n: int) -> tuple[int, int]:
        p = 0
        path = []
        while self.parent[n] != n:
            path.append(n)
            p ^= self.par[n]
            n = self.parent[n]
        # path compression
        acc = p
        for m in path:
            old = self.par[m]
            self.parent[m] = n
            self.par[m] = acc
            acc ^= old
        return n, p

    def restrict(self, n: int, level: str, prim: str, reason: str, where: str) -> None:
        r, _ = self.find(n)
        new = meet(self.level[r], level)
        if new != self.level[r] or level != "GL":
            self.events[r].append((level, prim, reason, where))
        self.level[r] = new

    def union(self, a: int, b: int, parity: int, prim: str, where: str) -> None:
        ra, pa = self.find(a)
        rb, pb = self.find(b)
        if ra == rb:
            if pa ^ pb != parity:
                self.restrict(ra, "O", prim, "an axis is paired with itself (a vector contracted with "
                              "itself, or a leaf that both writes and reads the space): only "
                              "groups with g^-T = g survive", where)
            return
        la, lb = self.level[ra], self.level[rb]
        if (la == "Identity") != (lb == "Identity"):
            fixed = ra if la == "Identity" else rb
            first = next((e for e in self.events[fixed] if e[0] == "Identity"), None)
            why = f"{first[1]}: {first[2]}" if first else "fixed"
            other = rb if fixed == ra else ra
            self.events[other].append(("Identity", prim, f"tied to a fixed axis ({why})", where))
        self.parent[rb] = ra
        q = pa ^ pb ^ parity
        self.par[rb] = q
        self.level[ra] = meet(la, lb)
        self.events[ra].extend(self.events.pop(rb))
        self.level.pop(rb)
        sa, sb = self.split.get(ra), self.split.pop(rb, None)
        if sb is not None:
            sb = (sb[0], [(c, off ^ q) for c, off in sb[1]])  # into ra's frame
            if sa is None:
                self.split[ra] = sb
            elif sa[0] == sb[0]:
                for (c1, o1), (c2, o2) in zip(sa[1], sb[1]):
                    self.union(c1, c2, o1 ^ o2, prim, where)
            else:
                self.restrict(ra, "Identity", prim, f"the same space is split as {sa[0]} and as {sb[0]}", where)

    def pieces(self, n: int, sizes: tuple[int, ...], prim: str, where: str) -> list[int] | None:
        """Nodes for the sub-axes of node `n` split into `sizes` (the same children wherever the
        space is split the same way); None if it is already split differently."""
        r, p = self.find(n)
        if r not in self.split:
            kids = [self.node() for _ in sizes]
            self.split[r] = (tuple(sizes), [(k, p) for k in kids])
            return kids
        have, kids = self.split[r]
        if have != tuple(sizes):
            self.restrict(r, "Identity", prim, f"the same space is split as {have} and as {tuple(sizes)}", where)
            return None
        out = []
        for k, off in kids:
            f = self.node()
            self.union(f, k, p ^ off, prim, where)
            out.append(f)
        return out

    def merged(self, nodes: list[int], sizes: tuple[int, ...]) -> int:
        """A node for the product space of `nodes` (a reshape merging axes)."""
        m = self.node()
        self.split[m] = (tuple(sizes), [(k, 0) for k in nodes])
        return m

    def expand(self, n: int) -> list[tuple[int, int]]:
        """`n` as (root, parity) pairs of its innermost pieces (itself if never split)."""
        r, p = self.find(n)
        if r not in self.split:
            return [(r, p)]
        out = []
        for k, off in self.split[r][1]:
            out += [(rk, pk ^ p ^ off) for rk, pk in self.expand(k)]
        return out


_ODD = {"tanh", "sin", "sinh", "atan", "asinh", "erf", "tan", "asin", "cbrt"}
_ELEMENTWISE = {"exp", "exp2", "log", "log1p", "expm1", "logistic", "erfc", "erf_inv", "cos", "cosh",
                "acos", "acosh", "atanh", "sqrt", "rsqrt", "integer_pow", "pow", "floor", "ceil",
                "round", "sign", "is_finite", "lgamma", "digamma", "not", "nextafter",
                "clamp", "rem", "logaddexp"}
_LINEAR_UNARY = {"neg", "copy", "copy_p", "stop_gradient", "reduce_precision", "real"}
_COMPARE = {"gt", "ge", "lt", "le", "eq", "ne", "lt_to", "le_to"}
_BOOL = {"and", "or", "xor"}


@dataclasses.dataclass
class _Analysis:
    flat: _Flat
    cls: _Classes
    dims: dict[int, tuple]
    leaf_nodes: dict[int, list[int]]  # leaf index -> node per axis
    leaf_vals: dict[int, int]  # value id -> leaf index
    reductions: list[tuple[tuple, frozenset]]  # (dims of operand, reduced positions)
    output_vals: list[int]
    consts: dict[int, Any]
    producer: dict = dataclasses.field(default_factory=dict)
    links: list = dataclasses.field(default_factory=list)  # (leaf, out node, in node, h, x node, y node)
    contract_marks: dict = dataclasses.field(default_factory=dict)  # value -> axes a sum contracts
    uses: dict = dataclasses.field(default_factory=dict)  # value -> indices of the live equations reading it


def _all_zero(c: Any) -> bool:
    return bool(np.all(c == 0))


def _all_inf(c: Any) -> bool:
    return bool(np.all(np.isinf(c)))


def _scalar_const(a: _Analysis, v) -> Any:
    if isinstance(v, _Lit):
        return np.asarray(v.val) if v.shape == () else None
    return a.consts.get(v)


def _live(eqns: list[_Eqn], outputs: list) -> list[_Eqn]:
    """The equations the outputs depend on (dead code, e.g. an error estimate that a constant
    step size ignores, constrains nothing). A loop iteration is live when its result or its
    carry is read; iterate to a fixed point because loop bodies read their carry."""
    live_vals = {v for v in outputs if isinstance(v, int)}
    live = [False] * len(eqns)
    changed = True
    while changed:
        changed = False
        for k in range(len(eqns) - 1, -1, -1):
            e = eqns[k]
            if live[k]:
                continue
            if any(o in live_vals for o in e.outs) or (e.prim == "__loop__" and e.ins[0] in live_vals):
                live[k] = changed = True
                live_vals.update(v for v in e.ins if isinstance(v, int))
    return [e for e, keep in zip(eqns, live) if keep]


def _analyse(flat: _Flat, leaf_vals: dict[int, int], input_vals: list[tuple[int, str]], outputs: list) -> _Analysis:
    cls = _Classes()
    a = _Analysis(flat, cls, {}, {}, dict(leaf_vals), [], [], {})
    flat.eqns = _live(flat.eqns, outputs)
    uses: dict[int, list[int]] = {}
    for k, e in enumerate(flat.eqns):
        for v in e.ins:
            if isinstance(v, int):
                uses.setdefault(v, []).append(k)

    producer: dict[int, _Eqn] = {}
    for e in flat.eqns:
        for o in e.outs:
            producer[o] = e
    a.producer = producer
    a.uses = uses
    a.links = []
    # per operation on several tracked operands, each operand's {slot: node}: the slots an
    # operation matches across operands (an elementwise axis; a dot_general's contracted or
    # batch pair) coincide, the others differ (a dot_general's free axes)
    a.pairings = []
    a.reindexed = []  # nodes of axes taken in part, reversed or concatenated along
    for v, leaf in leaf_vals.items():
        nodes = [cls.node() for _ in flat.shapes[v]]
        a.leaf_nodes[leaf] = nodes
        a.dims[v] = tuple(nodes)
    for v, what in input_vals:
        nodes = []
        for ax in range(len(flat.shapes[v])):
            n = cls.node()
            cls.restrict(n, "Identity", "input", f"axis {ax} of {what} (inputs are not transformed)", "")
            nodes.append(n)
        a.dims[v] = tuple(nodes)

    def fix(nodes, prim, reason, where):
        for n in nodes:
            if n is not None:
                cls.restrict(n, "Identity", prim, reason, where)

    def fresh_fixed(v, prim, reason, where):
        nodes = []
        for _ in flat.shapes[v]:
            n = cls.node()
            cls.restrict(n, "Identity", prim, reason, where)
            nodes.append(n)
        return tuple(nodes)

    def dims_of(x) -> tuple:
        if isinstance(x, _Lit):
            return (None,) * len(x.shape)
        return a.dims[x]

    def shape_of(x) -> tuple:
        return x.shape if isinstance(x, _Lit) else flat.shapes[x]

    def is_zero(x) -> bool:
        c = _scalar_const(a, x)
        return c is not None and _all_zero(c)

    def neutral(x) -> bool:
        """Zeros (fixed by every linear action) or a non-finite fill (inf/nan: the marker of a
        buffer slot not yet written or of a NaN guard; the gauge is certified on finite values)."""
        c = _scalar_const(a, x)
        return c is not None and bool(np.all((c == 0) | ~np.isfinite(c)))

    def normalised(e: _Eqn) -> list:
        """Operand dims with implicitly broadcast size-1 axes as `None` (those leaf axes
        are fixed: a size-1 axis cannot carry a site)."""
        oshape = flat.shapes[e.outs[0]]
        rank = len(oshape)
        out = []
        for x in e.ins:
            d, sh = dims_of(x), shape_of(x)
            if len(d) == rank:
                dropped = [d[i] for i in range(rank) if sh[i] == 1 and oshape[i] != 1]
                fix(dropped, e.prim, "a size-1 axis broadcast against a larger one", e.where)
                d = tuple(None if sh[i] == 1 and oshape[i] != 1 else d[i] for i in range(rank))
            out.append(d)
        return out

    def elementwise(e: _Eqn, level: str | None, why: str, *, additive: bool = True,
                    level_operands: tuple[int, ...] | None = None,
                    inert: Callable[[Any], bool] | None = None) -> None:
        """`additive`: an operand constant along an axis (a scalar or a rank-0 leaf
        included) restricts it to permutations, unless it is a constant that `inert` accepts
        (default: zeros of add / sub; the 0 of ReLU's max, whose group `level` says)."""
        rank = len(flat.shapes[e.outs[0]])
        if inert is None and e.prim in ("add", "sub", "add_any"):
            inert = _all_zero  # adding zeros is equivariant under every linear map
        ins = []
        for k, (x, d) in enumerate(zip(e.ins, normalised(e))):
            c = _scalar_const(a, x)
            if additive and inert is not None and c is not None and inert(c):
                continue
            ins.append((k, d))
        full = [d for _, d in ins if len(d) == rank]
        if len(full) > 1:  # pairings of different indices of a space (see `_build`)
            a.pairings.append(tuple(dict(enumerate(d)) for d in full))
        out = [None] * rank
        for i in range(rank):
            nodes = [(k, d[i]) for k, d in ins if len(d) == rank and d[i] is not None]
            if not nodes:
                continue
            first = nodes[0][1]
            for _, n in nodes[1:]:
                cls.union(first, n, 0, e.prim, e.where)
            out[i] = first
            if additive and len(nodes) < len(ins):
                cls.restrict(first, "Permutation", e.prim,
                             "combined elementwise with a value that is constant along the axis", e.where)
            if level is not None and (level_operands is None or any(k in level_operands for k, _ in nodes)):
                cls.restrict(first, level, e.prim, why, e.where)
        for o in e.outs:
            a.dims[o] = tuple(out)

    for k, e in enumerate(flat.eqns):
        p, w = e.prim, e.where
        if p == "__const__":
            val = e.params["value"]
            if np.ndim(val) == 0:
                a.consts[e.outs[0]] = np.asarray(val)
                a.dims[e.outs[0]] = ()
            else:
                a.dims[e.outs[0]] = fresh_fixed(e.outs[0], "constant", "a constant array captured by the function", "")
            continue
        ins = [dims_of(x) for x in e.ins]
        out_shape = flat.shapes[e.outs[0]] if e.outs else ()
        if p == "dot_general":
            (lc, rc), (lb, rb) = e.params["dimension_numbers"]
            ld, rd = ins
            for i, j in zip(lc, rc):
                if ld[i] is not None and rd[j] is not None:
                    cls.union(ld[i], rd[j], 1, p, w)
                else:
                    n = ld[i] if ld[i] is not None else rd[j]
                    other = e.ins[1] if ld[i] is not None else e.ins[0]
                    if n is not None and not is_zero(other):
                        cls.restrict(n, "Permutation", p, "summed against a constant", w)
            out = []
            for i, j in zip(lb, rb):
                n = ld[i] if ld[i] is not None else rd[j]
                if ld[i] is not None and rd[j] is not None:
                    cls.union(ld[i], rd[j], 0, p, w)
                if n is not None:
                    cls.restrict(n, "Permutation", p, "a batch dimension of a product (the same "
                                 "index on both sides)", w)
                out.append(n)
            out += [ld[i] for i in range(len(ld)) if i not in lc and i not in lb]
            out += [rd[j] for j in range(len(rd)) if j not in rc and j not in rb]
            a.dims[e.outs[0]] = tuple(out)
            a.reductions.append((ld, frozenset(lc)))
            a.reductions.append((rd, frozenset(rc)))
            # contracted and batch pairs share a slot; free axes do not (a space free on both
            # sides pairs its different indices through the contraction: a cross-head Gram)
            a.pairings.append(tuple(
                {**{("c", k): d[i] for k, i in enumerate(c)}, **{("b", k): d[i] for k, i in enumerate(b)},
                 **{(side, i): d[i] for i in range(len(d)) if i not in c and i not in b}}
                for d, c, b, side in ((ld, lc, lb, "l"), (rd, rc, rb, "r"))))
        elif p == "__index__":
            (x,) = e.ins
            src = a.producer.get(x) if isinstance(x, int) else None
            it = e.params["index"]
            if src is not None and src.prim == "stack" and src.params["axis"] == 0:
                part = src.ins[it]
                a.dims[e.outs[0]] = dims_of(part)
            else:
                fix(ins[0][:1], "scan", "a scanned-over axis (one slice per iteration)", w)
                a.dims[e.outs[0]] = tuple(ins[0][1:])
        elif p == "__carry__":
            (d,) = ins
            out = []
            for n in d:
                if n is None:
                    n = cls.node()
                    if not neutral(e.ins[0]):
                        cls.restrict(n, "Permutation", "while", "the loop starts from a value constant along the axis", w)
                out.append(n)
            a.dims[e.outs[0]] = tuple(out)
        elif p == "__loop__":
            d_in, d_out = ins[:2]
            out = []
            for i, (m, n) in enumerate(zip(d_in, d_out)):
                if m is not None and n is not None:
                    cls.union(m, n, 0, "while", "the loop carry has the same space before and after an iteration")
                elif (m is None and neutral(e.ins[0])) or (n is None and neutral(e.ins[1])):
                    pass
                elif m is not None or n is not None:
                    cls.restrict(m if m is not None else n, "Permutation", "while",
                                 "the loop carry is constant along this axis on one side only", w)
                out.append(m if m is not None else n)
            a.dims[e.outs[0]] = tuple(out)
        elif p == "dynamic_update_slice":
            dop, dup, *dix = ins
            op_shape, up_shape = shape_of(e.ins[0]), shape_of(e.ins[1])
            out = []
            for i in range(len(op_shape)):
                m, n = dop[i], dup[i]
                if op_shape[i] == up_shape[i]:
                    if m is not None and n is not None:
                        cls.union(m, n, 0, p, w)
                    elif m is not None or n is not None:
                        cls.restrict(m if m is not None else n, "Permutation", p,
                                     "an update constant along the axis", w)
                    out.append(m if m is not None else n)
                else:
                    fix([m, n], p, "a partial update along the axis", w)
                    k = cls.node()
                    cls.restrict(k, "Identity", p, "a partially updated axis", w)
                    out.append(k)
            for d in dix:
                fix(d, p, "used as an index", w)
            a.dims[e.outs[0]] = tuple(out)
        elif p == "add" and _link_add(a, e, ins):
            pass
        elif p in ("add", "sub", "add_any"):
            elementwise(e, None, "")
        elif p in ("mul",):
            x, y = e.ins
            dx, dy = normalised(e)
            rank = len(out_shape)
            if len(dx) == rank and len(dy) == rank and any(
                    dx[i] is not None and dy[i] is not None for i in range(rank)):
                # a product of two tracked values: a contraction if a sum over the axis follows
                use = uses.get(e.outs[0], [])
                red = set()
                if len(use) == 1 and flat.eqns[use[0]].prim == "reduce_sum":
                    red = set(flat.eqns[use[0]].params["axes"])
                out = []
                contracted = set()
                for i in range(rank):
                    if dx[i] is not None and dy[i] is not None:
                        if i in red:
                            cls.union(dx[i], dy[i], 1, p, w)
                            out.append(dx[i])
                            contracted.add(i)
                            continue
                        cls.union(dx[i], dy[i], 0, p, w)
                        cls.restrict(dx[i], "Permutation", p, "an elementwise product of two "
                                     "values on the axis", w)
                    out.append(dx[i] if dx[i] is not None else dy[i])
                a.dims[e.outs[0]] = tuple(out)
                a.contract_marks[e.outs[0]] = contracted
                a.pairings.append((dict(enumerate(dx)), dict(enumerate(dy))))
            else:
                # a tracked axis times a constant along it is fine (a scalar per other index)
                elementwise(e, None, "", additive=False)
        elif p == "div":
            elementwise(e, "Permutation", "division by a value on the axis", additive=False,
                        level_operands=(1,))
        elif p in ("max", "min"):
            cs = [_scalar_const(a, x) for x in e.ins]
            c = next((c for c in cs if c is not None), None)
            if c is not None and np.isinf(c).all():
                elementwise(e, None, "", inert=_all_inf)
            elif c is not None and (c == 0).all():
                elementwise(e, "PositiveMonomial", f"{p}(x, 0) is positively homogeneous (ReLU)",
                            inert=_all_zero)
            else:
                elementwise(e, "Permutation", f"{p} of values")
        elif p in _COMPARE:
            cs = [_scalar_const(a, x) for x in e.ins]
            if any(c is not None and (c == 0).all() for c in cs):
                elementwise(e, "PositiveMonomial", "a sign test (comparison with 0) is invariant under positive scaling",
                            inert=_all_zero)
            else:
                elementwise(e, "Permutation", "a comparison")
        elif p == "select_n":
            nd = normalised(e)
            rank = len(out_shape)
            d_pred, cases = nd[0], list(zip(e.ins[1:], nd[1:]))
            out = []
            for i in range(rank):
                nodes = [d[i] for _, d in cases if len(d) == rank and d[i] is not None]
                n_pred = d_pred[i] if len(d_pred) == rank else None
                if not nodes:
                    if n_pred is not None:
                        cls.restrict(n_pred, "Permutation", p, "selects constants by a predicate on the axis", w)
                    out.append(n_pred)
                    continue
                for n in nodes[1:]:
                    cls.union(nodes[0], n, 0, p, w)
                if len(nodes) < len(cases) and not all(
                        neutral(x) for x, d in cases if not (len(d) == rank and d[i] is not None)):
                    cls.restrict(nodes[0], "Permutation", p, "selects between a value on the axis and one "
                                 "constant along it", w)
                if n_pred is not None:  # an entrywise choice (leaky ReLU's branches)
                    cls.union(nodes[0], n_pred, 0, p, w)
                    cls.restrict(nodes[0], "Monomial", p, "select_n picks entries elementwise", w)
                out.append(nodes[0])
            a.dims[e.outs[0]] = tuple(out)
        elif p == "__join__":
            *branches, _index = ins
            rank = len(out_shape)
            out = []
            for i in range(rank):
                nodes = [d[i] for d in branches if d[i] is not None]
                for n in nodes[1:]:
                    cls.union(nodes[0], n, 0, "cond", w)
                if nodes and not all(neutral(x) for x, d in zip(e.ins, branches) if d[i] is None):
                    cls.restrict(nodes[0], "Permutation", "cond", "a branch returns a value constant along the axis", w)
                out.append(nodes[0] if nodes else None)
            a.dims[e.outs[0]] = tuple(out)
        elif p in ("scatter", "scatter-add", "scatter_add"):
            dop, dix, dup = ins[0], ins[1], ins[2]
            dn = e.params["dimension_numbers"]
            op_shape, up_shape = shape_of(e.ins[0]), shape_of(e.ins[2])
            skip = set(dn.inserted_window_dims) | set(getattr(dn, "operand_batching_dims", ()))
            window = [j for j in range(len(op_shape)) if j not in skip]
            out = list(dop)
            for j, u in zip(window, dn.update_window_dims):
                m, n = dop[j], dup[u]
                if op_shape[j] != up_shape[u]:
                    fix([m, n], p, "a partial update along the axis", w)
                    out[j] = cls.node()
                    cls.restrict(out[j], "Identity", p, "a partially updated axis", w)
                elif m is not None and n is not None:
                    cls.union(m, n, 0, p, w)
                elif n is not None and not neutral(e.ins[0]):
                    cls.restrict(n, "Permutation", p, "an update written into a buffer constant along the axis", w)
                    out[j] = n
                elif m is not None:
                    cls.restrict(m, "Permutation", p, "an update constant along the axis", w)
                else:
                    out[j] = n
            for j in skip:
                fix([dop[j]], p, "scattered into along this axis (entries written by index)", w)
                if out[j] is None:
                    out[j] = cls.node()
                    cls.restrict(out[j], "Identity", p, "an axis written by index", w)
            fix([n for u, n in enumerate(dup) if u not in dn.update_window_dims], p,
                "an axis of scattered updates (one per index)", w)
            fix(dix, p, "used as an index", w)
            a.dims[e.outs[0]] = tuple(out)
        elif p == "abs":
            elementwise(e, "PositiveMonomial", "abs is positively homogeneous")
        elif p in _ODD:
            elementwise(e, "SignedPermutation", f"{p} is odd")
        elif p == "optimization_barrier":  # the identity on each of its operands
            for x, o in zip(e.ins, e.outs):
                a.dims[o] = dims_of(x)
                if _scalar_const(a, x) is not None:
                    a.consts[o] = _scalar_const(a, x)
        elif p in _LINEAR_UNARY:
            c = _scalar_const(a, e.ins[0])
            if c is not None and len(e.outs) == 1:
                a.consts[e.outs[0]] = -c if p == "neg" else c
            elementwise(e, None, "")
        elif (p == "integer_pow" and e.params.get("y") == 2) or p == "square":
            use = uses.get(e.outs[0], [])
            red = set(flat.eqns[use[0]].params["axes"]) if len(use) == 1 and flat.eqns[use[0]].prim == "reduce_sum" else set()
            (dx,) = ins
            contracted = set()
            for i, n in enumerate(dx):
                if n is None:
                    continue
                if i in red:
                    cls.union(n, n, 1, "integer_pow", w)  # x . x: self-contraction
                    contracted.add(i)
                else:
                    cls.restrict(n, "Permutation", p, "x**2 elementwise", w)
            a.dims[e.outs[0]] = dx
            a.contract_marks[e.outs[0]] = contracted
        elif p in _ELEMENTWISE or p in _BOOL:
            elementwise(e, "Permutation", f"{p} is elementwise")
        elif p == "convert_element_type":
            (x,) = e.ins
            if _scalar_const(a, x) is not None:
                a.consts[e.outs[0]] = _scalar_const(a, x)
            if jnp.issubdtype(flat.dtypes[e.outs[0]], jnp.floating) and (
                    isinstance(x, _Lit) or jnp.issubdtype(flat.dtypes[x], jnp.floating)):
                elementwise(e, None, "")
            else:
                elementwise(e, "Permutation", "a cast to a non-float type")
        elif p == "reduce_sum":
            (dx,) = ins
            axes = set(e.params["axes"])
            marked = a.contract_marks.get(e.ins[0], set()) if isinstance(e.ins[0], int) else set()
            for i in axes:
                if dx[i] is not None and i not in marked:
                    cls.restrict(dx[i], "Permutation", p, "summed over (a mean or sum over the axis)", w)
            a.dims[e.outs[0]] = tuple(n for i, n in enumerate(dx) if i not in axes)
            a.reductions.append((dx, frozenset(axes)))
        elif p in ("reduce_max", "reduce_min", "argmax", "argmin", "reduce_prod", "reduce_and", "reduce_or"):
            (dx,) = ins
            axes = set(e.params["axes"])
            for i in axes:
                if dx[i] is not None:
                    if p in ("argmax", "argmin"):  # the result is a position on the axis
                        cls.restrict(dx[i], "Identity", p, f"{p} returns an index into the axis", w)
                    else:
                        cls.restrict(dx[i], "Permutation", p, f"{p} over the axis", w)
            # the kept axes: a max over another axis commutes with positive scalings and
            # permutations of them, not with sums (max_b (g h_b) != g max_b h_b); a product
            # over another axis only with permutations
            kept = "Permutation" if p in ("reduce_prod", "reduce_and", "reduce_or") else "PositiveMonomial"
            for i, n in enumerate(dx):
                if i not in axes and n is not None:
                    cls.restrict(n, kept, p, f"{p} over another axis", w)
            a.dims[e.outs[0]] = tuple(n for i, n in enumerate(dx) if i not in axes)
            a.reductions.append((dx, frozenset(axes)))
        elif p == "transpose":
            (dx,) = ins
            a.dims[e.outs[0]] = tuple(dx[i] for i in e.params["permutation"])
        elif p == "broadcast_in_dim":
            (dx,) = ins
            x = e.ins[0]
            if _scalar_const(a, x) is not None:
                a.consts[e.outs[0]] = _scalar_const(a, x)
            in_shape = flat.shapes[x] if isinstance(x, int) else x.shape
            out = [None] * len(out_shape)
            for i, d in enumerate(e.params["broadcast_dimensions"]):
                if in_shape[i] == out_shape[d]:
                    out[d] = dx[i]
                else:  # a size-1 axis broadcast: its copies cannot carry its site
                    fix([dx[i]], p, "a size-1 axis broadcast against a larger one", w)
            a.dims[e.outs[0]] = tuple(out)
        elif p == "squeeze":
            (dx,) = ins
            gone = set(e.params["dimensions"])
            # the squeezed axes leave the program (a scalar head's output unit): fixed
            fix([n for i, n in enumerate(dx) if i in gone], p, "a size-1 axis squeezed away", w)
            a.dims[e.outs[0]] = tuple(n for i, n in enumerate(dx) if i not in gone)
        elif p == "expand_dims":
            (dx,) = ins
            out = list(dx)
            for d in sorted(e.params["dimensions"]):
                out.insert(d, None)
            a.dims[e.outs[0]] = tuple(out)
        elif p == "reshape":
            a.dims[e.outs[0]] = _reshape_dims(a, e, ins[0])
        elif p in ("slice", "dynamic_slice", "pad", "rev"):
            (dx, *_rest) = ins
            in_shape = flat.shapes[e.ins[0]] if isinstance(e.ins[0], int) else e.ins[0].shape
            out = []
            for i, n in enumerate(dx):
                full = in_shape[i] == out_shape[i]
                if p == "slice" and e.params.get("strides") and e.params["strides"][i] not in (None, 1):
                    full = False
                if p == "rev" and i in e.params["dimensions"]:
                    full = False
                if p == "pad" and e.params["padding_config"][i] != (0, 0, 0):
                    full = False
                if full or n is None:
                    if n is not None and p == "pad" and any(c != (0, 0, 0) for c in e.params["padding_config"]) \
                            and not neutral(e.ins[1]):
                        cls.restrict(n, "Permutation", p, "padded (along another axis) with a value "
                                     "constant along this one", w)
                    out.append(n)
                else:
                    fix([n], p, f"{p} takes part of the axis", w)
                    a.reindexed.append(n)
                    out.append(cls.node())
                    cls.restrict(out[-1], "Identity", p, f"{p} takes part of an axis", w)
            a.dims[e.outs[0]] = tuple(out)
            for r in _rest:
                fix(r, p, "used as an index", w)
        elif p == "gather":
            a.dims[e.outs[0]] = _gather_dims(a, e, ins, fix)
        elif p == "concatenate":
            dim = e.params["dimension"]
            rank = len(out_shape)
            out = []
            for i in range(rank):
                nodes = [d[i] for d in ins if d[i] is not None]
                if i == dim:
                    fix(nodes, p, "concatenated along this axis (a direct sum of spaces)", w)
                    a.reindexed.extend(nodes)
                    n = cls.node()
                    cls.restrict(n, "Identity", p, "the concatenated axis", w)
                    out.append(n)
                else:
                    for n in nodes[1:]:
                        cls.union(nodes[0], n, 0, p, w)
                    if nodes and not all(neutral(x) for x, d in zip(e.ins, ins) if d[i] is None):
                        cls.restrict(nodes[0], "Permutation", p, "concatenated with a value constant "
                                     "along the axis", w)
                    out.append(nodes[0] if nodes else None)
            a.dims[e.outs[0]] = tuple(out)
        elif p == "stack":
            ax = e.params["axis"]
            rank = len(out_shape)
            only_indexed = all(flat.eqns[u].prim == "__index__" for u in uses.get(e.outs[0], []))
            out = []
            for i in range(rank - 1):
                nodes = [d[i] for d in ins if d[i] is not None]
                if only_indexed:
                    # read back slice by slice (an unrolled scan): the pieces stay separate
                    same = len(nodes) == len(ins) and len({cls.find(n) for n in nodes}) == 1
                    out.append(nodes[0] if same else None)
                    continue
                for n in nodes[1:]:
                    cls.union(nodes[0], n, 0, p, w)
                out.append(nodes[0] if nodes else None)
            n = cls.node()
            cls.restrict(n, "Identity", p, "the stacked axis (a direct sum of values)", w)
            out.insert(ax, n)
            a.dims[e.outs[0]] = tuple(out)
        elif p == "split":
            ax = e.params["axis"]
            (dx,) = ins
            fix([dx[ax]], p, "split into pieces along this axis", w)
            for o in e.outs:
                out = list(dx)
                out[ax] = cls.node()
                cls.restrict(out[ax], "Identity", p, "a piece of a split axis", w)
                a.dims[o] = tuple(out)
        elif p in ("iota",):
            a.dims[e.outs[0]] = fresh_fixed(e.outs[0], p, "an index array", w)
        elif p in ("random_bits", "random_seed", "random_wrap", "random_unwrap", "threefry2x32"):
            for d in ins:
                fix(d, p, "random number generation", w)
            for o in e.outs:
                a.dims[o] = fresh_fixed(o, p, "random numbers", w)
        else:
            reason = {
                "scan": "lax.scan: loop bodies are not analysed (axes through a loop are fixed)",
                "while": "lax.while_loop: loop bodies are not analysed (an ODE solver, a fixed-point loop)",
                "cond": "lax.cond: branches are not analysed",
            }.get(p, f"primitive {p!r} is not understood by gauge inference")
            for d in ins:
                fix(d, p, reason, w)
            for o in e.outs:
                a.dims[o] = fresh_fixed(o, p, reason, w)
    # outputs are fixed
    for k, v in enumerate(outputs):
        if isinstance(v, int):
            fix(a.dims[v], "output", f"axis of output {k} (outputs must be unchanged)", "")
            a.output_vals.append(v)
    return a


def _read_once(a: _Analysis, v: int) -> tuple[int, bool] | None:
    """The 2-D leaf that `v` is (itself, a cast or copy, or its transpose) and whether it is
    transposed, when that leaf and every value on the way are read exactly once: a residual
    step's matrix can carry a [`gaugejax.Link`][] only if nothing else reads the leaf (a leaf
    read twice, or shared by several steps, ties the streams instead), and only the leaf
    itself (not `2A`, `-A` or `A - A^T`) is $U - I$ up to the step size."""
    transposed = False
    while True:
        if len(a.uses.get(v, ())) != 1:
            return None
        if v in a.leaf_vals:
            leaf = a.leaf_vals[v]
            return (leaf, transposed) if len(a.leaf_nodes[leaf]) == 2 else None
        pe = a.producer.get(v)
        if pe is None or len(pe.ins) != 1 or not isinstance(pe.ins[0], int):
            return None
        src = a.producer.get(pe.ins[0])
        if pe.prim == "__index__" and src is not None and src.prim == "stack" and src.params["axis"] == 0:
            # slice i of leaves stacked for a scan is leaf i (read once if only the stack reads it)
            v = src.ins[pe.params["index"]]
            if not isinstance(v, int):
                return None
            continue
        if pe.prim == "transpose" and tuple(pe.params["permutation"]) == (1, 0):
            transposed = not transposed
        elif pe.prim == "convert_element_type" and jnp.issubdtype(a.flat.dtypes[v], jnp.floating):
            pass
        elif pe.prim not in ("copy", "copy_p"):
            return None
        v = pe.ins[0]


def _link_add(a: _Analysis, e: _Eqn, ins: list) -> bool:
    """Recognise a residual step `x + h (A x + rest)` with `A` a square leaf: the stream
    after the step is a new space linked to the one before by $U = I + hA$ (a
    [`gaugejax.Link`][]), instead of being tied to it. Returns whether it handled `e`."""
    cls = a.cls
    for xi in (0, 1):
        x, y = e.ins[xi], e.ins[1 - xi]
        if not (isinstance(x, int) and isinstance(y, int)):
            continue
        if a.flat.shapes[x] != a.flat.shapes[y]:
            continue
        h, z = 1.0, y
        src = a.producer.get(y)
        if src is not None and src.prim == "mul":
            c = [_scalar_const(a, v) for v in src.ins]
            if c[0] is not None and isinstance(src.ins[1], int):
                h, z = float(c[0]), src.ins[1]
            elif c[1] is not None and isinstance(src.ins[0], int):
                h, z = float(c[1]), src.ins[0]
        if not h > 0:
            continue
        # the terms of z's add tree
        terms, stack = [], [z]
        while stack:
            v = stack.pop()
            pe = a.producer.get(v)
            if pe is not None and pe.prim in ("add", "add_any") and all(isinstance(t, int) for t in pe.ins):
                stack.extend(pe.ins)
            else:
                terms.append(v)
        found = []
        for t in terms:
            pe = a.producer.get(t)
            if pe is None or pe.prim != "dot_general" or x not in pe.ins:
                continue
            other = pe.ins[1] if pe.ins[0] == x else pe.ins[0]
            if not isinstance(other, int):
                continue
            hit = _read_once(a, other)
            (lc, rc), (lb, rb) = pe.params["dimension_numbers"]
            if hit is None or lb or rb or len(lc) != 1:
                continue
            leaf, transposed = hit
            shape = a.flat.shapes[other]
            if shape[0] != shape[1]:
                continue
            xc = lc[0] if pe.ins[0] == x else rc[0]
            oc = rc[0] if pe.ins[0] == x else lc[0]
            in_axis = oc if not transposed else 1 - oc
            if in_axis != 1:  # A must read x with its second (input) axis: U = I + hA, (out, in)
                continue
            found.append((leaf, xc))
        if len(found) != 1:
            continue
        leaf, xc = found[0]
        dx, dy = ins[xi], ins[1 - xi]
        if dx[xc] is None or dy[xc] is None:  # a constant stream (x = 0): no space to link
            continue
        out = []
        for i in range(len(dx)):
            if i == xc:
                out.append(dy[i])
                continue
            if dx[i] is not None and dy[i] is not None:
                cls.union(dx[i], dy[i], 0, e.prim, e.where)
            elif (dx[i] is None) != (dy[i] is None):
                n = dx[i] if dx[i] is not None else dy[i]
                cls.restrict(n, "Permutation", e.prim, "combined elementwise with a value that is constant along the axis", e.where)
            out.append(dx[i] if dx[i] is not None else dy[i])
        nodes = a.leaf_nodes[leaf]
        a.links.append((leaf, nodes[0], nodes[1], h, dx[xc], dy[xc]))
        for o in e.outs:
            a.dims[o] = tuple(out)
        return True
    return False


def _reshape_groups(ins: tuple, outs: tuple) -> list[tuple[list[int], list[int]]]:
    """The input and output axes of a reshape in matching groups (a kept axis is a group of
    one on each side; a merge or split groups several); size-1 axes in no group."""
    groups = []
    i = j = 0
    while i < len(ins) or j < len(outs):
        if i < len(ins) and ins[i] == 1 and (j >= len(outs) or outs[j] != 1):
            i += 1
            continue
        if j < len(outs) and outs[j] == 1 and (i >= len(ins) or ins[i] != 1):
            j += 1
            continue
        gi, gj = [i], [j]
        pi, pj = ins[i], outs[j]
        while pi != pj:
            if pi < pj:
                i += 1
                gi.append(i)
                pi *= ins[i]
            else:
                j += 1
                gj.append(j)
                pj *= outs[j]
        groups.append((gi, gj))
        i += 1
        j += 1
    return groups


def _reshape_dims(a: _Analysis, e: _Eqn, dx: tuple) -> tuple:
    flat, cls = a.flat, a.cls
    x = e.ins[0]
    ins = flat.shapes[x] if isinstance(x, int) else x.shape
    outs = flat.shapes[e.outs[0]]
    out: list = [None] * len(outs)
    groups = _reshape_groups(ins, outs)
    # a size-1 axis the reshape drops (one in no group, or beside real axes in a merge or
    # split) leaves the program: its site would act on nothing downstream (a scalar head's
    # output unit reshaped to (batch,) kept a GL(1) that is no symmetry)
    carried = {gi[0] for gi, gj in groups if len(gi) == 1 and len(gj) == 1}
    for k, size in enumerate(ins):
        if size == 1 and k not in carried and dx[k] is not None:
            cls.restrict(dx[k], "Identity", "reshape", "a size-1 axis the reshape drops", e.where)
    for gi, gj in groups:
        if len(gi) == 1 and len(gj) == 1:
            out[gj[0]] = dx[gi[0]]
            continue
        real_in = [k for k in gi if ins[k] != 1]
        real_out = [k for k in gj if outs[k] != 1]
        if len(real_in) == 1 and len(real_out) > 1:  # one axis split into several (heads)
            n = dx[real_in[0]]
            if n is None:
                continue
            kids = cls.pieces(n, tuple(outs[k] for k in real_out), "reshape", e.where)
            if kids is not None:
                for k, kid in zip(real_out, kids):
                    out[k] = kid
                continue
        if len(real_out) == 1 and len(real_in) > 1:  # several axes merged into one
            nodes = [dx[k] for k in real_in]
            if all(n is None for n in nodes):
                continue
            if all(n is not None for n in nodes):
                out[real_out[0]] = cls.merged(nodes, tuple(ins[k] for k in real_in))
                continue
        reason = (f"reshape regroups axes {tuple(ins[k] for k in gi)} -> {tuple(outs[k] for k in gj)} "
                  "(not one axis split into pieces, nor pieces merged): the pieces cannot carry sites")
        for k in gi:
            if dx[k] is not None:
                cls.restrict(dx[k], "Identity", "reshape", reason, e.where)
        for k in gj:
            n = cls.node()
            cls.restrict(n, "Identity", "reshape", reason, e.where)
            out[k] = n
    return tuple(out)


def _gather_dims(a: _Analysis, e: _Eqn, ins: list, fix) -> tuple:
    cls = a.cls
    dn = e.params["dimension_numbers"]
    slice_sizes = e.params["slice_sizes"]
    od, idd = ins
    op_shape = a.flat.shapes[e.ins[0]]
    out_shape = a.flat.shapes[e.outs[0]]
    reason = "a gather with data-dependent indices (e.g. a token-embedding lookup) indexes this axis"
    # an index into a full-size slice can only be 0 (clamped) or out of bounds (filled): the
    # axis is carried whole (a vmapped `x[i]` indexes every axis this way)
    fix([od[i] for i in dn.start_index_map if slice_sizes[i] != op_shape[i]], "gather", reason, e.where)
    fix([od[i] for i in dn.collapsed_slice_dims], "gather", reason, e.where)
    fix(idd, "gather", "the indices of a gather", e.where)
    obatch = tuple(getattr(dn, "operand_batching_dims", ()))
    fix([od[i] for i in obatch], "gather", "a batched gather", e.where)
    kept = [i for i in range(len(op_shape)) if i not in dn.collapsed_slice_dims and i not in obatch]
    out: list = [None] * len(out_shape)
    for pos, i in zip(dn.offset_dims, kept):
        if slice_sizes[i] == op_shape[i]:
            out[pos] = od[i]
        elif od[i] is not None:  # a window of the axis: varies along it, carries no site
            cls.restrict(od[i], "Identity", "gather", "a gather takes part of this axis", e.where)
            out[pos] = cls.node()
            cls.restrict(out[pos], "Identity", "gather", "a window of an axis", e.where)
    for pos in range(len(out_shape)):
        if pos not in dn.offset_dims:
            n = cls.node()
            cls.restrict(n, "Identity", "gather", "a batch axis of a gather (from its indices)", e.where)
            out[pos] = n
    return tuple(out)


# ----------------------------------------------------------------------------------------
# translations (softmax shift invariance)
# ----------------------------------------------------------------------------------------
def _translation_ok(a: _Analysis, leaf_val: int) -> tuple[bool, str]:
    """Whether adding any constant to the leaf at `leaf_val` leaves the outputs unchanged
    because its effect is constant along an axis that a softmax then removes."""
    flat = a.flat
    # delta state: value -> (token, sign, frozenset of constant dims)
    delta: dict[int, tuple[int, int, frozenset]] = {leaf_val: (leaf_val, 1, frozenset())}
    neg_inf = {v for v, c in a.consts.items() if np.isneginf(c).all()}
    started = False

    def d(x):
        return delta.get(x) if isinstance(x, int) else None

    for e in flat.eqns:
        ds = [d(x) for x in e.ins]
        if not any(ds):
            continue
        p = e.prim
        o = e.outs[0] if e.outs else None
        i0 = next(k for k, q in enumerate(ds) if q)
        tok, sign, const = ds[i0]
        x = e.ins[i0]
        if p == "broadcast_in_dim":
            in_shape = flat.shapes[x]
            out_shape = flat.shapes[o]
            bd = e.params["broadcast_dimensions"]
            new = {dd for dd in range(len(out_shape)) if dd not in bd}
            new |= {bd[i] for i in range(len(bd)) if in_shape[i] != out_shape[bd[i]] or i in const}
            delta[o] = (tok, sign, frozenset(new))
        elif p in ("convert_element_type", "stop_gradient", "copy", "reduce_precision"):
            delta[o] = (tok, sign, const)
        elif p == "transpose":
            perm = e.params["permutation"]
            # moving the axes the shift varies along makes another shift field (t^T, not t):
            # it cancels against nothing of the original's
            moved = any(i != k and i not in const for k, i in enumerate(perm))
            delta[o] = (o if moved else tok, sign, frozenset(k for k, i in enumerate(perm) if i in const))
        elif p == "reshape":
            ins_, outs_ = flat.shapes[x], flat.shapes[o]
            new = {k for k, sz in enumerate(outs_) if sz == 1}
            for gi, gj in _reshape_groups(ins_, outs_):
                if all(k in const or ins_[k] == 1 for k in gi):
                    new |= set(gj)
            delta[o] = (tok, sign, frozenset(new))
        elif p in ("add", "sub", "add_any"):
            if all(ds):
                (t0, s0, c0), (t1, s1, c1) = ds
                s1 = -s1 if p == "sub" else s1
                if t0 == t1 and s0 + s1 == 0 and c0 == c1:
                    continue  # the shift cancels: x + t - (max(x) + t), both varying along the same axes
                return False, f"two shifted values are combined by {p}"
            s = -sign if (p == "sub" and i0 == 1) else sign
            xs, os_ = flat.shapes[x], flat.shapes[o]
            bcast = {k for k in range(len(os_)) if len(xs) == len(os_) and xs[k] == 1 and os_[k] != 1}
            delta[o] = (tok, s, frozenset(const | bcast))
            started = True
        elif p in ("mul", "div") and not all(ds):
            if p == "div" and i0 == 1:
                return False, "the shift reaches a denominator"
            other = a.dims.get(e.ins[1 - i0]) if isinstance(e.ins[1 - i0], int) else ()
            keep = const
            if other:
                keep = frozenset(k for k in const if other[k] is None and flat.shapes[e.ins[1 - i0]][k] == flat.shapes[o][k]
                                 or (other[k] is None))
            delta[o] = (o, 1, keep)
        elif p == "dot_general" and not all(ds):
            (lc, rc), (lb, rb) = e.params["dimension_numbers"]
            mine_c, mine_b = (lc, lb) if i0 == 0 else (rc, rb)
            rank_l = len(flat.shapes[e.ins[0]])
            nb = len(lb)
            if i0 == 0:
                free = [i for i in range(rank_l) if i not in lc and i not in lb]
                pos = {i: nb + k for k, i in enumerate(free)}
            else:
                nl = rank_l - len(lc) - len(lb)
                free = [i for i in range(len(flat.shapes[e.ins[1]])) if i not in rc and i not in rb]
                pos = {i: nb + nl + k for k, i in enumerate(free)}
            delta[o] = (o, 1, frozenset(pos[i] for i in free if i in const))
        elif p == "select_n":
            cases = e.ins[1:]
            if ds[0] is not None:
                return False, "the shift reaches a predicate"
            shifted = [c for c, q in zip(cases, ds[1:]) if q]
            rest = [c for c, q in zip(cases, ds[1:]) if not q]
            if len(shifted) != 1 or any(not (isinstance(c, int) and c in neg_inf) for c in rest):
                return False, "the shift reaches a select_n whose other branch is not -inf"
            delta[o] = (tok, sign, const)
        elif p in ("max", "min") and not all(ds):
            c = _scalar_const(a, e.ins[1 - i0])
            if c is None or not np.isinf(c).all():
                return False, f"the shift reaches {p}"
            delta[o] = (tok, sign, const)
        elif p == "reduce_max":
            axes = e.params["axes"]
            if not set(axes) <= const:
                return False, "a max over an axis along which the shift varies"
            keep = [k for k in range(len(flat.shapes[x])) if k not in axes]
            delta[o] = (tok, sign, frozenset(j for j, k in enumerate(keep) if k in const))
        else:
            return False, f"the shift reaches {p}"
    if any(v in delta for v in a.output_vals):
        return False, "the shift reaches the output"
    return started, "" if started else "the leaf is never added"


# ----------------------------------------------------------------------------------------
# building the gauge
# ----------------------------------------------------------------------------------------
def _piece_sizes(cls: _Classes, n: int) -> tuple[int, ...]:
    """The sizes of the innermost pieces of node `n` (as `_Classes.expand` lists them)."""
    r, _ = cls.find(n)
    if r not in cls.split:
        return ()
    out: list[int] = []
    for (k, _), s in zip(cls.split[r][1], cls.split[r][0]):
        inner = _piece_sizes(cls, k)
        out += list(inner) if inner else [s]
    return tuple(out)


def _build(a: _Analysis, params: Any, paths: list[str], leaves: list[Any], float_leaves: list[int],
           translate: bool) -> tuple[dict, list, list[Restriction], list[str]]:
    cls, flat = a.cls, a.flat
    # A Link acts on whole spaces: a leaf linked more than once (a weight-tied network run
    # twice) ties its streams instead (a conjugation by one element, a subgroup), and a
    # linked stream split into pieces downstream (heads) carries no site
    count: dict[int, int] = {}
    for lk in a.links:
        count[lk[0]] = count.get(lk[0], 0) + 1
    kept = []
    for leaf, n_out, n_in, h, nx, ny in a.links:
        if count[leaf] > 1:
            cls.union(nx, ny, 0, "add", "a residual step whose leaf is used in several steps")
            continue
        kept.append((leaf, n_out, n_in, h, nx, ny))
    a.links = kept
    for *_, nx, ny in a.links:
        for n in (nx, ny):
            parts = cls.expand(n)
            if len(parts) > 1:
                for rk, _ in parts:
                    cls.restrict(rk, "Identity", "reshape", "a residual stream linked through a square "
                                 "leaf and split into pieces downstream (a link acts on whole spaces)", "")
    # a space split by a reshape (attention heads) is the product of its pieces: each piece
    # carries what restricts the whole space (a block-structured group inside that meet)
    for r, (_, kids) in list(cls.split.items()):
        if cls.find(r)[0] != r:
            continue
        for rk, _ in cls.expand(r):
            if cls.level[r] != "GL":
                cls.restrict(rk, cls.level[r], "reshape", "a piece of a split axis keeps the whole axis's group", "")
    # roots of leaf axes (of the leaf viewed with split axes split)
    members: dict[int, list[tuple[int, int, int]]] = {}
    link_leaves = {lk[0] for lk in a.links}
    view_nodes: dict[int, list[int]] = {}
    views: dict[int, tuple[int, ...] | None] = {}
    for leaf, nodes in a.leaf_nodes.items():
        shape = tuple(int(s) for s in leaves[leaf].shape)
        vn, vshape = [], []
        for ax, n in enumerate(nodes):
            parts = cls.expand(n) if leaf not in link_leaves else [cls.find(n)]
            if len(parts) > 1:
                sizes = _piece_sizes(cls, n)
                vshape += list(sizes)
            else:
                vshape.append(shape[ax])
            base = len(vn)
            vn += [r for r, _ in parts]
            if leaf in link_leaves:
                continue
            for j, (r, par) in enumerate(parts):
                members.setdefault(r, []).append((leaf, base + j, par))
        view_nodes[leaf] = vn
        views[leaf] = tuple(vshape) if len(vshape) != len(shape) else None

    def roots_of(dims) -> list[tuple[int, int]]:
        return [rp for n in dims if n is not None for rp in cls.expand(n)]

    def roots_set(dims) -> list[int]:
        return [r for r, _ in roots_of(dims)]

    # orientation: parity of the first computed (non-leaf) value carrying the class
    orient: dict[int, int] = {}
    for v in sorted(a.dims):
        if v in a.leaf_vals:
            continue
        for r, par in roots_of(a.dims[v]):
            orient.setdefault(r, par)
    # batching
    present: dict[int, set[int] | None] = {}
    for v, dims in a.dims.items():
        rs = {r for r, _ in roots_of(dims)}
        for r in rs:
            if r not in members:
                continue
            others = rs - {r}
            present[r] = others if present.get(r) is None else present[r] & others
    for dims, reduced in a.reductions:
        red = {r for i in reduced if dims[i] is not None for r, _ in cls.expand(dims[i])}
        alive = {r for i, n in enumerate(dims) if n is not None and i not in reduced for r, _ in cls.expand(n)}
        for r in alive:
            if present.get(r):
                present[r] -= red
    # a space in one slot of every operand, and another space in different slots of two
    # operands (a cross-head Gram, as einsum('bhk,bgk->bhg') or q[:, :, None] * q[:, None]
    # and a sum), pairs different indices of the second: it cannot batch the first
    for ops in a.pairings:
        positions: dict[int, set[tuple[int, Any]]] = {}  # root -> {(operand, slot)}
        for k, d in enumerate(ops):
            for slot, n in d.items():
                for r in ([] if n is None else roots_set([n])):
                    positions.setdefault(r, set()).add((k, slot))
        crossed = {b for b, pos in positions.items()
                   if any(k1 != k2 and s1 != s2 for k1, s1 in pos for k2, s2 in pos)}
        if not crossed:
            continue
        for r, pos in positions.items():
            if present.get(r) and any(all((k, slot) in pos for k in range(len(ops))) for slot in ops[0]):
                present[r] -= crossed
    # an axis taken in part, reversed or concatenated along pairs different indices of the
    # spaces it carries (q + flip(q, heads)): it batches nothing
    reindexed = set(roots_set(a.reindexed))

    def level(r):
        return cls.level[r]

    for r in members:
        if r not in orient and level(r) != "Identity":
            cls.restrict(r, "Identity", "-", "the axis never reaches the computation (only broadcast away)", "")
    site_roots = [r for r in members if level(r) != "Identity"]
    site_roots.sort(key=lambda r: min((leaf, ax) for leaf, ax, _ in members[r]))
    batch_of: dict[int, list[int]] = {}
    for r in site_roots:
        cands = [b for b in (present.get(r) or ()) if b in members and level(b) in ("Permutation", "Identity")
                 and b not in reindexed]
        cands = [b for b in cands if not (r in (present.get(b) or ()) and level(r) == "Permutation")]
        batch_of[r] = cands
    names: dict[int, str] = {}
    for r in site_roots:
        # named after the first leaf axis that writes the space (else the first one)
        ref = orient.get(r, 0)
        producing = [(leaf, ax) for leaf, ax, par in members[r] if par == ref]
        leaf, ax = min(producing or [(leaf, ax) for leaf, ax, _ in members[r]])
        names[r] = f"{paths[leaf]}:{ax}"
    sites: dict[str, AbstractGroup] = {}
    couplings: list[Coupling] = []
    def vshape(leaf):
        return views[leaf] or tuple(int(s) for s in leaves[leaf].shape)

    for r in site_roots:
        batch_roots = batch_of[r]
        leaf0, ax0, _ = members[r][0]
        n = int(vshape(leaf0)[ax0])
        # order batch roots by their axis in the first leaf
        first_nodes = view_nodes[leaf0]
        batch_roots.sort(key=lambda b: first_nodes.index(b) if b in first_nodes else 99)
        bshape = tuple(int(vshape(leaf0)[first_nodes.index(b)]) for b in batch_roots)
        sites[names[r]] = _make_group(level(r), n, bshape)
        ref = orient.get(r, 0)
        for leaf, ax, par in members[r]:
            nodes = view_nodes[leaf]
            baxes = tuple(nodes.index(b) for b in batch_roots)
            kind = Produce if par == ref else Consume
            couplings.append(kind(paths[leaf], ax, names[r], baxes, views[leaf]))
    # links U = I + hA between the stream before (x) and after (y) a residual step
    for leaf, n_out, n_in, h, nx, ny in a.links:
        r_out, r_in = cls.find(ny)[0], cls.find(nx)[0]
        out_site = names.get(r_out) if level(r_out) != "Identity" else None
        in_site = names.get(r_in) if level(r_in) != "Identity" else None
        for r in (r_out, r_in):
            if r in names and sites[names[r]].batch:
                raise InferenceError(f"leaf {paths[leaf]!r}: a residual link between batched sites is not supported.")
        if out_site is not None or in_site is not None:
            couplings.append(Link(paths[leaf], out_site=out_site, in_site=in_site, h=float(h)))
    # restrictions
    restrictions: list[Restriction] = []
    for r, evs in cls.events.items():
        if r not in cls.level:
            continue
        axes = tuple((paths[leaf], ax) for leaf, ax, _ in members.get(r, []))
        if not axes:
            continue
        site = names.get(r)
        seen = set()
        for lvl, prim, reason, where in evs:
            if lvl == "GL" or (lvl, prim, reason) in seen:
                continue
            seen.add((lvl, prim, reason))
            shown = "Monomial (P D, any signs)" if lvl == "Monomial" else lvl
            restrictions.append(Restriction(axes, site, shown, prim, reason, where))
    notes: list[str] = []
    # shared leaves
    uses: dict[int, int] = {}
    for e in flat.eqns:
        for x in e.ins:
            if isinstance(x, int) and x in a.leaf_vals:
                uses[x] = uses.get(x, 0) + 1
    for v, cnt in uses.items():
        if cnt > 1:
            notes.append(f"leaf {paths[a.leaf_vals[v]]!r} is used by {cnt} operations (a shared or tied "
                         "weight): its axes tie together the spaces it is used in")
    for r in site_roots:
        if level(r) == "Monomial":
            notes.append(f"site {names[r]!r} admits all monomial matrices (P D, any signs); gaugejax "
                         "has no such group, so it carries PositiveMonomial")
    # translations
    if translate:
        for v, leaf in sorted(a.leaf_vals.items()):
            if leaf not in float_leaves:
                continue
            users = [e for e in flat.eqns if v in [x for x in e.ins if isinstance(x, int)]]
            if not users:
                continue
            ok, why = _translation_ok(a, v)
            if ok:
                name = f"shift[{paths[leaf]}]"
                sites[name] = Translation(tuple(leaves[leaf].shape))
                couplings.append(Translate(paths[leaf], name))
    return sites, couplings, restrictions, notes


# ----------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------
def _check_tree(tree: Any, what: str) -> None:
    with_path, _ = jtu.tree_flatten_with_path(tree)
    for p, leaf in with_path:
        if not (isinstance(leaf, (jax.Array, np.ndarray, np.generic)) or isinstance(leaf, jax.ShapeDtypeStruct)):
            raise InferenceError(
                f"{what}: the leaf at {_paths.canonical(p) or '<root>'!r} is a {type(leaf).__name__} "
                f"({leaf!r:.60}), not an array. Inference needs a pytree of arrays; split other "
                "values off with equinox.partition(model, equinox.is_array) or close over them in `fn`."
            )


def infer_gauge(
    fn: Callable[..., Any],
    params: Any,
    *example_inputs: Any,
    certify: bool = True,
    key: Any = None,
    num_samples: int = 16,
    scale: float | None = 0.5,
    rtol: float | None = None,
    translations: bool = True,
) -> InferredGauge:
    """Infer the gauge group of `fn(params, *example_inputs)` from its jaxpr, then certify it.

    **Arguments:**

    - `fn`: the model, `fn(params, *inputs) -> outputs` (equinox, flax's `model.apply`,
      haiku's `apply`, or plain `jax.numpy`). `params` must be a pytree of arrays (for an
      equinox module with non-array fields, pass `equinox.partition`'s array part and
      combine inside `fn`).
    - `params`: the parameters.
    - `example_inputs`: example inputs (their values matter only for certification; the
      inference uses their shapes and dtypes).
    - `certify`: run an invariance sweep ([`gaugejax.check_invariance`][]) before returning
      (default). A failing gauge raises [`gaugejax.GaugeCertificationError`][].
    - `key`: PRNG key for the sweep (default `jax.random.key(0)`).
    - `num_samples`, `scale`, `rtol`: passed to the sweep.
    - `translations`: look for translation sites (the key-bias shift, S16).

    **Returns:** an [`gaugejax.InferredGauge`][].
    """
    if not callable(fn):
        raise InferenceError(f"`fn` must be callable as fn(params, *inputs); got {type(fn).__name__}.")
    _check_tree(params, "params")
    for i, x in enumerate(example_inputs):
        _check_tree(x, f"example input {i}")
    with_path, _ = jtu.tree_flatten_with_path(params)
    paths = [_paths.canonical(p) for p, _ in with_path]
    leaves = [leaf for _, leaf in with_path]
    if not leaves:
        raise InferenceError("`params` has no array leaves; there is nothing to transform.")
    try:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(params, *example_inputs)
    except Exception as err:
        shapes = ", ".join(str(jtu.tree_map(lambda x: tuple(np.shape(x)), x)) for x in example_inputs)
        raise InferenceError(
            f"fn(params, *example_inputs) does not trace: {type(err).__name__}: {err}\n"
            f"(example input shapes: {shapes or 'none'}; inference needs fn to run under "
            "jax.make_jaxpr with these shapes)"
        ) from err
    flat = _Flat()
    jaxpr = closed.jaxpr
    env: dict = {}
    for cv, c in zip(jaxpr.constvars, closed.consts):
        env[cv] = flat.const(c)
    n_leaves = len(leaves)
    leaf_vals: dict[int, int] = {}
    input_vals: list[tuple[int, str]] = []
    float_leaves = []
    for k, v in enumerate(jaxpr.invars):
        i = flat.new(v.aval)
        env[v] = i
        if k < n_leaves:
            if jnp.issubdtype(v.aval.dtype, jnp.inexact):
                leaf_vals[i] = k
                float_leaves.append(k)
            else:
                input_vals.append((i, f"integer leaf {paths[k]!r}"))
        else:
            input_vals.append((i, f"input argument {k - n_leaves}"))
    flat.run(jaxpr, env)
    outs = []
    for ov in jaxpr.outvars:
        if type(ov).__name__ == "Literal":
            continue
        outs.append(env[ov])
    a = _analyse(flat, leaf_vals, input_vals, outs)
    # leaves the function never reads: not part of any site
    sites, couplings, restrictions, notes = _build(a, params, paths, leaves, float_leaves, translations)
    try:
        gauge = Gauge(sites, couplings, params)
    except ValueError as err:  # pragma: no cover - an inconsistency is an inference bug
        raise InferenceError(f"the inferred sites and couplings do not form a gauge: {err}") from err
    result = InferredGauge(gauge, tuple(restrictions), tuple(notes), None, fn, params, tuple(example_inputs))
    if certify and any(isinstance(x, jax.ShapeDtypeStruct) for x in jtu.tree_leaves((params, example_inputs))):
        raise InferenceError(
            "certification runs the model, so `params` and `example_inputs` must be arrays, not "
            "jax.ShapeDtypeStruct; pass certify=False to infer from shapes only."
        )
    if certify and any(isinstance(x, jax.core.Tracer) for x in jtu.tree_leaves((params, example_inputs))):
        raise InferenceError(
            "certification runs an invariance sweep and reads its result on the host, so it "
            "cannot run under jax.jit / vmap / grad (the parameters or inputs are tracers); call "
            "infer_gauge outside the transformation, or pass certify=False to infer only."
        )
    if certify:
        dts = sorted({str(x.dtype) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)})
        if len(dts) > 1:
            raise InferenceError(
                f"the parameters mix float dtypes {dts}; certification sweeps one dtype (cast "
                "them first), or pass certify=False to infer only."
            )
        result = _certify(result, key=key, num_samples=num_samples, scale=scale, rtol=rtol)
    return result


@functools.cache  # one class: a new one per call would recompile every certification sweep
def _sweep_gl_class():
    """A GL for certification sweeps whose elements carry their inverse.

    An element is a pair `(M, M^{-1})` with $M = \\prod_{k=1}^{n} (I + u_k v_k^\\top)$, a
    product of $n$ random rank-one updates of size `scale` (generic elements of $GL(n)$
    near the identity), whose inverse is the reversed product of the Sherman-Morrison
    inverses $I - u_k v_k^\\top / (1 + v_k^\\top u_k)$. So neither sampling nor the
    consumed axes need a matrix exponential, an inverse or a LAPACK call (batched LAPACK
    calls can deadlock XLA:CPU on two cores): the sweep compiles much faster. The returned
    gauge still uses [`gaugejax.GL`][]; only the certification samples this way.
    """
    from ._groups.base import AxisFactors, default_float

    class _SweepGL(GL):
        def identity(self, dtype=None):
            eye = jnp.broadcast_to(jnp.eye(self.n, dtype=default_float(dtype)), (*self.batch, self.n, self.n))
            return (eye, eye)

        def sample(self, key, scale, dtype=None):
            s = 0.5 if scale is None else scale
            dt = default_float(dtype)
            ku, kv = jax.random.split(key)
            shape = (self.n, *self.batch, self.n, 1)
            u = jax.random.normal(ku, shape, dt) * (s / self.n) ** 0.5
            v = jax.random.normal(kv, shape, dt) * (s / self.n) ** 0.5
            eye = jnp.broadcast_to(jnp.eye(self.n, dtype=dt), (*self.batch, self.n, self.n))

            def step(carry, uv):
                m, minv = carry
                uk, vk = uv
                r1 = uk * jnp.swapaxes(vk, -1, -2)
                denom = 1.0 + jnp.sum(uk * vk, axis=(-2, -1), keepdims=True)
                m = jnp.matmul(m, eye + r1, precision=jax.lax.Precision.HIGHEST)
                minv = jnp.matmul(eye - r1 / denom, minv, precision=jax.lax.Precision.HIGHEST)
                return (m, minv), None

            (m, minv), _ = jax.lax.scan(step, (eye, eye), (u, v))
            return (m, minv)

        def compose(self, g, h):
            hp = jax.lax.Precision.HIGHEST
            return (jnp.matmul(g[0], h[0], precision=hp), jnp.matmul(h[1], g[1], precision=hp))

        def inverse(self, g):
            return (g[1], g[0])

        def factors(self, g, kind):
            return AxisFactors(matrix=g[0] if kind == "produce" else jnp.swapaxes(g[1], -1, -2))

        def as_matrix(self, g):
            return g[0]

        def check(self, g):
            return []

    return _SweepGL


def _sweep_gauge(gauge: Gauge, params: Any) -> Gauge:
    """The same sites and couplings, with GL sites as the sweep GL above (same group)."""
    sweep_gl = _sweep_gl_class()
    sites = {}
    changed = False
    for name, g in gauge.sites:
        if family(g) == "GL":
            sites[name] = sweep_gl(g.n, g.batch)
            changed = True
        else:
            sites[name] = g
    return Gauge(sites, gauge.couplings, params) if changed else gauge


@eqx.filter_jit
def _per_site_errors(fn, gauge: Gauge, params, inputs, key, num_samples: int, scale) -> jax.Array:
    """The max relative error of each site swept alone (the others at the identity), in one
    program for all sites: the site is a traced index, not a static argument (one
    compilation instead of one per site)."""
    dtype = _params_dtype(params)
    names = list(gauge.site_groups)
    y0 = fn(params, *inputs)
    ident = gauge.identity(dtype)

    def one(args):
        i, k = args
        g = gauge.sample(k, scale=scale, dtype=dtype)
        g = {n: jtu.tree_map(lambda x, e, j=j: jnp.where(i == j, x, e), g[n], ident[n]) for j, n in enumerate(names)}
        return _rel_error(fn(gauge.act(g, params, check=False), *inputs), y0)

    idx = jnp.repeat(jnp.arange(len(names)), num_samples)
    keys = jax.random.split(key, len(names) * num_samples)
    errs = jax.lax.map(one, (idx, keys)).reshape(len(names), num_samples)
    return jnp.max(errs, axis=1)


def _certify(result: InferredGauge, *, key: Any, num_samples: int, scale: float | None,
             rtol: float | None) -> InferredGauge:
    key = jax.random.key(0) if key is None else key
    gauge = result.gauge
    if not gauge.sites:
        report = InvarianceReport(dtype="", num_samples=0, max_rel_error=0.0, median_rel_error=0.0,
                                  eps=0.0, rtol=0.0, passed=True, errors=np.zeros(0))
        return dataclasses.replace(result, report=report)
    sweep = _sweep_gauge(gauge, result.params)
    report = check_invariance(result.fn, sweep, result.params, *result.inputs, key=key,
                              num_samples=num_samples, scale=scale, rtol=rtol, chunk_size=1)
    if report.passed:
        return dataclasses.replace(result, report=report)
    failing, names = [], []
    with jax.default_matmul_precision("highest"):
        errs = np.asarray(_per_site_errors(result.fn, sweep, result.params, result.inputs,
                                           jax.random.fold_in(key, 1), num_samples, scale))
    for name, err in zip(gauge.site_groups, errs):
        if not err <= report.rtol:  # NaN fails too
            names.append(name)
            failing.append(f"{name} ({gauge.site_groups[name]!r}, max rel. error {err:.2e})")
    which = "; ".join(failing) if failing else "no single site fails alone: the failure needs several sites together"
    raise GaugeCertificationError(
        f"the inferred gauge is NOT a symmetry of the model: {report}. Failing sites: {which}. "
        "Edit it (InferredGauge.drop / .replace on the `.inferred` attribute of this error) and "
        "certify again.",
        result, names, report,
    )


# ----------------------------------------------------------------------------------------
# comparison
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GaugeDifference:
    """The result of [`gaugejax.same_gauge`][]: `equal` and the differences in words
    (`only_a`, `only_b`: sites without a counterpart; `mismatches`: matched sites whose
    groups, batch shapes or coupling kinds differ). `bool(diff)` is `equal`."""

    equal: bool
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    mismatches: tuple[str, ...]
    matched: tuple[tuple[str, str], ...]

    def __bool__(self) -> bool:
        return self.equal

    def __str__(self) -> str:
        if self.equal:
            return f"the gauges agree ({len(self.matched)} sites, modulo site names)"
        lines = ["the gauges differ:"]
        lines += [f"  only in the first: {s}" for s in self.only_a]
        lines += [f"  only in the second: {s}" for s in self.only_b]
        lines += [f"  {m}" for m in self.mismatches]
        return "\n".join(lines)


def _signature(gauge: Gauge) -> dict[str, tuple[frozenset, dict]]:
    sig = {}
    for name, group in gauge.sites:
        axes = {}
        for c in gauge.couplings_of(name):
            if isinstance(c, (Produce, Consume)):
                leaf = _paths.normalise(c.leaf)
                nd = len(_shape_of(gauge, leaf))
                axes[(leaf, c.axis % nd, c.view)] = (c.kind, tuple(b % nd for b in c.batch_axes))
            elif isinstance(c, Translate):
                axes[(_paths.normalise(c.leaf), "translate")] = ("translate", ())
            elif isinstance(c, Link):
                key = (_paths.normalise(c.leaf), "link", "out" if c.out_site == name else "in")
                axes[key] = ("link", (c.h,))
        sig[name] = (frozenset(axes), axes)
    return sig


def _shape_of(gauge: Gauge, leaf: str) -> tuple:
    for p in gauge.plans:
        if p.path == leaf:
            return p.view or p.shape
    return ()


def same_gauge(a: Gauge, b: Gauge) -> GaugeDifference:
    """Compare two gauges modulo site names.

    Sites are matched by the set of leaf axes they couple to; matched sites must have the
    same group family (GL-like groups compare by family, so a LAPACK-free GL equals
    [`gaugejax.GL`][]), size and batch shape, and the same coupling kinds (ignored for
    groups with $g^{-T} = g$; for the others, swapping every produce/consume of a site is
    the automorphism $g \\mapsto g^{-T}$ and counts as equal).

    **Returns:** a [`gaugejax.GaugeDifference`][] (truthy when equal; `str()` explains).
    """
    if not isinstance(a, Gauge) or not isinstance(b, Gauge):
        raise TypeError(f"same_gauge compares two gaugejax.Gauge objects; got {type(a).__name__}, {type(b).__name__}.")
    sa, sb = _signature(a), _signature(b)
    ga, gb = a.site_groups, b.site_groups
    by_axes_b = {v[0]: k for k, v in sb.items()}
    only_a, mismatches, matched = [], [], []
    used = set()
    for name, (axes, kinds) in sa.items():
        other = by_axes_b.get(axes)
        if other is None:
            only_a.append(f"{name}: {ga[name]!r} on {sorted(map(str, axes))}")
            continue
        used.add(other)
        matched.append((name, other))
        x, y = ga[name], gb[other]
        fx, fy = family(x), family(y)
        if (fx, x.n, x.batch) != (fy, y.n, y.batch):
            mismatches.append(f"site {name} ~ {other}: group {fx}({x.n}, batch={x.batch}) vs {fy}({y.n}, batch={y.batch})")
            continue
        ka, kb = kinds, sb[other][1]
        if fx not in _SELF_DUAL and fx != "Translation":
            bat = all(ka[k][1] == kb[k][1] for k in ka)
            same = all(ka[k][0] == kb[k][0] for k in ka)
            flip = {"produce": "consume", "consume": "produce"}
            flipped = fx == "GL" and all(flip.get(ka[k][0], ka[k][0]) == kb[k][0] for k in ka)
            if not bat:
                mismatches.append(f"site {name} ~ {other}: batch axes differ")
            elif not (same or flipped):
                diff = [f"{k[0]}:{k[1]} {ka[k][0]} vs {kb[k][0]}" for k in ka if ka[k][0] != kb[k][0]]
                mismatches.append(f"site {name} ~ {other}: coupling kinds differ: {', '.join(diff)}")
        elif any(ka[k][1] != kb[k][1] for k in ka):
            mismatches.append(f"site {name} ~ {other}: batch axes differ")
    only_b = [f"{k}: {gb[k]!r} on {sorted(map(str, v[0]))}" for k, v in sb.items() if k not in used]
    equal = not (only_a or only_b or mismatches)
    return GaugeDifference(equal, tuple(only_a), tuple(only_b), tuple(mismatches), tuple(matched))


# ----------------------------------------------------------------------------------------
# report rows and the CLI
# ----------------------------------------------------------------------------------------
def inference_report_rows(*, seed: int = 0, num_samples: int = 8, certify: bool = True) -> list[dict[str, Any]]:
    """For each built-in model (MLPs of each activation family, Transformers in two
    configurations, ResNets with both boundaries, neural ODEs with constant and adaptive
    steps), whether the inferred gauge agrees with the declared one and whether it
    certifies. Rows: `{"model", "agrees", "certified", "difference", "sites", "seconds"}`;
    with `certify=False` no sweep runs and `"certified"` is `None` (`gaugejax report` does
    this: inference takes milliseconds, certification is compile-bound, and the tests
    certify every one of these gauges).

    Expects float64 to be enabled (as `gaugejax report` does)."""
    import time

    from ._feedforward import derive_gauge
    from .nn import MLP, Transformer
    from .nn._init import linears

    key = jax.random.key(seed)
    rng = np.random.default_rng(seed)

    def normal(shape):  # example inputs from NumPy: no compilation per shape
        return jnp.asarray(rng.normal(size=shape), jnp.zeros(()).dtype)

    rows = []
    cases: list[tuple[str, Callable[[], tuple]]] = []
    for act in (jax.nn.relu, jnp.tanh, jax.nn.gelu, _identity_act()):
        def mlp_case(act=act):
            m = MLP([4, 8, 8, 3], act, key=key)
            p, static = eqx.partition(m, eqx.is_array)
            fn = lambda p, x: eqx.combine(p, static)(x)  # noqa: E731
            return fn, p, (normal((5, 4)),), derive_gauge(m), {}
        cases.append((f"MLP({getattr(act, '__name__', 'act')})", mlp_case))
    for cfg in (dict(norm="rms", norm_gain=False, unembedding="untied"), dict(norm="layer", unembedding="none")):
        def tr_case(cfg=cfg):
            m = Transformer(11, 8, 1, 2, 12, 6, causal=True, key=key, **cfg)
            p, static = eqx.partition(m, eqx.is_array)
            fn = lambda p, t: eqx.combine(p, static)(t)  # noqa: E731
            return fn, p, (jnp.arange(5) % 11,), derive_gauge(m), {}
        cases.append((f"Transformer({cfg['norm']}, {cfg['unembedding']})", tr_case))
    for boundary in ("fixed", "absorb"):
        def resnet_case(boundary=boundary):
            from ._lattice import resnet_gauge
            from .nn import ResNet

            kw, x = {}, normal((6, 3))
            if boundary == "absorb":
                e, r = linears([(2, 3), (3, 1)], key=key)
                kw, x = dict(embedding=e, readout=r), normal((6, 2))
            m = ResNet.random(3, 5, 4, key=key, **kw)
            p, static = eqx.partition(m, eqx.is_array)
            fn = lambda p, x: eqx.combine(p, static)(x)  # noqa: E731
            return fn, p, (x,), resnet_gauge(m, boundary=boundary), {}
        cases.append((f"ResNet(boundary={boundary})", resnet_case))
    for steps in ("constant", "adaptive"):
        def node_case(steps=steps):
            import diffrax

            from ._groups import Permutation
            from ._lattice import node_gauge
            from .nn import NeuralODE, ParametricField

            tol = 1e-8
            ctrl = (diffrax.ConstantStepSize() if steps == "constant"
                    else diffrax.PIDController(rtol=tol, atol=tol))
            e, r = linears([(2, 3), (3, 2)], key=key)
            m = NeuralODE(ParametricField.random(3, 5, num_nodes=3, key=key), 1.0, embedding=e, readout=r,
                          stepsize_controller=ctrl, dt0=0.125 if steps == "constant" else None)
            p, static = eqx.partition(m, eqx.is_inexact_array)
            fn = lambda p, x: eqx.combine(p, static)(x)  # noqa: E731
            # an adaptive solve is invariant only to a fraction of the solver's tolerance (not
            # to rounding), permutations of the state included: the controller's error norm
            # is summed in another order
            declared = node_gauge(m, boundary="absorb", time_dependent=False,
                                  stream_group=None if steps == "constant" else Permutation)
            return fn, p, (normal((4, 2)),), declared, (
                {} if steps == "constant" else {"rtol": 1e2 * tol})
        cases.append((f"NeuralODE({steps} steps)", node_case))
    for name, build in cases:
        t0 = time.perf_counter()
        fn, p, xs, declared, kw = build()
        try:
            inf = infer_gauge(fn, p, *xs, key=key, num_samples=num_samples, certify=certify, **kw)
            diff = same_gauge(inf.gauge, declared)
            rows.append({"model": name, "agrees": bool(diff), "certified": inf.certified if certify else None,
                         "difference": str(diff), "sites": len(inf.gauge.sites),
                         "seconds": time.perf_counter() - t0})
        except Exception as err:  # reported, not hidden
            rows.append({"model": name, "agrees": False, "certified": False,
                         "difference": f"{type(err).__name__}: {err}", "sites": 0,
                         "seconds": time.perf_counter() - t0})
    return rows


def _identity_act():
    from ._activations import identity

    return identity


def load_factory(spec: str) -> Callable[[], Any]:
    """`"package.module:function"` -> the function (a clear error if either is missing).

    The current directory is searched first, as `python -m` does: the `gaugejax` console
    script's `sys.path[0]` is its own bin directory, so `./mymodels.py` would not be found
    otherwise (it is put at the front of `sys.path` when it is not there already)."""
    import os
    import sys

    if ":" not in spec:
        raise InferenceError(f"expected MODULE:FUNCTION (e.g. mypkg.models:make), got {spec!r}.")
    mod_name, fn_name = spec.split(":", 1)
    cwd = os.getcwd()
    if not any(isinstance(d, str) and os.path.abspath(d or ".") == cwd for d in sys.path):
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as err:
        missing = getattr(err, "name", None)
        hint = ""
        if isinstance(err, ModuleNotFoundError) and missing and (
                mod_name == missing or mod_name.startswith(missing + ".")):
            hint = (" (the current directory is searched; is the module's directory, or the "
                    "package's parent, on PYTHONPATH?)")
        raise InferenceError(f"cannot import module {mod_name!r}: {err}{hint}") from err
    except Exception as err:  # the module itself raised while importing
        raise InferenceError(f"importing module {mod_name!r} raised {type(err).__name__}: {err}") from err
    factory = getattr(mod, fn_name, None)
    if factory is None or not callable(factory):
        raise InferenceError(f"module {mod_name!r} has no function {fn_name!r}.")
    return factory


#: `gaugejax infer`'s exit statuses (also in its --help and docs/infer.md).
EXIT_CODES = (
    "exit status: 0 the gauge is certified (or --no-certify was given); 1 certification "
    "failed (the inferred gauge is printed, with the failing sites); 2 bad input: a bad "
    "option, a module or function that cannot be loaded, a FUNCTION that raises or returns "
    "something other than (fn, params, example_inputs), or a model that cannot be traced."
)


def _positive_int(text: str) -> int:
    import argparse

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {n}")
    return n


def _tolerance(text: str) -> float:
    import argparse
    import math

    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}") from None
    if not (math.isfinite(x) and x >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite non-negative number, got {text!r}")
    return x


def main(argv: Sequence[str] | None = None) -> int:
    """`gaugejax infer MODULE:FUNCTION [--no-certify] [--samples N] [--rtol R] [--seed S] [--x64]`.

    `FUNCTION()` must return `(fn, params, example_inputs)` (a tuple or list, or a dict with
    those keys) with `example_inputs` a tuple; the inferred gauge is printed. Exit code 0
    when the gauge certifies (or `--no-certify`), 1 when certification fails, 2 on bad
    input (`EXIT_CODES`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="gaugejax infer", description="Infer and certify the gauge group of a JAX model.",
                                     epilog=EXIT_CODES)
    parser.add_argument("factory", metavar="MODULE:FUNCTION",
                        help="a function returning (fn, params, example_inputs); MODULE is looked up in "
                             "the current directory first, then on sys.path (PYTHONPATH)")
    parser.add_argument("--no-certify", action="store_true", help="skip the invariance sweep")
    parser.add_argument("--samples", type=_positive_int, default=16, help="group elements in the sweep (default 16)")
    parser.add_argument("--rtol", type=_tolerance, default=None,
                        help="the sweep's tolerance on the max relative error (default per dtype: 1e-5 in "
                             "float32, 1e-10 in float64); an adaptive ODE solve needs one tied to the "
                             "solver's tolerance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--x64", action="store_true", help="enable float64 before calling the factory")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    try:
        factory = load_factory(args.factory)
        try:
            made = factory()
        except Exception as err:
            raise InferenceError(f"{args.factory}() raised {type(err).__name__}: {err}") from err
        if isinstance(made, Mapping):
            if not {"fn", "params"} <= set(made):
                raise InferenceError(f"{args.factory}() returned a dict without the keys 'fn' and 'params' "
                                     f"(and optionally 'example_inputs'); its keys: {sorted(map(str, made))}.")
            made = (made["fn"], made["params"], made.get("example_inputs", ()))
        if not (isinstance(made, (tuple, list)) and len(made) == 3):
            raise InferenceError(f"{args.factory}() must return (fn, params, example_inputs); got {type(made).__name__}.")
        fn, params, inputs = made
        inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
        result = infer_gauge(fn, params, *inputs, certify=not args.no_certify,
                             key=jax.random.key(args.seed), num_samples=args.samples, rtol=args.rtol)
    except GaugeCertificationError as err:
        print(err.inferred)
        print(f"\nCERTIFICATION FAILED: {err}")
        return 1
    except InferenceError as err:
        print(f"error: {err}")
        return 2
    print(result)
    return 0
