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

from .._canonical import canonicalize
from .._gauge import Gauge, _is_none
from .._horizontal import _require_continuous, horizontal
from .._teleport import grad_norm_squared, teleport


#: optax state fields that hold second moments (squared gradients)
SECOND_MOMENT_FIELDS = ("nu", "v", "sum_of_squares", "grad_sq", "nu_hat")


def _float_indices(leaves: list[Any]) -> list[int]:
    return [i for i, x in enumerate(leaves) if eqx.is_inexact_array(x)]


def _with_floats(leaves: list[Any], idx: list[int], floats: list[Any]) -> list[Any]:
    """`leaves` with the float leaves at `idx` replaced by `floats`."""
    out = list(leaves)
    for i, x in zip(idx, floats):
        out[i] = x
    return out


def _covector(gauge: Gauge, g: dict, params: PyTree):
    """m -> J_{g^{-1}}^T m, the pull-back of a gradient through the move, for `m` with the
    structure of `params` (`None` allowed on leaves that are not float arrays). `params`
    is completed (`Gauge._complete`)."""
    inv = gauge.inverse(g)
    leaves, treedef = jtu.tree_flatten(params)
    idx = _float_indices(leaves)

    def act(floats):
        full = jtu.tree_unflatten(treedef, _with_floats(leaves, idx, floats))
        out = jtu.tree_leaves(gauge.act(inv, full, check=False))
        return [out[i] for i in idx]

    _, vjp = jax.vjp(act, [leaves[i] for i in idx])

    def pull(m):
        ml, mt = jtu.tree_flatten(m, is_leaf=_is_none)
        (ct,) = vjp([jnp.zeros_like(leaves[i]) if ml[i] is None else ml[i] for i in idx])
        out = list(ml)
        for i, c in zip(idx, ct):
            out[i] = None if ml[i] is None else c
        return jtu.tree_unflatten(mt, out)

    return pull


def transport_state(gauge: Gauge, g: dict[str, Any], state: Any, params: PyTree) -> Any:
    """Carry an optax state through the gauge move $\\theta \\mapsto g\\cdot\\theta$.

    Every sub-tree of `state` with the structure of `params` is treated as a gradient
    statistic: fields named as in `SECOND_MOMENT_FIELDS` (`nu` of Adam, ...) as second
    moments, $\\nu \\mapsto (J^\\top\\sqrt\\nu)^2$, all others (Adam's `mu`, the `trace` of
    momentum) as first moments, $m \\mapsto J^\\top m$, with $J^\\top$ the VJP of
    $\\theta \\mapsto g^{-1}\\cdot\\theta$. Exact for permutations, signs and diagonal scales;
    see the module notes for dense sites. Anything else (step counts) is left alone.

    **Arguments:**

    - `gauge`: the gauge.
    - `g`: the group element of the move.
    - `state`: an optax state (any nesting of NamedTuples, tuples, lists and dicts).
    - `params`: the parameters (for their structure; the VJP of a linear action does not
      depend on the point): the model, or its `equinox.filter`-ed float/array part (the
      statistics have that part's structure, `None` elsewhere).

    **Returns:** the transported state.
    """
    params = gauge._complete(params, "`params`")
    pull = _covector(gauge, g, params)

    def second(v):
        root = jtu.tree_map(lambda x: jnp.sqrt(jnp.maximum(x, 0)), v)
        return jtu.tree_map(lambda x: x**2, pull(root))

    def walk(node, name=None):
        if node is None:
            return None
        if jtu.tree_structure(node, is_leaf=_is_none) == gauge.treedef and _same_shapes(node, params):
            return second(node) if name in SECOND_MOMENT_FIELDS else pull(node)
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(walk(getattr(node, f), f) for f in node._fields))
        if isinstance(node, (tuple, list)):
            return type(node)(walk(x, name) for x in node)
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        return node

    return walk(state)


def _same_shapes(node, params) -> bool:
    """`node`'s arrays have the shapes of `params`' float leaves (`None` elsewhere)."""
    return all(
        (x is None) if not eqx.is_inexact_array(y) else getattr(x, "shape", None) == y.shape
        for x, y in zip(jtu.tree_leaves(node, is_leaf=_is_none), jtu.tree_leaves(params))
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
    """
    _require_continuous(gauge, "project_horizontal")

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        _need_params(params, "project_horizontal")
        return horizontal(gauge, params, updates, method=method), state

    return optax.GradientTransformation(init, update)


class GaugeMoveState(NamedTuple):
    """State of [`gaugejax.optim.canonicalize_every`][] and
    [`gaugejax.optim.teleport_every`][]: the step count and the inner optimizer's state."""

    count: Array
    inner: Any


def _identity_inner() -> optax.GradientTransformation:
    return optax.identity()


def _moving(k: int, gauge: Gauge, inner, move: Callable, name: str) -> optax.GradientTransformationExtraArgs:
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"{name}: `every_k` must be a positive int, got {k!r}.")
    inner = _identity_inner() if inner is None else optax.with_extra_args_support(inner)

    def init(params):
        return GaugeMoveState(jnp.zeros((), jnp.int32), inner.init(params))

    def update(updates, state, params=None, **extra):
        _need_params(params, name)
        # an equinox model comes whole or `equinox.filter`-ed, its updates with `None` on
        # the leaves that are not float arrays (an activation function, a filtered-out leaf)
        full = gauge._complete(params, f"{name}: `params`")
        u, inner_state = inner.update(updates, state.inner, params, **extra)
        ul, ut = jtu.tree_flatten(u, is_leaf=_is_none)
        if ut != gauge.treedef:
            raise ValueError(
                f"{name}: the updates do not have the structure of the parameters.\n"
                f"expected: {gauge.treedef}\nreceived: {ut}"
            )
        count = state.count + 1
        leaves = jtu.tree_leaves(full)
        idx = _float_indices(leaves)
        new = [leaves[i] if ul[i] is None else leaves[i] + ul[i] for i in idx]

        def do(args):
            new, inner_state = args
            moved_in = jtu.tree_unflatten(gauge.treedef, _with_floats(leaves, idx, new))
            moved, g = move(moved_in, extra)
            inner_state = transport_state(gauge, g, inner_state, moved_in)
            ml = jtu.tree_leaves(moved)
            out = list(ul)
            for i in idx:
                if ul[i] is not None:
                    out[i] = ml[i] - leaves[i]
            return jtu.tree_unflatten(ut, out), inner_state

        def skip(args):
            return u, args[1]

        u, inner_state = jax.lax.cond(count % k == 0, do, skip, (new, inner_state))
        return u, GaugeMoveState(count, inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def canonicalize_every(
    every_k: int, gauge: Gauge, inner: optax.GradientTransformation | None = None
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
    """
    return _moving(every_k, gauge, inner, lambda p, extra: canonicalize(gauge, p), "canonicalize_every")


def teleport_every(
    every_k: int,
    gauge: Gauge,
    loss_fn: Callable[..., Array] | None = None,
    inner: optax.GradientTransformation | None = None,
    *,
    objective: Callable[..., Array] | None = None,
    steps: int = 10,
    lr: float = 0.1,
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
      is $\\|\\nabla L\\|^2$ on that batch. It is called on the parameters given to
      `update`: for an equinox model that the loss calls, pass the model whole, not its
      `equinox.filter`-ed arrays (whose filtered-out leaves arrive as placeholders).
    - `inner`: the optimizer (`None`: the identity).
    - `objective`: `objective(params, batch) -> scalar` to maximise instead.
    - `steps`, `lr`: ascent steps per teleport and their length.
    """
    _require_continuous(gauge, "teleport_every")
    if loss_fn is None and objective is None:
        raise ValueError("teleport_every needs `loss_fn` or `objective`.")

    def move(p, extra):
        batch = extra.get("batch")
        if objective is not None:
            obj = lambda q: objective(q, batch)  # noqa: E731
        else:
            obj = grad_norm_squared(lambda q: loss_fn(q, batch))
        return teleport(gauge, p, objective=obj, steps=steps, lr=lr)

    return _moving(every_k, gauge, inner, move, "teleport_every")

