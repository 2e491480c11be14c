"""optax `GradientTransformation`s for gauge-aware training.

- [`gaugejax.optim.project_horizontal`][]: remove the vertical part of the update.
- [`gaugejax.optim.canonicalize_every`][]: every `k` steps, move the parameters to their
  canonical point ([`gaugejax.canonicalize`][]).
- [`gaugejax.optim.teleport_every`][]: every `k` steps, teleport along the orbit
  ([`gaugejax.teleport`][]).

The two moving transforms wrap an inner optimizer and *transport its state* through the
move $\\theta \\mapsto g\\cdot\\theta$ ([`gaugejax.optim.transport_state`][]), instead of
re-creating it (which loses the momentum): gradient statistics are covectors, so a first
moment $m$ maps to $J_{g^{-1}}^\\top m$ (the VJP of the inverse action) and a second moment
$\\nu$ to $(J_{g^{-1}}^\\top\\sqrt\\nu)^2$. Both are exact for permutations, signs and
diagonal scales (then $J$ is a scaled permutation); for dense sites ($GL$, $O(n)$) the
first moment is still exact and the second moment is this elementwise approximation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax
from jaxtyping import Array, PyTree

from .. import _checks
from .._canonical import canonicalize
from .._gauge import _FILTERED, Gauge, _is_none
from .._horizontal import _check_method, _check_tangent, _require_continuous, horizontal
from .._teleport import _check_lr, grad_norm_squared, teleport


STATE_RULES: dict[tuple[str, str], str] = {
    ("TraceState", "trace"): "covector",
    ("ScaleByAdamState", "mu"): "covector",
    ("ScaleByAdamState", "nu"): "second",  # optax.adamax's nu is |g|-like: see transport_state
    ("ScaleByAmsgradState", "mu"): "covector",
    ("ScaleByAmsgradState", "nu"): "second",
    ("ScaleByAmsgradState", "nu_max"): "second",
    ("ScaleByBeliefState", "mu"): "covector",
    ("ScaleByBeliefState", "nu"): "second",
    ("ScaleByLionState", "mu"): "covector",
    ("ScaleByRmsState", "nu"): "second",
    ("ScaleByRmsWithCountState", "nu"): "second",
    ("ScaleByRStdDevState", "mu"): "covector",
    ("ScaleByRStdDevState", "nu"): "second",
    ("ScaleByRStdDevWithCountState", "mu"): "covector",
    ("ScaleByRStdDevWithCountState", "nu"): "second",
    ("ScaleByRssState", "sum_of_squares"): "second",
    ("ScaleByAdaDeltaState", "e_g"): "second",
    ("ScaleByAdaDeltaState", "e_x"): "vector_second",
    ("ScaleByAdanState", "m"): "covector",
    ("ScaleByAdanState", "v"): "covector",
    ("ScaleByAdanState", "n"): "second",
    ("ScaleByAdanState", "g"): "covector",
    ("ScaleByRpropState", "step_sizes"): "vector_abs",
    ("ScaleByRpropState", "prev_updates"): "vector",  # step_size * sign(g): a displacement
    ("MultiStepsState", "acc_grads"): "covector",
    ("ScheduleFreeState", "z"): "point",
}
"""How each parameter-shaped field of optax's states transforms under a gauge move, by
`(state type name, field)`: `"covector"` (a gradient statistic, $m \\mapsto J^\\top m$),
`"second"` (a squared one, $\\nu \\mapsto (J^\\top\\sqrt\\nu)^2$), `"abs"` (an absolute
one, $|J^\\top m|$), `"vector"` / `"vector_second"` / `"vector_abs"` (the same for a
displacement of the parameters, pushed forward by the action's $J$ instead), `"point"`
(a copy of the parameters, moved by the action itself), `"keep"` (left as it is: an
explicit choice for a statistic no rule transports, e.g. `optax.adafactor`'s factored
`v_row` / `v_col`, which then no longer match the moved parameters). Extend it per call
with `rules=` (`state_rules=` of the moving transforms)."""
_RULE_NAMES = ("covector", "second", "abs", "vector", "vector_second", "vector_abs", "point", "keep")


def _float_indices(leaves: list[Any]) -> list[int]:
    return [i for i, x in enumerate(leaves) if eqx.is_inexact_array(x)]


def _with_floats(leaves: list[Any], idx: list[int], floats: list[Any]) -> list[Any]:
    """`leaves` with the float leaves at `idx` replaced by `floats`."""
    out = list(leaves)
    for i, x in zip(idx, floats):
        out[i] = x
    return out


def _linear_maps(gauge: Gauge, g: dict, params: PyTree):
    """`(pull, push)`: m -> J_{g^{-1}}^T m, the pull-back of a gradient through the move,
    and v -> J_g v, the push-forward of a displacement, for trees with the structure of
    `params` (`None` allowed on any leaf: a gradient or statistic of an equinox model).
    `params` is completed (`Gauge._complete`). Each statistic is taken in the leaf's dtype
    and returned in its own."""
    inv = gauge.inverse(g)
    leaves, treedef = jtu.tree_flatten(params)
    idx = _float_indices(leaves)

    def action(h):
        def act(floats):
            full = jtu.tree_unflatten(treedef, _with_floats(leaves, idx, floats))
            out = jtu.tree_leaves(gauge.act(h, full, check=False))
            return [out[i] for i in idx]

        return act

    _, vjp = jax.vjp(action(inv), [leaves[i] for i in idx])

    def apply(linear, m):
        ml, rebuild = gauge._with_none(m)
        (ct,) = linear([jnp.zeros_like(leaves[i]) if ml[i] is None else ml[i].astype(leaves[i].dtype)
                        for i in idx])
        out = list(ml)
        for i, c in zip(idx, ct):
            out[i] = None if ml[i] is None else c.astype(ml[i].dtype)
        return rebuild(out)

    def push_linear(floats):  # the action's tangent map (an affine action's linear part)
        return (jax.jvp(action(g), ([leaves[i] for i in idx],), (floats,))[1],)

    return (lambda m: apply(vjp, m)), (lambda v: apply(push_linear, v))


def transport_state(gauge: Gauge, g: dict[str, Any], state: Any, params: PyTree, *,
                    rules: dict[tuple[str, str], str] | None = None) -> Any:
    """Carry an optax state through the gauge move $\\theta \\mapsto g\\cdot\\theta$.

    Each field of `state` with the structure of `params` is transported by the rule
    `STATE_RULES` gives its `(state type name, field)`: a first moment (Adam's `mu`, the
    `trace` of momentum) as a covector, $m \\mapsto J^\\top m$, with $J^\\top$ the VJP of
    $\\theta \\mapsto g^{-1}\\cdot\\theta$; a second moment (`nu`) by
    $\\nu \\mapsto (J^\\top\\sqrt\\nu)^2$; displacements (AdaDelta's `e_x`, Rprop's step
    sizes) pushed forward by the action's own $J$; a copy of the parameters (schedule-free's
    `z`) moved by the action. Exact for permutations, signs and diagonal scales; see the
    module notes for dense sites. Anything else (step counts) is left alone. A
    parameter-shaped field no rule covers raises a `ValueError` naming it: a statistic
    moved by the wrong rule is a silently wrong optimizer.

    `optax.adamax` keeps an infinity norm $\\max|g|$ in an Adam state's `nu`; it needs
    `rules={("ScaleByAdamState", "nu"): "abs"}` (the default `"second"` is exact for it only
    under permutations and signs).

    **Arguments:**

    - `gauge`: the gauge.
    - `g`: the group element of the move.
    - `state`: an optax state (any nesting of NamedTuples, tuples, lists and dicts).
    - `params`: the parameters (for their structure; the maps of a linear action do not
      depend on the point): the model, or its `equinox.filter`-ed float/array part (the
      statistics have that part's structure, `None` elsewhere).
    - `rules`: `{(state type name, field): rule}` added to `STATE_RULES` (rules: see there;
      a dict's key counts as its field, with type name `"dict"`).

    **Returns:** the transported state.
    """
    table = dict(STATE_RULES)
    for key, rule in (rules or {}).items():
        if rule not in _RULE_NAMES:
            raise ValueError(f"transport_state: rule {rule!r} for {key!r} is not one of {_RULE_NAMES}.")
        table[key] = rule
    params = gauge._complete(params, "`params`")
    pull, push = _linear_maps(gauge, g, params)
    leaves = jtu.tree_leaves(params)

    def second(linear, v):
        root = jtu.tree_map(lambda x: jnp.sqrt(jnp.maximum(x, 0)), v)
        return jtu.tree_map(lambda x: x**2, linear(root))

    def point(z):
        zl, rebuild = gauge._with_none(z)
        full = jtu.tree_unflatten(gauge.treedef, [p if x is None else x for x, p in zip(zl, leaves)])
        moved = jtu.tree_leaves(gauge.act(g, full, check=False))
        return rebuild([None if x is None else m for x, m in zip(zl, moved)])

    apply = {
        "covector": pull, "second": lambda v: second(pull, v), "abs": lambda v: jtu.tree_map(jnp.abs, pull(v)),
        "vector": push, "vector_second": lambda v: second(push, v),
        "vector_abs": lambda v: jtu.tree_map(jnp.abs, push(v)), "point": point, "keep": lambda v: v,
    }
    # with a single-leaf parameter tree every array of the state has its structure: only
    # the shapes can tell a statistic there
    containers = gauge.treedef.num_leaves > 1

    def kind(node) -> str | None:
        """"statistic" (the parameters' structure and shapes), "factored" (their structure,
        other shapes on some float leaf), or None."""
        split = gauge._with_none(node)
        if split is None:
            return None
        if _same_shapes(split[0], leaves):
            return "statistic"
        return "factored" if containers and _other_shapes(split[0], leaves) else None

    def field(owner: str, name: Any, node):
        what = None if node is None else kind(node)
        if what is not None:
            rule = table.get((owner, name))
            if rule is None:
                shapes = ("has the structure of the parameters, with their shapes" if what == "statistic" else
                          "has the structure of the parameters but other shapes (a factored statistic?)")
                raise ValueError(
                    f"transport_state: {owner}.{name} {shapes}, and how it transforms under a gauge "
                    f"move is not known. Say it with rules={{({owner!r}, {name!r}): rule}}, rule one of "
                    f"{_RULE_NAMES} (\"keep\" leaves it as it is: no longer matched to the moved "
                    "parameters)."
                )
            return apply[rule](node) if what == "statistic" or rule == "keep" else _refuse(owner, name, rule)
        return walk(node)

    def walk(node):
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(field(type(node).__name__, f, getattr(node, f)) for f in node._fields))
        if isinstance(node, (tuple, list)):
            return type(node)(field(type(node).__name__, None, x) for x in node)
        if isinstance(node, dict):
            return {k: field("dict", k, v) for k, v in node.items()}
        return node

    return field("state", None, state)


def _same_shapes(stat_leaves: list[Any], leaves: list[Any]) -> bool:
    """A statistic's leaves (aligned with the parameters') have the shapes of the
    parameters' float leaves (`None` on float leaves an optimizer leaves out, e.g.
    `optax.masked`; anything on the parameters' other leaves, e.g. integer arrays, which
    no move changes), and there is at least one on a float leaf."""
    on_floats = [(x, y) for x, y in zip(stat_leaves, leaves) if eqx.is_inexact_array(y)]
    return any(x is not None for x, _ in on_floats) and all(
        x is None or getattr(x, "shape", None) == y.shape for x, y in on_floats
    )


def _other_shapes(stat_leaves: list[Any], leaves: list[Any]) -> bool:
    """Some array of a statistic sits on a float leaf of another shape."""
    return any(hasattr(x, "shape") and eqx.is_inexact_array(y) and x.shape != y.shape
               for x, y in zip(stat_leaves, leaves))


def _refuse(owner: str, name: Any, rule: str):
    raise ValueError(
        f"transport_state: rule {rule!r} for {owner}.{name} needs the parameters' shapes, and it "
        "has other shapes (a factored statistic); only \"keep\" applies to it."
    )


def _need_params(params, name):
    if params is None:
        raise ValueError(f"{name}: `update` needs `params` (call tx.update(updates, state, params)).")


def project_horizontal(gauge: Gauge, *, method: str = "auto") -> optax.GradientTransformation:
    """Project each update onto the horizontal space at the current parameters
    ([`gaugejax.horizontal`][]): the update no longer moves along the orbit.

    Compose it after the optimizer, e.g. `optax.chain(optax.adam(1e-3),
    gaugejax.optim.project_horizontal(gauge))`: Adam's per-coordinate scaling makes its
    step vertical in part even on an invariant loss, and that part only drifts the
    parameters along the orbit (and the Noether charges with them).

    **Arguments:**

    - `gauge`: a [`gaugejax.Gauge`][] with a continuous site.
    - `method`: see [`gaugejax.vertical_coordinates`][].

    The projection is computed in the parameters' precision and returned in each update's
    own dtype (bfloat16 updates of float32 parameters stay bfloat16).
    """
    _require_continuous(gauge, "project_horizontal")
    _check_method(method)

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        _need_params(params, "project_horizontal")
        _check_tangent(gauge, gauge._complete(params, "`params`"), updates, "updates")
        out = horizontal(gauge, params, updates, method=method)
        # as optax's transforms do, keep the updates' dtypes (`horizontal` answers in the
        # parameters' dtype)
        return jtu.tree_map(lambda h, u: h if h is None or u is None else h.astype(jnp.result_type(u)),
                            out, updates, is_leaf=_is_none), state

    return optax.GradientTransformation(init, update)


class GaugeMoveState(NamedTuple):
    """State of [`gaugejax.optim.canonicalize_every`][] and
    [`gaugejax.optim.teleport_every`][]: the step count and the inner optimizer's state."""

    count: Array
    inner: Any


def _identity_inner() -> optax.GradientTransformation:
    return optax.identity()


def _moving(k: int, gauge: Gauge, inner, move: Callable, name: str,
            state_rules: dict[tuple[str, str], str] | None = None) -> optax.GradientTransformationExtraArgs:
    k = _checks.integer(k, "every_k", where=name)
    # (the identity too: `update` passes it the extra arguments, e.g. teleport's batch=)
    inner = optax.with_extra_args_support(_identity_inner() if inner is None else inner)

    def init(params):
        return GaugeMoveState(jnp.zeros((), jnp.int32), inner.init(params))

    def update(updates, state, params=None, **extra):
        _need_params(params, name)
        # an equinox model comes whole or `equinox.filter`-ed, its updates with `None` on
        # the leaves that are not float arrays (an activation function, a filtered-out leaf)
        full = gauge._complete(params, f"{name}: `params`")
        u, inner_state = inner.update(updates, state.inner, params, **extra)
        split = gauge._with_none(u)
        if split is None:
            raise ValueError(
                f"{name}: the updates do not have the structure of the parameters.\n"
                f"expected: {gauge.none_treedef}\nreceived: {jtu.tree_structure(u, is_leaf=_is_none)}"
            )
        ul, rebuild = split
        count = state.count + 1
        leaves = jtu.tree_leaves(full)
        idx = _float_indices(leaves)
        touched = [plan.index for plan in gauge.plans if plan.index in idx]
        for plan in gauge.plans:
            i = plan.index
            if i in idx and ul[i] is None:  # a frozen leaf: the move would change the function
                raise ValueError(f"{name}: the update of leaf {plan.path!r} is None, but the gauge moves "
                                 "that leaf; every leaf the gauge acts on needs an update.")
            if i in idx and jnp.result_type(ul[i]) != jnp.result_type(leaves[i]):
                raise ValueError(
                    f"{name}: the update of leaf {plan.path!r} is {jnp.result_type(ul[i])} but the "
                    f"parameter is {jnp.result_type(leaves[i])}; the move's update needs the "
                    "parameters' precision (cast the updates to their dtype)."
                )
        new = [leaves[i] if ul[i] is None else leaves[i] + ul[i] for i in idx]

        def do(args):
            new, inner_state = args
            moved_in = jtu.tree_unflatten(gauge.treedef, _with_floats(leaves, idx, new))
            moved, g = move(moved_in, extra)
            inner_state = transport_state(gauge, g, inner_state, moved_in, rules=state_rules)
            ml = jtu.tree_leaves(moved)
            out = list(ul)
            for i in touched:  # the others are not moved: their updates pass as they are
                if ul[i] is not None:
                    out[i] = ml[i] - leaves[i]
            return rebuild(out), inner_state

        def skip(args):
            return u, args[1]

        u, inner_state = jax.lax.cond(count % k == 0, do, skip, (new, inner_state))
        return u, GaugeMoveState(count, inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def canonicalize_every(
    every_k: int, gauge: Gauge, inner: optax.GradientTransformation | None = None, *,
    state_rules: dict[tuple[str, str], str] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Every `every_k` steps, after the inner update, move the parameters to their canonical
    point ([`gaugejax.canonicalize`][]: balanced, sorted, sign-fixed) and transport the inner
    optimizer's state with them ([`gaugejax.optim.transport_state`][]).

    `params` may be the model whole or its `equinox.filter`-ed arrays (as optax usually
    sees an equinox model); the update has `None` where the gradients do.

    The emitted update is `canonical(params + u) - params`, so the transform must see the
    final update: use it outermost (wrap the optimizer rather than chaining after it), e.g.
    `canonicalize_every(100, gauge, optax.adam(1e-3))`. ENorm (Stock et al., 2019) balances
    under plain SGD only; here any optax optimizer keeps its state.

    **Arguments:**

    - `every_k`: the period.
    - `gauge`: the gauge.
    - `inner`: the optimizer whose state is transported (`None`: the identity).
    - `state_rules`: passed to [`gaugejax.optim.transport_state`][] as `rules` (for an
      optimizer state field the built-in table does not know).
    """
    return _moving(every_k, gauge, inner, lambda p, extra: canonicalize(gauge, p), "canonicalize_every",
                   state_rules)


def teleport_every(
    every_k: int,
    gauge: Gauge,
    loss_fn: Callable[..., Array] | None = None,
    inner: optax.GradientTransformation | None = None,
    *,
    objective: Callable[..., Array] | None = None,
    steps: int = 10,
    lr: float = 0.1,
    state_rules: dict[tuple[str, str], str] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Every `every_k` steps, after the inner update, teleport the parameters along the
    orbit ([`gaugejax.teleport`][]) and transport the inner optimizer's state.

    Zhao et al. re-create the optimizer after each teleport (losing its momentum); here it
    is carried over, exactly for rescaling, permutation and sign gauges.

    **Arguments:**

    - `every_k`: the period.
    - `gauge`: a [`gaugejax.Gauge`][] with a continuous site.
    - `loss_fn`: `loss_fn(params, batch)`, the batch passed to `update` as the keyword
      argument `batch=` (through `optax.chain` as an extra argument); the default objective
      is $\\|\\nabla L\\|^2$ on that batch. It is called on parameters like the ones given
      to `update`: the model whole, or its `equinox.filter`-ed arrays (`None` where they
      are filtered out; recombine them in the loss with `equinox.combine`).
    - `inner`: the optimizer (`None`: the identity).
    - `objective`: `objective(params, batch) -> scalar` to maximise instead.
    - `steps`, `lr`: ascent steps per teleport and their length.
    - `state_rules`: as for [`gaugejax.optim.canonicalize_every`][].
    """
    _require_continuous(gauge, "teleport_every")
    if loss_fn is None and objective is None:
        raise ValueError("teleport_every needs `loss_fn` or `objective`.")
    _checks.integer(steps, "steps", 0, where="teleport_every")
    _check_lr(lr)

    def move(p, extra):
        batch = extra.get("batch")

        def as_given(q):  # filtered parameters reach the user's function filtered (None)
            return jtu.tree_map(lambda x: None if x is _FILTERED else x, q)

        if objective is not None:
            obj = lambda q: objective(as_given(q), batch)  # noqa: E731
        else:
            obj = grad_norm_squared(lambda q: loss_fn(as_given(q), batch))
        return teleport(gauge, p, objective=obj, steps=steps, lr=lr)

    return _moving(every_k, gauge, inner, move, "teleport_every", state_rules)

