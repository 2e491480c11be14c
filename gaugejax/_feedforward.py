"""Feedforward gauges: $W_l \\mapsto g_l W_l g_{l-1}^{-1}$, $b_l \\mapsto g_l b_l$, $g_0 = g_L = I$.

The sites are the hidden layers $h_1 .. h_{L-1}$; each carries the largest group its
activation admits (see [`gaugejax.register_activation`][]). This module only writes the
sites-and-couplings table; [`gaugejax.Gauge`][] does the rest.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
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


#: the conventional weight names whose layout is known: equinox / PyTorch write `(out, in)`,
#: flax `(in, out)`. Haiku's `"w"` is `(in, out)`, but hand-written code often names an
#: `(out, in)` matrix `w` too, so that name decides only inside haiku's own tree structure.
_OUT_IN_NAMES = ("weight", "W")
_IN_OUT_NAMES = ("kernel",)
_LAYOUTS = {"out_in": ("(out, in)", "y = W x"), "in_out": ("(in, out)", "y = x W")}


def _hint_of_key(key: str) -> str | None:
    if key in _OUT_IN_NAMES:
        return "out_in"
    if key in _IN_OUT_NAMES:
        return "in_out"
    return None  # "w" and anything else: the shapes decide


def _one(hints: list[str | None]) -> str | None:
    return hints[0] if hints and all(h == hints[0] for h in hints) else None


def _detect_layers(params: Any) -> tuple[list[str], list[str | None], str | None, str]:
    """Weight and bias paths of a list of `(W, b)` pairs, a list of dicts, a flax-style
    `{"params": {"Dense_0": {"kernel", "bias"}, ...}}` tree or a haiku-style
    `{"mlp/~/linear_0": {"w", "b"}, ...}` one; the layout the convention implies (`None`
    where only the shapes can tell), and the convention's name for error messages."""
    if isinstance(params, (list, tuple)) and params and all(isinstance(p, (list, tuple)) for p in params):
        ws = [f"[{i}][0]" for i in range(len(params))]
        # a missing bias may be written as `(W,)` or `(W, None)`
        bs = [f"[{i}][1]" if len(p) > 1 and p[1] is not None else None for i, p in enumerate(params)]
        return ws, bs, "out_in", "a list of (W, b) pairs"
    if isinstance(params, (list, tuple)) and params and all(isinstance(p, Mapping) for p in params):
        ws, bs, hints = [], [], []
        for i, p in enumerate(params):
            wk = next((k for k in ("weight", "W", "w", "kernel") if k in p), None)
            if wk is None:
                raise ValueError(f"layer {i}: no weight key among {list(p)} (expected 'weight', 'W', 'w' or 'kernel').")
            ws.append(f"[{i}][{wk!r}]")
            hints.append(_hint_of_key(wk))
            bk = next((k for k in ("bias", "b") if k in p and p[k] is not None), None)
            bs.append(f"[{i}][{bk!r}]" if bk else None)
        keys = sorted({w.split("'")[1] for w in ws})
        return ws, bs, _one(hints), f"the weight keys {keys} of a list of dicts"
    if isinstance(params, Mapping):
        tree = params.get("params", params)
        prefix = "['params']" if "params" in params else ""
        dense = [k for k in tree if isinstance(tree[k], Mapping) and "kernel" in tree[k]]

        def ordered(names: list[str]) -> list[str]:
            # first layer first, by the index that ends each name (Dense_0, linear_1, ...);
            # a name without one ("output") or a repeated index leaves the order unknown
            found = [re.search(r"(\d+)$", n) for n in names]
            idx = [int(m.group(1)) if m else None for m in found]
            # haiku and flax name a module's first instance bare and the next ones with
            # _1, _2, ... ("linear", "linear_1"): the bare name is the first
            bare = [n for n, i in zip(names, idx) if i is None]
            if len(bare) == 1 and all(i is None or n == f"{bare[0]}_{i}" for n, i in zip(names, idx)):
                idx = [0 if i is None else i for i in idx]
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
            bs = [f"{prefix}[{k!r}]['bias']" if tree[k].get("bias") is not None else None for k in dense]
            return ws, bs, "in_out", "a flax parameter dict"
        # haiku: {"mlp/~/linear_0": {"w": (in, out), "b": (out,)}, ...}
        linear = ordered([k for k in params if isinstance(params[k], Mapping) and "w" in params[k]])
        if linear:
            ws = [f"[{k!r}]['w']" for k in linear]
            bs = [f"[{k!r}]['b']" if params[k].get("b") is not None else None for k in linear]
            if all(_haiku_module_name(k) for k in linear):
                return ws, bs, "in_out", "a haiku parameter dict"
            # a hand-written {"layer": {"w", "b"}} dict: "w" may be (out, in) there
            return ws, bs, None, "the weight key 'w' of a dict of layers"
    raise ValueError(
        "could not find the layers of these parameters; pass `weights=` and `biases=` (leaf "
        "paths, first layer first) and `layout=`."
    )


def _haiku_module_name(name: Any) -> bool:
    """Whether a dict key reads as a haiku module path (`"mlp/~/linear_0"`, `"linear_1"`),
    where `"w"` is haiku's `(in, out)` weight."""
    return isinstance(name, str) and ("/~/" in name or re.fullmatch(r"linear(_\d+)?", name) is not None)


def _key_name(key: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def _check_only_dense_layers(params: Any, weights: list[str], biases: list[str | None]) -> None:
    """Refuse to guess when the tree holds arrays outside the detected dense layers: a
    LayerNorm or BatchNorm between them changes which rescalings are symmetries."""
    covered = {_paths.normalise(p) for p in [*weights, *biases] if p is not None}
    extra = [
        path for path, leaf in _paths.flatten(params)[0]
        if _paths.is_arraylike(leaf) and path not in covered
    ]
    if extra:
        shown = ", ".join(extra[:6]) + (f" and {len(extra) - 6} more" if len(extra) > 6 else "")
        raise ValueError(
            "these parameters hold leaves outside the dense layers found automatically "
            f"(weights {', '.join(w for w in weights)}): {shown}. A "
            "normalisation or other layer between the dense layers can break their symmetry "
            "(a LayerNorm undoes rescalings), so no feedforward gauge is guessed. If these "
            "leaves take no part in the network between the layers, pass `weights=` and "
            "`biases=` (and `layout=`); otherwise declare the gauge with gaugejax.Gauge, or "
            "find it with gaugejax.infer_gauge."
        )


def _named_layout(params: Any, key_paths: list[tuple]) -> str | None:
    """The layout the weights' own names imply, as auto-detection reads them."""
    hints = []
    for path in key_paths:
        name = _key_name(path[-1]) if path else None
        hint = _hint_of_key(name) if isinstance(name, str) else None
        if name == "w" and isinstance(params, Mapping) and len(path) == 2 and all(
            isinstance(k, jtu.DictKey) for k in path
        ) and _haiku_module_name(_key_name(path[0])):
            hint = "in_out"  # haiku's {"mlp/~/linear_0": {"w": (in, out), "b": ...}}
        hints.append(hint)
    return _one(hints)


def _sibling_biases(key_paths: list[tuple], all_paths: dict[tuple, int]) -> list[str | None]:
    """For each weight, the bias leaf beside it: same parent, named `bias` / `b` (with the
    weight name's suffix: `w1` -> `b1`), or the second entry of a `(W, b)` pair."""
    biases: list[str | None] = []
    for path in key_paths:
        parent, last = path[:-1], _key_name(path[-1]) if path else None
        found = []
        if isinstance(last, str):
            # "weight", "w1", "weights_2", and PyTorch state-dict keys "fc1.weight" -> "fc1.bias"
            m = re.fullmatch(r"(.*[./])?(weights?|kernel|W|w)(.*)", last)
            if m:
                pre, suf = m.group(1) or "", m.group(3)
                wanted = {f"{pre}{b}{suf}" for b in ("bias", "biases", "b")}
                found = [p for p in all_paths if p[:-1] == parent and len(p) == len(path) and _key_name(p[-1]) in wanted]
        elif last == 0 and isinstance(path[-1], jtu.SequenceKey):
            pair = [p for p in all_paths if p[:-1] == parent and len(p) == len(path)]
            found = [p for p in pair if _key_name(p[-1]) == 1] if len(pair) == 2 else []
        if len(found) > 1:
            raise ValueError(
                f"weight {_paths.canonical(path)!r} has more than one bias beside it "
                f"({', '.join(repr(_paths.canonical(p)) for p in found)}); pass `biases=`."
            )
        biases.append(_paths.canonical(found[0]) if found else None)
    return biases


def _fits(layout: str, w_shapes: list[tuple], b_shapes: list[tuple | None]) -> bool:
    """Whether the weights chain (each layer reads the width the last one wrote) and each
    bias has its layer's output width, read in `layout`."""
    if any(len(s) != 2 for s in w_shapes) or any(b is not None and len(b) == 0 for b in b_shapes):
        return False
    out_axis, in_axis = (0, 1) if layout == "out_in" else (1, 0)
    chained = all(a[out_axis] == b[in_axis] for a, b in zip(w_shapes[:-1], w_shapes[1:]))
    return chained and all(b is None or b[0] == w[out_axis] for w, b in zip(w_shapes, b_shapes))


def _resolve_layout(
    hint: str | None, source: str, weights: list[str], w_shapes: list[tuple], b_shapes: list[tuple | None],
) -> str:
    """The layout the convention (`hint`) says, checked against the shapes; the shapes
    alone where there is no convention; an error where neither decides."""
    fits = [lay for lay in ("out_in", "in_out") if _fits(lay, w_shapes, b_shapes)]
    shapes = ", ".join(f"{w!r} {tuple(s)}" for w, s in zip(weights, w_shapes))
    if hint is not None:
        if hint in fits or not fits:  # no fit either way: the Gauge names the widths that disagree
            return hint
        other = fits[0]
        raise ValueError(
            f"by the convention of {source} the weights are {', '.join(_LAYOUTS[hint])}, but the "
            f"weights ({shapes}) and biases only fit together as {', '.join(_LAYOUTS[other])}: the "
            f"weights look {_LAYOUTS[other][0]}; pass layout={other!r}."
        )
    if len(fits) == 1:
        return fits[0]
    if not fits or len(weights) == 1:  # nothing to decide / the Gauge names the widths that disagree
        return "out_in"
    raise ValueError(
        f"cannot tell the layout of the weights ({shapes}): {source} do not say it (haiku's "
        "'w' is (in, out), a hand-written 'w' is often (out, in)) and the shapes fit both "
        "ways; pass layout='out_in' (y = W x, equinox and PyTorch) or layout='in_out' "
        "(y = x W, flax and haiku)."
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
    r"""The gauge of a feedforward network $x_l = \sigma(W_l x_{l-1} + b_l)$ (last layer
    linear) whose parameters are any pytree.

    Sites `"h1" .. "h{L-1}"` are the hidden layers. Layers are found automatically in:

    - a list of `(W, b)` pairs (`(W,)` or `(W, None)` for no bias), weights `(out, in)`;
    - a list of dicts, with the weight under `"weight"` or `"W"` (`(out, in)`), `"kernel"`
      (`(in, out)`) or `"w"` (either: the shapes decide, and square ones raise), and the
      bias under `"bias"` or `"b"`;
    - flax's `{"params": {"Dense_i": {"kernel", "bias"}}}` and haiku's
      `{"mlp/~/linear_i": {"w", "b"}}`, both `(in, out)`, ordered by the index ending each
      name (names without one, such as `"output"`, raise).

    A detected tree holding other arrays (a LayerNorm or BatchNorm between the layers, whose
    symmetry is not the dense layers') raises rather than ignore them. Otherwise name the
    layers with `weights=`.

    **Arguments:**

    - `params`: the parameter pytree (or its `jax.eval_shape`).
    - `activation`: the hidden activation (a callable), or a list of them, one per hidden
      layer.
    - `weights`: leaf paths of each layer's weight, first layer first.
    - `biases`: leaf paths of each layer's bias (`None` for no bias). By default, with
      `weights=`, the leaf beside each weight named `bias` or `b` (`w1` -> `b1`, and the
      second entry of a `(W, b)` pair); pass `[None] * L` for a network without biases.
    - `layout`: `"out_in"` (equinox, `y = W x`) or `"in_out"` (flax kernels, `y = x W`). By
      default the weights' names decide (`"weight"`, `"W"`: `(out, in)`; `"kernel"` and
      haiku's `"w"`: `(in, out)`), checked against the shapes; without such a name the
      shapes decide, and where they fit both ways (square layers) a `ValueError` asks for
      it.
    - `group`: a group class or a callable `width -> group` for every hidden site, or a list
      of them, one per site; `None` picks the largest group each activation admits
      ([`gaugejax.default_group`][]).
    - `unsafe`: allow a group the activation does not admit (for negative controls). Without
      it such a request raises a `ValueError`.

    **Returns:** a [`gaugejax.Gauge`][].
    """
    table = _paths.lookup_table(params)
    with_path, _ = jtu.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in with_path]
    if weights is None:
        weights, auto_biases, hint, source = _detect_layers(params)
        _check_only_dense_layers(params, weights, auto_biases)
        biases = auto_biases if biases is None else biases
    else:
        weights = list(weights)
        for i, w in enumerate(weights):
            if _paths.normalise(w) not in table:
                raise ValueError(f"`weights[{i}]`: no leaf at path {w!r}.{_paths.close_matches(_paths.normalise(w), list(table))}")
        key_paths = [with_path[table[_paths.normalise(w)]][0] for w in weights]
        names = sorted({str(_key_name(p[-1])) for p in key_paths if p})
        hint, source = _named_layout(params, key_paths), f"the weights' names {names}"
        try:  # the weights auto-detection finds keep its convention (a list of pairs: (out, in))
            auto_ws, _, auto_hint, auto_source = _detect_layers(params)
        except ValueError:
            auto_ws = []
        if auto_ws and [table.get(_paths.normalise(w)) for w in auto_ws] == [table[_paths.normalise(w)] for w in weights]:
            hint, source = auto_hint, auto_source
        if biases is None:
            biases = _sibling_biases(key_paths, {p: i for i, (p, _) in enumerate(with_path)})
    weights = list(weights)
    biases = [None] * len(weights) if biases is None else list(biases)
    if len(biases) != len(weights):
        raise ValueError(f"got {len(weights)} weights but {len(biases)} biases.")
    n_hidden = len(weights) - 1
    if not isinstance(activation, (list, tuple)) and not callable(activation):
        raise TypeError(
            "`activation` must be a callable (e.g. jax.nn.relu) or a list of callables, one "
            f"per hidden layer; got {activation!r} of type {type(activation).__name__}."
        )
    activations = list(activation) if isinstance(activation, (list, tuple)) else [activation] * n_hidden
    for i, act in enumerate(activations):
        if not callable(act):
            raise TypeError(
                f"`activation[{i}]` must be a callable (e.g. jax.nn.relu), got {act!r} of type "
                f"{type(act).__name__}."
            )
    if len(activations) != n_hidden:
        raise ValueError(f"got {len(activations)} activations for {n_hidden} hidden layers.")
    groups = list(group) if isinstance(group, (list, tuple)) else [group] * n_hidden
    if len(groups) != n_hidden:
        raise ValueError(f"got {len(groups)} groups for {n_hidden} hidden layers.")

    def shape_of(path: str | None, what: str) -> tuple | None:
        if path is None:
            return None
        if _paths.normalise(path) not in table:
            raise ValueError(f"{what}: no leaf at path {path!r}.{_paths.close_matches(_paths.normalise(path), list(table))}")
        return tuple(leaves[table[_paths.normalise(path)]].shape)

    w_shapes = [shape_of(w, f"weight of layer {l + 1}") for l, w in enumerate(weights)]
    b_shapes = [shape_of(b, f"bias of layer {l + 1}") for l, b in enumerate(biases)]
    for l, (path, shape) in enumerate(zip(weights, w_shapes)):
        if len(shape) != 2:  # a convolution kernel (kh, kw, in, out) is no dense layer
            raise ValueError(
                f"weight of layer {l + 1} ({path!r}) has shape {shape}: feedforward_gauge takes dense "
                "layers, whose weights are matrices (a convolution's kernel holds spatial axes "
                "too); declare the gauge of other layers with gaugejax.Gauge."
            )
    for l, (path, shape) in enumerate(zip(biases, b_shapes)):
        if shape is not None and len(shape) != 1:
            raise ValueError(f"bias of layer {l + 1} ({path!r}) has shape {shape}; expected a vector.")
    if layout is None:
        layout = _resolve_layout(hint, source, weights, w_shapes, b_shapes)
    if layout not in ("out_in", "in_out"):
        raise ValueError(f"layout must be 'out_in' or 'in_out', got {layout!r}.")

    out_axis, in_axis = (0, 1) if layout == "out_in" else (1, 0)
    sites: dict[str, AbstractGroup] = {}
    couplings = []
    for l in range(1, n_hidden + 1):
        name = f"h{l}"
        width = w_shapes[l - 1][out_axis]
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

    Dispatches on the model's type (`functools.singledispatch`: register your own with
    `@gaugejax.derive_gauge.register`); keyword arguments go to the family's builder:

    | model | builder (its keyword arguments) |
    |---|---|
    | [`gaugejax.nn.MLP`][], `equinox.nn.MLP` | [`gaugejax.feedforward_gauge`][] (`group=`, `unsafe=`) |
    | [`gaugejax.nn.ResNet`][] | [`gaugejax.resnet_gauge`][] (`boundary=`, ...) |
    | [`gaugejax.nn.NeuralODE`][] | [`gaugejax.node_gauge`][] (`boundary=`, `time_dependent=`, ...) |
    | [`gaugejax.nn.Transformer`][] | [`gaugejax.transformer_gauge`][] (`heads=`, `qk=`, `rotation=`, `mlp_group=`, ...) |
    | `equinox.nn.MultiheadAttention` | [`gaugejax.multihead_attention_gauge`][] (`heads=`, `qk=`, `vo=`, `key_shift=`) |

    Anything else raises a `TypeError`. For a plain pytree of parameters call
    [`gaugejax.feedforward_gauge`][] with the activation, write the table with
    [`gaugejax.Gauge`][], or let [`gaugejax.infer_gauge`][] find it.
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
