"""The gauge of `equinox.nn.MultiheadAttention`, whose heads live inside whole axes.

equinox's attention projects with `Linear(query_size, H * d_k)` and reshapes the result
into `(H, d_k)`; the per-head symmetries act on *pieces* of a leaf axis. The couplings
therefore act on views of the leaves ([`gaugejax.Produce`][]'s `view`): the query
projection's weight `(H d_k, q)` is viewed as `(H, d_k, q)`, the output projection's
`(o, H d_v)` as `(o, H, d_v)`. The sites are those of MATH.md's attention section:

- `"heads"`: a [`gaugejax.Permutation`][] of the $H$ heads (query, key, value and output
  blocks move together);
- `"qk"`: one $GL(d_k)$ per head, $W_Q \\to g W_Q$, $W_K \\to g^{-T} W_K$ (so
  $q^\\top k$ is unchanged), with the biases;
- `"vo"`: one $GL(d_v)$ per head, $W_V \\to g W_V$, $W_O \\to W_O g^{-1}$ per head block;
- `"key_shift"`: with a key bias, the shift $b_K \\to b_K + t$ (its score contribution
  $q^\\top t$ is constant over the keys, and the softmax removes it; MATH.md S16).

[`gaugejax.infer_gauge`][] finds exactly this group from the traced layer (the test
suite checks that they agree).

The group is that of the plain call `mha(query, key_, value, mask)` with one mask shared by
every head. Two options of equinox's call break parts of it, and the switches below drop
them: a per-head mask `(num_heads, q, kv)` makes the heads distinguishable (`heads=False`);
`process_heads` (rotary embeddings, a per-head QK norm) acts between the projections and
the scores, so it keeps none of `"qk"` and `"key_shift"` in general (`qk=False,
key_shift=False`), nor `"vo"` if it touches the values. A sweep over the call you use
([`gaugejax.check_invariance`][]) or [`gaugejax.infer_gauge`][] on it settles which parts hold.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx

from ._coupling import Consume, Produce, Translate
from ._feedforward import derive_gauge
from ._gauge import Gauge
from ._groups import GL, Permutation, Translation


def multihead_attention_gauge(
    mha: eqx.nn.MultiheadAttention,
    *,
    heads: bool = True,
    qk: bool = True,
    vo: bool = True,
    key_shift: bool = True,
) -> Gauge:
    """The gauge of an `equinox.nn.MultiheadAttention` layer (module docstring).

    **Arguments:**

    - `mha`: the layer (dropout does not matter: it acts after the softmax, per entry).
    - `heads`: include the head permutation (drop it for a per-head mask).
    - `qk`: include the per-head $GL(d_k)$ of queries and keys (drop it under a
      `process_heads` that acts on them, e.g. rotary embeddings).
    - `vo`: include the per-head $GL(d_v)$ of values and outputs.
    - `key_shift`: include the key-bias translation site when the layer has a key bias
      (drop it under rotary embeddings: the bias's score is then position dependent).

    **Returns:** a [`gaugejax.Gauge`][] acting on the layer itself.
    """
    if not isinstance(mha, eqx.nn.MultiheadAttention):
        raise TypeError(f"`mha`: expected an equinox.nn.MultiheadAttention, got {type(mha).__name__}.")
    for name, value in (("heads", heads), ("qk", qk), ("vo", vo), ("key_shift", key_shift)):
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be a bool, got {value!r}.")
    H, dk, dv = int(mha.num_heads), int(mha.qk_size), int(mha.vo_size)
    sites: dict[str, Any] = {}
    if heads:
        sites["heads"] = Permutation(H)
    if qk:
        sites["qk"] = GL(dk, batch=(H,))
    if vo:
        sites["vo"] = GL(dv, batch=(H,))
    couplings: list = []

    def block(layer: str, kind: type, site: str, width: int) -> None:
        lin = getattr(mha, layer)
        w = lin.weight
        view = (H, width, int(w.shape[1]))
        leaves = [(f"{layer}.weight", view)]
        if lin.bias is not None:
            leaves.append((f"{layer}.bias", (H, width)))
        for path, v in leaves:
            if heads:
                couplings.append(Produce(path, 0, "heads", view=v))
            if site in sites:
                couplings.append(kind(path, 1, site, (0,), view=v))

    block("query_proj", Produce, "qk", dk)
    block("key_proj", Consume, "qk", dk)
    block("value_proj", Produce, "vo", dv)
    out = mha.output_proj.weight
    view = (int(out.shape[0]), H, dv)
    if heads:
        couplings.append(Consume("output_proj.weight", 1, "heads", view=view))
    if vo:
        couplings.append(Consume("output_proj.weight", 2, "vo", (1,), view=view))
    if key_shift and mha.key_proj.bias is not None:
        sites["key_shift"] = Translation(tuple(mha.key_proj.bias.shape))
        couplings.append(Translate("key_proj.bias", "key_shift"))
    return Gauge(sites, couplings, mha)


@derive_gauge.register
def _(model: eqx.nn.MultiheadAttention, **kwargs: Any) -> Gauge:
    return multihead_attention_gauge(model, **kwargs)
