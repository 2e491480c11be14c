"""The gauge of a transformer, as sites and couplings (MATH.md S14-S17).

Per layer $l$ (with $H$ heads):

| site | group | couplings |
|---|---|---|
| `heads{l}` | $S_H$ | the heads axis of $W_Q, b_Q, W_K, b_K, W_V, b_V$ (axis 0) and $W_O$ (axis 1) |
| `qk{l}` | $GL(d_k)^H$ | $W_Q, b_Q$ produce; $W_K, b_K$ consume (S14) |
| `ov{l}` | $GL(d_v)^H$ | $W_V, b_V$ produce; $W_O$ consumes (S15) |
| `key_shift{l}` | $\\mathbb{R}^{H \\times d_k}$ | $b_K \\mapsto b_K + t$ (S16) |
| `mlp{l}` | by activation | $W_{in}, b_{in}$ produce; $W_{out}$ consumes |

With grouped-query attention (`n_kv_heads=G`), `heads{l}` permutes the $G$ key/value
groups, a `qheads{l}` site $S_{H/G}^G$ the query heads within each group (one
permutation per group, batched on the groups axis that `heads{l}` permutes), and `qk{l}`, `ov{l}`, `key_shift{l}` are batched over the $G$
groups: one $GL(d_k)$ and one $GL(d_v)$ per key/value head, shared by its query heads.

and, when every norm is a scale-free RMSNorm and the model has an unembedding, one
`stream` site $O(d)$ (S17) that the embeddings and every writer produce and every reader
(and the unembedding) consumes. With LayerNorms or norm gains the rotations are lost but
permuting the stream's coordinates still commutes with every norm (means and variances
are permutation invariant; gains and biases move with their coordinates): the `stream`
site is then $S_d$, also coupled to the norms' gains and biases. Because the per-head sites are batched on the heads axis
that `heads{l}` permutes, the engine derives the semidirect product
$(GL(d_k)^H \\times GL(d_v)^H) \\rtimes S_H$ by itself.

This module writes only the table; [`gaugejax.Gauge`][] does the rest.
"""

from __future__ import annotations

from typing import Any

from . import _activations
from ._coupling import Consume, Produce, Translate
from ._feedforward import derive_gauge
from ._gauge import Gauge
from ._groups import GL, AbstractGroup, Orthogonal, Permutation, Translation
from .nn._transformer import ACTIVATION_FNS, Transformer


#: the static configuration fields this derivation understands; a subclass or a future
#: field outside this set makes the derivation refuse instead of guessing
KNOWN_FIELDS = frozenset({
    "token_embedding", "position_embedding", "embed_norm", "blocks", "final_norm", "unembed",
    "unembed_bias", "n_heads", "norm_position", "causal", "unembedding", "rotary", "n_kv_heads",
})


def rotation_obstruction(model: Transformer) -> str | None:
    """Why the residual-stream rotation $O(d)$ is not a symmetry of `model`, or `None` if
    it is (S17: every norm a scale-free RMSNorm, and an unembedding to absorb it)."""
    # weight processing reaches a rotation-symmetric model only from a pre-norm one, and
    # cannot fold the embedding norm (no linear map reads it: the stream is its output)
    post = model.norm_position == "post"
    for path, norm in model.norms():
        fixable = not post and path != "embed_norm"
        if norm.kind != "rms":
            return f"{path} is a LayerNorm: it subtracts the mean, which a rotation does not preserve. " + (
                "Process the weights first: gaugejax.process_weights(model) (fold gains, center the "
                "writing weights, LayerNorm -> RMSNorm)." if fixable else
                "No weight processing turns it into an RMSNorm (that needs a pre-norm model and a "
                "norm read only by linear maps): this model has no residual rotation."
            )
        if norm.weight is not None or norm.bias is not None:
            return f"{path} has a gain/bias: RMSNorm commutes with rotations only without them. " + (
                "Fold them into the next linear maps first: gaugejax.fold_norm_gains(model)." if fixable
                else "No linear map reads it alone (its output is the residual stream), so no weight "
                "processing folds it: this model has no residual rotation."
            )
    if model.unembedding == "none":
        return (
            "the model has no unembedding (unembedding='none'): its output is the residual "
            "stream itself, which a rotation rotates."
        )
    return None


def transformer_gauge(
    model: Transformer,
    *,
    heads: bool = True,
    qk: bool | None = None,
    ov: bool = True,
    key_shift: bool | None = None,
    mlp: bool = True,
    rotation: bool | None = None,
    stream_permutation: bool | None = None,
    mlp_group: Any = None,
    unsafe: bool = False,
) -> Gauge:
    """The gauge group of a [`gaugejax.nn.Transformer`][], derived from its configuration.

    Each argument switches one family of sites on or off. `None` (the default for the
    families a configuration may not admit) means "include it if the model admits it";
    `True` demands it and raises a `ValueError` that says why when the model does not.

    **Arguments:**

    - `model`: the transformer (or its `equinox.filter_eval_shape`).
    - `heads`: head permutations $S_H$ per layer.
    - `qk`: per-head $GL(d_k)$ on queries/keys (S14); not admitted with rotary embeddings.
    - `ov`: per-head $GL(d_v)$ on values/outputs (S15).
    - `key_shift`: the key-bias translation (S16); not admitted with rotary embeddings.
    - `mlp`: the MLP hidden units' group (by activation: GELU permutations, ReLU positive
      monomials).
    - `rotation`: residual-stream $O(d)$ (S17); admitted only with scale-free RMSNorms and an
      unembedding (see [`gaugejax.fold_norm_gains`][], [`gaugejax.process_weights`][]).
    - `stream_permutation`: when the rotation is not included, residual-stream
      permutations $S_d$ (norm gains and biases permuted with the stream); admitted
      whenever the model has an unembedding.
    - `mlp_group`: a group class or `width -> group` for the MLP sites (checked against the
      activation).
    - `unsafe`: build the families that were asked for with `True` even where the model
      does not admit them (for negative controls). Without it such a request raises.

    **Returns:** a [`gaugejax.Gauge`][] with sites `heads{l}`, `qk{l}`, `ov{l}`,
    `key_shift{l}`, `mlp{l}` and `stream` (those included).

    References: Hashimoto, Hirono, Sannai, "Unification of Symmetries Inside Neural
    Networks: Transformer, Feedforward and Neural ODE" (2024); Ashkboos et al., "SliceGPT"
    (2024) for the residual rotation.
    """
    if type(model) is not Transformer:
        raise TypeError(
            f"transformer_gauge derives the gauge of gaugejax.nn.Transformer itself; got "
            f"{type(model).__name__}. A subclass may change the forward pass, so declare its "
            "gauge with gaugejax.Gauge(sites, couplings, params)."
        )
    if mlp_group is not None and (isinstance(mlp_group, AbstractGroup) or not callable(mlp_group)):
        raise TypeError(
            f"`mlp_group`: expected a group class (e.g. gaugejax.Permutation) or a function width -> "
            f"group, one group per layer's MLP; received {mlp_group!r}."
        )
    unknown = set(type(model).__dataclass_fields__) - KNOWN_FIELDS
    if unknown:  # pragma: no cover - guards a future field added without a gauge rule
        raise ValueError(f"Transformer has fields {sorted(unknown)} that the gauge derivation does not understand.")
    if model.rotary:
        for name, val in (("qk", qk), ("key_shift", key_shift)):
            if val and not unsafe:
                raise ValueError(
                    f"{name}=True: this model uses rotary position embeddings, which rotate "
                    "queries and keys by position-dependent angles; a general GL(d_k) (or a key "
                    "bias shift) does not commute with them, so the model would change."
                )
        qk, key_shift = bool(qk and unsafe), bool(key_shift and unsafe)
    qk = True if qk is None else qk
    key_shift = True if key_shift is None else key_shift
    obstruction = rotation_obstruction(model)
    if rotation and obstruction is not None and not unsafe:
        raise ValueError(f"rotation=True is not a symmetry of this model: {obstruction}")
    rotation = obstruction is None if rotation is None else rotation
    if stream_permutation and model.unembedding == "none" and not unsafe:
        raise ValueError(
            "stream_permutation=True is not a symmetry of this model: it has no unembedding "
            "(unembedding='none'), so its output is the residual stream itself."
        )
    if stream_permutation is None:
        stream_permutation = model.unembedding != "none"
    stream = rotation or stream_permutation

    H, dk, dv, d, m = model.n_heads, model.d_k, model.d_v, model.d_model, model.d_mlp
    sites: dict[str, AbstractGroup] = {}
    couplings: list[Any] = []
    act = ACTIVATION_FNS[model.activation]
    G = model.n_kv_heads if model.grouped else H
    for l in range(model.n_layers):
        a, p = f"blocks[{l}].attn", f"blocks[{l}].mlp"
        if model.grouped:
            # grouped-query attention: W_Q (G, r, dk, d), W_O (d, G, r, dv). `heads{l}`
            # permutes the key/value groups (with their query heads), `qheads{l}` the query
            # heads within each group (S_r^G: a permutation per group, batched on the groups
            # axis, which `heads{l}` permutes in a semidirect product); the per-head GLs are
            # shared by the query heads of a group
            if heads:
                sites[f"heads{l}"] = Permutation(G)
                couplings += [Produce(f"{a}.{w}", 0, f"heads{l}") for w in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V")]
                couplings.append(Produce(f"{a}.W_O", 1, f"heads{l}"))
                sites[f"qheads{l}"] = Permutation(H // G, (G,))
                couplings += [Produce(f"{a}.W_Q", 1, f"qheads{l}", (0,)), Produce(f"{a}.b_Q", 1, f"qheads{l}", (0,)),
                              Produce(f"{a}.W_O", 2, f"qheads{l}", (1,))]
            if qk:
                s = f"qk{l}"
                sites[s] = GL(dk, (G,))
                couplings += [Produce(f"{a}.W_Q", 2, s, (0,)), Produce(f"{a}.b_Q", 2, s, (0,)),
                              Consume(f"{a}.W_K", 1, s, (0,)), Consume(f"{a}.b_K", 1, s, (0,))]
            if ov:
                s = f"ov{l}"
                sites[s] = GL(dv, (G,))
                couplings += [Produce(f"{a}.W_V", 1, s, (0,)), Produce(f"{a}.b_V", 1, s, (0,)),
                              Consume(f"{a}.W_O", 3, s, (1,))]
        else:
            if heads:
                sites[f"heads{l}"] = Permutation(H)
                couplings += [Produce(f"{a}.{w}", 0, f"heads{l}") for w in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V")]
                couplings.append(Produce(f"{a}.W_O", 1, f"heads{l}"))
            if qk:
                s = f"qk{l}"
                sites[s] = GL(dk, (H,))
                couplings += [Produce(f"{a}.W_Q", 1, s, (0,)), Produce(f"{a}.b_Q", 1, s, (0,)),
                              Consume(f"{a}.W_K", 1, s, (0,)), Consume(f"{a}.b_K", 1, s, (0,))]
            if ov:
                s = f"ov{l}"
                sites[s] = GL(dv, (H,))
                couplings += [Produce(f"{a}.W_V", 1, s, (0,)), Produce(f"{a}.b_V", 1, s, (0,)),
                              Consume(f"{a}.W_O", 2, s, (1,))]
        if key_shift:
            sites[f"key_shift{l}"] = Translation((G, dk))
            couplings.append(Translate(f"{a}.b_K", f"key_shift{l}"))
        if mlp:
            s = f"mlp{l}"
            group = _activations.default_group(act, m) if mlp_group is None else mlp_group(m)
            if not _activations.admits(act, group) and not unsafe:
                raise ValueError(
                    f"site {s!r}: activation {model.activation!r} does not admit {group!r} "
                    f"(sigma(g z) != g sigma(z)); admitted: "
                    f"{[c.__name__ for c in _activations.ADMITS[_activations.activation_family(act)]]}."
                )
            sites[s] = group
            couplings += [Produce(f"{p}.W_in", 0, s), Produce(f"{p}.b_in", 0, s), Consume(f"{p}.W_out", 1, s)]
        if stream:
            couplings += [
                Consume(f"{a}.W_Q", 3 if model.grouped else 2, "stream"), Consume(f"{a}.W_K", 2, "stream"),
                Consume(f"{a}.W_V", 2, "stream"), Produce(f"{a}.W_O", 0, "stream"),
                Produce(f"{a}.b_O", 0, "stream"), Consume(f"{p}.W_in", 1, "stream"),
                Produce(f"{p}.W_out", 0, "stream"), Produce(f"{p}.b_out", 0, "stream"),
            ]
    if stream:
        sites["stream"] = Orthogonal(d) if rotation else Permutation(d)
        if not rotation:  # gains and biases move with their coordinates
            for path, norm in model.norms():
                couplings += [Produce(f"{path}.{w}", 0, "stream") for w in ("weight", "bias")
                              if getattr(norm, w) is not None]
        # the token embedding writes the stream; when tied it also reads it, which for an
        # orthogonal Q is the same transformation (Q^{-T} = Q): one coupling does both
        couplings.append(Produce("token_embedding", 1, "stream"))
        if model.position_embedding is not None:
            couplings.append(Produce("position_embedding", 1, "stream"))
        if model.unembedding == "untied":
            couplings.append(Consume("unembed", 1, "stream"))
    return Gauge(sites, couplings, model)


@derive_gauge.register(Transformer)
def _(model: Transformer, **kwargs: Any) -> Gauge:
    return transformer_gauge(model, **kwargs)
