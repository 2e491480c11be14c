"""Feedforward gauges: $W_l \\mapsto g_l W_l g_{l-1}^{-1}$, $b_l \\mapsto g_l b_l$, $g_0 = g_L = I$.

The sites are the hidden layers $h_1 .. h_{L-1}$; each carries the largest group its
activation admits (see [`gaugejax.register_activation`][]). This module only writes the
sites-and-couplings table; [`gaugejax.Gauge`][] does the rest.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax.tree_util as jtu

from . import _activations, _paths
from ._coupling import Consume, Produce
from ._gauge import Gauge
from ._groups import AbstractGroup
from .nn import MLP


GroupSpec = type[AbstractGroup] | Callable[[int], AbstractGroup] | None


def _make_group(spec: Any, n: int) -> AbstractGroup:
    if isinstance(spec, AbstractGroup):
        raise TypeError(
            f"`group` is a group class or a function width -> group (one group per hidden "
            f"layer, of that layer's width), e.g. gaugejax.{type(spec).__name__}; got the group "
            f"instance {spec!r}."
        )
    if not callable(spec):
        raise TypeError(f"`group` must be a group class or a function width -> group, got {spec!r}.")
    group = spec(n)
    if not isinstance(group, AbstractGroup):
        raise TypeError(f"`group` must build a gaugejax group from a width, got {group!r}.")
    return group


def _detect_layers(params: Any) -> tuple[list[str], list[str | None], str]:
    """Weight and bias paths of a list of `(W, b)` pairs, a list of dicts, a flax-style
    `{"params": {"Dense_0": {"kernel", "bias"}, ...}}` tree or a haiku-style
    `{"mlp/~/linear_0": {"w", "b"}, ...}` one."""
    if isinstance(params, (list, tuple)) and params and all(isinstance(p, (list, tuple)) for p in params):
        ws = [f"[{i}][0]" for i in range(len(params))]
        bs = [f"[{i}][1]" if len(p) > 1 else None for i, p in enumerate(params)]
        return ws, bs, "out_in"
    if isinstance(params, (list, tuple)) and params and all(isinstance(p, dict) for p in params):
        ws, bs = [], []
        for i, p in enumerate(params):
            wk = next((k for k in ("weight", "W", "w", "kernel") if k in p), None)
            if wk is None:
                raise ValueError(f"layer {i}: no weight key among {list(p)} (expected 'weight', 'W', 'w' or 'kernel').")
            ws.append(f"[{i}][{wk!r}]")
            bk = next((k for k in ("bias", "b") if k in p), None)
            bs.append(f"[{i}][{bk!r}]" if bk else None)
        layout = "in_out" if "kernel" in params[0] else "out_in"
        return ws, bs, layout
    if isinstance(params, dict):
        tree = params.get("params", params)
        prefix = "['params']" if "params" in params else ""
        dense = [k for k in tree if isinstance(tree[k], dict) and "kernel" in tree[k]]

        def ordered(names: list[str]) -> list[str]:
            # first layer first, by the index that ends each name (Dense_0, linear_1, ...);
            # a name without one ("output") or a repeated index leaves the order unknown
            found = [re.search(r"(\d+)$", n) for n in names]
            idx = [int(m.group(1)) if m else None for m in found]
            if len(names) > 1 and (None in idx or len(set(idx)) < len(idx)):
                raise ValueError(
                    f"cannot tell the order of the layers {names}: not every name ends in a distinct "
                    "layer index; pass `weights=` and `biases=` (leaf paths, first layer first) and "
                    "`layout=`."
                )
            return sorted(names, key=lambda n: idx[names.index(n)] or 0)

        dense = ordered(dense)
        if dense:
            ws = [f"{prefix}[{k!r}]['kernel']" for k in dense]
            bs = [f"{prefix}[{k!r}]['bias']" if "bias" in tree[k] else None for k in dense]
            return ws, bs, "in_out"
        # haiku: {"mlp/~/linear_0": {"w": (in, out), "b": (out,)}, ...}
        linear = ordered([k for k in params if isinstance(params[k], dict) and "w" in params[k]])
        if linear:
            ws = [f"[{k!r}]['w']" for k in linear]
            bs = [f"[{k!r}]['b']" if "b" in params[k] else None for k in linear]
            return ws, bs, "in_out"
    raise ValueError(
        "could not find the layers of these parameters; pass `weights=` and `biases=` (leaf "
        "paths, first layer first) and `layout=`."
    )


def feedforward_gauge(
    params: Any,
    activation: Callable | Sequence[Callable],
    *,
    weights: Sequence[str] | None = None,
    biases: Sequence[str | None] | None = None,
    layout: Literal["out_in", "in_out"] | None = None,
    group: Any = None,
    unsafe: bool = False,
) -> Gauge:
    """The gauge of a feedforward network $x_l = \\sigma(W_l x_{l-1} + b_l)$ (last layer
    linear) whose parameters are any pytree.

    Sites `"h1" .. "h{L-1}"` are the hidden layers. Layers are found automatically in a
    list of `(W, b)` pairs, a list of dicts, flax's `{"params": {"Dense_i": {"kernel",
    "bias"}}}` and haiku's `{"mlp/~/linear_i": {"w", "b"}}` (ordered by the index ending
    each name; names without one, such as `"output"`, raise); otherwise name them.

    **Arguments:**

    - `params`: the parameter pytree (or its `jax.eval_shape`).
    - `activation`: the hidden activation, or one per hidden layer.
    - `weights`, `biases`: leaf paths of each layer's weight and bias (`None` for no bias).
    - `layout`: `"out_in"` (equinox, `y = W x`) or `"in_out"` (flax kernels, `y = x W`).
    - `group`: a group class or a callable `width -> group` for every hidden site, or a list
      of them, one per site; `None` picks the largest group each activation admits
      ([`gaugejax.default_group`][]).
    - `unsafe`: allow a group the activation does not admit (for negative controls). Without
      it such a request raises a `ValueError`.

    **Returns:** a [`gaugejax.Gauge`][].
    """
    if weights is None:
        weights, auto_biases, auto_layout = _detect_layers(params)
        biases = auto_biases if biases is None else biases
        layout = auto_layout if layout is None else layout
    layout = layout or "out_in"
    if layout not in ("out_in", "in_out"):
        raise ValueError(f"layout must be 'out_in' or 'in_out', got {layout!r}.")
    weights = list(weights)
    biases = [None] * len(weights) if biases is None else list(biases)
    if len(biases) != len(weights):
        raise ValueError(f"got {len(weights)} weights but {len(biases)} biases.")
    n_hidden = len(weights) - 1
    activations = list(activation) if isinstance(activation, (list, tuple)) else [activation] * n_hidden
    if len(activations) != n_hidden:
        raise ValueError(f"got {len(activations)} activations for {n_hidden} hidden layers.")
    groups = list(group) if isinstance(group, (list, tuple)) else [group] * n_hidden
    if len(groups) != n_hidden:
        raise ValueError(f"got {len(groups)} groups for {n_hidden} hidden layers.")

    table = _paths.lookup_table(params)
    leaves = jtu.tree_leaves(params)
    out_axis, in_axis = (0, 1) if layout == "out_in" else (1, 0)
    sites: dict[str, AbstractGroup] = {}
    couplings = []
    for l in range(1, n_hidden + 1):
        name = f"h{l}"
        w_path = _paths.normalise(weights[l - 1])
        if w_path not in table:
            raise ValueError(f"weight of layer {l}: no leaf at path {weights[l - 1]!r}.{_paths.close_matches(w_path, list(table))}")
        width = leaves[table[w_path]].shape[out_axis]
        spec, act = groups[l - 1], activations[l - 1]
        site_group = _activations.default_group(act, width) if spec is None else _make_group(spec, width)
        if not _activations.admits(act, site_group) and not unsafe:
            family = _activations.activation_family(act)
            allowed = ", ".join(c.__name__ for c in _activations.ADMITS[family])
            raise ValueError(
                f"site {name!r}: activation {getattr(act, '__name__', act)!r} (family "
                f"{family!r}) does not admit {site_group!r}: sigma(g z) != g sigma(z), so the "
                f"network would change. Admitted groups: {allowed}. Pass unsafe=True to build "
                "it anyway (e.g. as a negative control), or register_activation() if the "
                "activation has more symmetry than gaugejax knows."
            )
        sites[name] = site_group
        couplings.append(Produce(weights[l - 1], out_axis, name))
        if biases[l - 1] is not None:
            couplings.append(Produce(biases[l - 1], 0, name))
        couplings.append(Consume(weights[l], in_axis, name))
    return Gauge(sites, couplings, params)


@functools.singledispatch
def derive_gauge(model: Any, **kwargs: Any) -> Gauge:
    """The gauge of a model, derived from its architecture.

    Implemented for [`gaugejax.nn.MLP`][] and `equinox.nn.MLP` (and extended by later
    model families); keyword arguments go to the family's builder (for MLPs,
    [`gaugejax.feedforward_gauge`][]: `group=`, `unsafe=`). For a plain pytree of
    parameters call [`gaugejax.feedforward_gauge`][] with the activation.
    """
    raise TypeError(
        f"no gauge is known for {type(model).__name__}; describe it with gaugejax.Gauge(sites, "
        "couplings, params), or call gaugejax.feedforward_gauge(params, activation) for a "
        "feedforward pytree."
    )


def _mlp_paths(n_layers: int, with_bias: list[bool]) -> tuple[list[str], list[str | None]]:
    ws = [f"layers[{i}].weight" for i in range(n_layers)]
    bs = [f"layers[{i}].bias" if b else None for i, b in enumerate(with_bias)]
    return ws, bs


@derive_gauge.register
def _(model: MLP, **kwargs: Any) -> Gauge:
    ws, bs = _mlp_paths(len(model.layers), [layer.bias is not None for layer in model.layers])
    return feedforward_gauge(model, model.activation, weights=ws, biases=bs, layout="out_in", **kwargs)


@derive_gauge.register
def _(model: eqx.nn.MLP, **kwargs: Any) -> Gauge:
    if getattr(model, "scan", False):
        raise ValueError("equinox.nn.MLP(scan=True) stacks its hidden layers; gaugejax does not derive its gauge yet (use scan=False).")
    if any(eqx.is_array(x) for x in jtu.tree_leaves(model.activation)):
        raise ValueError(
            "this equinox.nn.MLP has a learnt activation (with parameters); its per-neuron "
            "parameters must transform too, so declare the gauge with gaugejax.Gauge."
        )
    ws, bs = _mlp_paths(len(model.layers), [layer.bias is not None for layer in model.layers])
    return feedforward_gauge(model, model.activation, weights=ws, biases=bs, layout="out_in", **kwargs)
