"""A reference transformer whose per-head weights keep a heads axis.

Every weight is laid out so that each hidden space of MATH.md ("Transformers") is one
axis of a leaf: the heads axis (permuted by $S_H$), the per-head query/key axis
($GL(d_k)$), the per-head value axis ($GL(d_v)$), the MLP hidden axis and the residual
stream axis ($O(d)$ under a scale-free RMSNorm). [`gaugejax.transformer_gauge`][] reads the
gauge off this layout; nothing here knows about gauges.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._init import build


_HIGHEST = jax.lax.Precision.HIGHEST

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # BERT's erf GELU
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
#: the activation functions as gaugejax's activation registry knows them (for the MLP site)
ACTIVATION_FNS = {"gelu": jax.nn.gelu, "gelu_tanh": jax.nn.gelu, "relu": jax.nn.relu}


def _einsum(spec: str, *xs: Array) -> Array:
    return jnp.einsum(spec, *xs, precision=_HIGHEST)


class Norm(eqx.Module):
    """LayerNorm (`kind="layer"`) or RMSNorm (`kind="rms"`) over the last axis, with an
    optional gain `weight` and an optional `bias`:
    $\\mathrm{N}(x) = \\gamma \\odot \\hat x / \\sqrt{\\mathrm{mean}(\\hat x^2) + \\epsilon} + \\beta$,
    $\\hat x = x - \\mathrm{mean}(x)$ for LayerNorm and $\\hat x = x$ for RMSNorm."""

    weight: Float[Array, " d"] | None
    bias: Float[Array, " d"] | None
    kind: str = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        if self.kind == "layer":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + jnp.asarray(self.eps, x.dtype))
        if self.weight is not None:
            x = x * self.weight[None, :]
        if self.bias is not None:
            x = x + self.bias[None, :]
        return x


def _masked_softmax(scores: Array, allowed: Array) -> Array:
    """Softmax over the allowed keys (the last axis). A query with no allowed key (a
    padding position before the first real token under a causal mask) attends to nothing:
    a zero row, not the NaN of a softmax over $-\\infty$ alone, which the next layer would
    spread to every position (and a NaN gradient with it).

    The mask is an additive $-\\infty$ fill, so that a key-bias shift stays visibly constant
    along the keys (gauge inference follows it through the softmax); such a query gets no
    fill, a finite softmax, and then the zero row."""
    some = jnp.any(allowed, axis=-1, keepdims=True)
    fill = jnp.where(allowed | ~some, 0.0, -jnp.inf).astype(scores.dtype)
    return jnp.where(allowed, jax.nn.softmax(scores + fill, axis=-1), 0)


def rotary(x: Float[Array, "heads n k"], base: float = 10000.0) -> Float[Array, "heads n k"]:
    """Rotary position embedding (RoFormer): pairs `(2i, 2i+1)` of each query/key vector at
    position $p$ rotated by the angle $p\\,\\mathrm{base}^{-2i/d_k}$."""
    n, dk = x.shape[-2], x.shape[-1]
    # angles in float32 at least: in bfloat16 the positions themselves round (256 and 257
    # collide) and the angles lose all precision
    wide = x.dtype if jnp.finfo(x.dtype).bits >= 32 else jnp.float32
    freq = base ** (-jnp.arange(0, dk, 2, dtype=wide) / jnp.asarray(dk, wide))
    angle = jnp.arange(n, dtype=wide)[:, None] * freq[None, :]
    cos, sin = jnp.cos(angle)[None].astype(x.dtype), jnp.sin(angle)[None].astype(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return out.reshape(x.shape)


class Attention(eqx.Module):
    """Multi-head attention with per-head weights stacked on a leading heads axis:
    `W_Q, W_K: (H, d_k, d)`, `W_V: (H, d_v, d)`, `W_O: (d, H, d_v)`; biases `b_Q, b_K:
    (H, d_k)`, `b_V: (H, d_v)`, `b_O: (d,)`.

    Grouped-query attention ($G$ key/value heads, each shared by $r = H/G$ query heads):
    `W_Q: (G, r, d_k, d)`, `b_Q: (G, r, d_k)`, `W_K: (G, d_k, d)`, `W_V: (G, d_v, d)`,
    `W_O: (d, G, r, d_v)`."""

    W_Q: Float[Array, "heads dk d"]
    b_Q: Float[Array, "heads dk"]
    W_K: Float[Array, "heads dk d"]
    b_K: Float[Array, "heads dk"]
    W_V: Float[Array, "heads dv d"]
    b_V: Float[Array, "heads dv"]
    W_O: Float[Array, "d heads dv"]
    b_O: Float[Array, " d"]

    def __call__(
        self, x: Float[Array, "n d"], allowed: Bool[Array, "n n"], use_rotary: bool
    ) -> Float[Array, "n d"]:
        if self.W_Q.ndim == 4:  # grouped-query attention: queries (groups, per group, dk, d)
            return self._grouped(x, allowed, use_rotary)
        q = _einsum("hkd,nd->hnk", self.W_Q, x) + self.b_Q[:, None, :]
        k = _einsum("hkd,nd->hnk", self.W_K, x) + self.b_K[:, None, :]
        v = _einsum("hvd,nd->hnv", self.W_V, x) + self.b_V[:, None, :]
        if use_rotary:
            q, k = rotary(q), rotary(k)
        scores = _einsum("hnk,hmk->hnm", q, k) / jnp.asarray(math.sqrt(q.shape[-1]), x.dtype)
        a = _masked_softmax(scores, allowed[None])
        z = _einsum("hnm,hmv->hnv", a, v)
        return _einsum("dhv,hnv->nd", self.W_O, z) + self.b_O[None, :]

    def _grouped(self, x, allowed, use_rotary):
        q = _einsum("grkd,nd->grnk", self.W_Q, x) + self.b_Q[:, :, None, :]
        k = _einsum("gkd,nd->gnk", self.W_K, x) + self.b_K[:, None, :]
        v = _einsum("gvd,nd->gnv", self.W_V, x) + self.b_V[:, None, :]
        if use_rotary:
            q, k = rotary(q), rotary(k)
        scores = _einsum("grnk,gmk->grnm", q, k) / jnp.asarray(math.sqrt(q.shape[-1]), x.dtype)
        a = _masked_softmax(scores, allowed[None, None])
        z = _einsum("grnm,gmv->grnv", a, v)
        return _einsum("dgrv,grnv->nd", self.W_O, z) + self.b_O[None, :]


class MLPBlock(eqx.Module):
    """$W_{\\mathrm{out}}\\,\\sigma(W_{\\mathrm{in}} x + b_{\\mathrm{in}}) + b_{\\mathrm{out}}$,
    weights `(out, in)`."""

    W_in: Float[Array, "m d"]
    b_in: Float[Array, " m"]
    W_out: Float[Array, "d m"]
    b_out: Float[Array, " d"]
    activation: str = eqx.field(static=True)

    def __call__(self, x: Float[Array, "n d"]) -> Float[Array, "n d"]:
        h = ACTIVATIONS[self.activation](_einsum("md,nd->nm", self.W_in, x) + self.b_in[None, :])
        return _einsum("dm,nm->nd", self.W_out, h) + self.b_out[None, :]


class Block(eqx.Module):
    """One layer: pre-norm `x + MHA(N1 x)`, `x + MLP(N2 x)`, or post-norm
    `N1(x + MHA x)`, `N2(x + MLP x)`."""

    attn: Attention
    mlp: MLPBlock
    norm1: Norm
    norm2: Norm


class Transformer(eqx.Module):
    """A transformer (encoder or decoder) with per-head weights on a heads axis.

    Token and (learnt) position embeddings write the residual stream; each block reads it
    through a norm (pre-norm) or normalises it after the residual add (post-norm); the
    unembedding is tied to the token embedding, separate, or absent (the model then
    returns the final residual stream, as an encoder does). Attention is causal or
    bidirectional, with an optional key padding `mask`. Matrix products use
    `Precision.HIGHEST`.

    Weights are drawn at random, biases and norm gains included (gains near 1, biases
    small), so that every symmetry and every processing step is exercised; load real
    weights with [`gaugejax.load_minilm`][] or `equinox.tree_at`.

    **Arguments:**

    - `vocab_size`, `d_model`, `n_layers`, `n_heads`, `d_mlp`, `max_len`: sizes.
    - `d_k`, `d_v`: per-head query/key and value widths (default `d_model // n_heads`,
      which must then divide).
    - `activation`: `"gelu"` (erf), `"gelu_tanh"` or `"relu"`.
    - `norm`: `"layer"` (LayerNorm) or `"rms"` (RMSNorm).
    - `norm_gain`: whether norms have a gain (and, for LayerNorm, a bias).
    - `norm_position`: `"pre"` or `"post"`.
    - `embed_norm`: a norm right after the embeddings (BERT).
    - `causal`: causal (decoder) or bidirectional (encoder) attention.
    - `unembedding`: `"tied"`, `"untied"` or `"none"`.
    - `positional`: learnt absolute position embeddings.
    - `rotary`: rotary position embeddings on queries and keys (needs an even `d_k`).
    - `n_kv_heads`: grouped-query attention with this many key/value heads, each shared by
      `n_heads // n_kv_heads` query heads (default `None`: one key/value head per query
      head, the plain multi-head layout).
    - `eps`: the norms' epsilon.
    - `key`: a JAX PRNG key (keyword-only); `dtype`: parameter dtype.
    """

    token_embedding: Float[Array, "vocab d"]
    position_embedding: Float[Array, "ctx d"] | None
    embed_norm: Norm | None
    blocks: tuple[Block, ...]
    final_norm: Norm | None
    unembed: Float[Array, "vocab d"] | None
    unembed_bias: Float[Array, " vocab"] | None
    n_heads: int = eqx.field(static=True)
    norm_position: str = eqx.field(static=True)
    causal: bool = eqx.field(static=True)
    unembedding: str = eqx.field(static=True)
    rotary: bool = eqx.field(static=True)
    n_kv_heads: int | None = eqx.field(static=True, default=None)

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_mlp: int,
        max_len: int,
        *,
        d_k: int | None = None,
        d_v: int | None = None,
        activation: Literal["gelu", "gelu_tanh", "relu"] = "gelu",
        norm: Literal["layer", "rms"] = "layer",
        norm_gain: bool = True,
        norm_position: Literal["pre", "post"] = "pre",
        embed_norm: bool = False,
        causal: bool = True,
        unembedding: Literal["tied", "untied", "none"] = "tied",
        positional: bool = True,
        rotary: bool = False,
        n_kv_heads: int | None = None,
        eps: float = 1e-5,
        key: PRNGKeyArray,
        dtype: Any = None,
    ):
        for name, val in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers),
                          ("n_heads", n_heads), ("d_mlp", d_mlp), ("max_len", max_len)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {val!r}.")
        if (d_k is None or d_v is None) and d_model % n_heads:
            raise ValueError(
                f"n_heads={n_heads} does not divide d_model={d_model}; pass d_k and d_v "
                "explicitly or choose a head count that divides the width."
            )
        d_k = d_model // n_heads if d_k is None else d_k
        d_v = d_model // n_heads if d_v is None else d_v
        for name, val in (("d_k", d_k), ("d_v", d_v)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {val!r}.")
        if not (isinstance(eps, (int, float, np.floating)) and eps > 0):
            raise ValueError(f"`eps` (the norms' epsilon) must be a positive number, got {eps!r}.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
        if norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}.")
        if norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position must be 'pre' or 'post', got {norm_position!r}.")
        if unembedding not in ("tied", "untied", "none"):
            raise ValueError(f"unembedding must be 'tied', 'untied' or 'none', got {unembedding!r}.")
        if n_kv_heads is not None and (not isinstance(n_kv_heads, int) or n_kv_heads <= 0 or n_heads % n_kv_heads):
            raise ValueError(
                f"n_kv_heads={n_kv_heads!r} must be a positive integer dividing n_heads={n_heads} "
                "(each key/value head is shared by n_heads // n_kv_heads query heads)."
            )
        if n_kv_heads == n_heads:
            n_kv_heads = None
        if rotary and d_k % 2:
            raise ValueError(f"rotary embeddings rotate pairs of query/key features; d_k={d_k} is odd.")
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        d, H = d_model, n_heads
        s = 1.0 / math.sqrt(d)
        G = H if n_kv_heads is None else n_kv_heads
        qh = (H,) if n_kv_heads is None else (G, H // G)  # the query heads' leading axes

        def weights(draw):
            def make_norm():
                if not norm_gain:
                    return Norm(None, None, norm, float(eps))
                w = 1.0 + draw((d,), 0.2)
                b = draw((d,), 0.1) if norm == "layer" else None
                return Norm(w, b, norm, float(eps))

            blocks = []
            for _ in range(n_layers):
                attn = Attention(
                    W_Q=draw((*qh, d_k, d), s), b_Q=draw((*qh, d_k), 0.1),
                    W_K=draw((G, d_k, d), s), b_K=draw((G, d_k), 0.1),
                    W_V=draw((G, d_v, d), s), b_V=draw((G, d_v), 0.1),
                    W_O=draw((d, *qh, d_v), 1.0 / math.sqrt(H * d_v)),
                    b_O=draw((d,), 0.1),
                )
                mlp = MLPBlock(
                    W_in=draw((d_mlp, d), s), b_in=draw((d_mlp,), 0.1),
                    W_out=draw((d, d_mlp), 1.0 / math.sqrt(d_mlp)),
                    b_out=draw((d,), 0.1), activation=activation,
                )
                blocks.append(Block(attn, mlp, make_norm(), make_norm()))
            token = draw((vocab_size, d), 1.0)
            position = draw((max_len, d), 0.5) if positional else None
            embed_norm_ = make_norm() if embed_norm else None
            final = make_norm() if norm_position == "pre" else None
            unembed = draw((vocab_size, d), s) if unembedding == "untied" else None
            unembed_bias = draw((vocab_size,), 0.1) if unembedding != "none" else None
            return tuple(blocks), token, position, embed_norm_, final, unembed, unembed_bias

        # every weight from one draw (one compilation rather than one per weight shape)
        (self.blocks, self.token_embedding, self.position_embedding, self.embed_norm,
         self.final_norm, self.unembed, self.unembed_bias) = build(key, dtype, weights)
        self.n_heads = H
        self.norm_position = norm_position
        self.causal = bool(causal)
        self.unembedding = unembedding
        self.rotary = bool(rotary)
        self.n_kv_heads = n_kv_heads

    # -- configuration read off the weights ------------------------------------------------
    @property
    def d_model(self) -> int:
        return self.token_embedding.shape[1]

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_k(self) -> int:
        return self.blocks[0].attn.W_Q.shape[-2]

    @property
    def grouped(self) -> bool:
        """Whether the model uses grouped-query attention (`n_kv_heads` < `n_heads`)."""
        return self.n_kv_heads is not None

    @property
    def d_v(self) -> int:
        return self.blocks[0].attn.W_V.shape[1]

    @property
    def d_mlp(self) -> int:
        return self.blocks[0].mlp.W_in.shape[0]

    @property
    def activation(self) -> str:
        return self.blocks[0].mlp.activation

    def norms(self) -> list[tuple[str, Norm]]:
        """Every norm with its attribute path, e.g. `("blocks[0].norm1", norm)`."""
        out = [("embed_norm", self.embed_norm)] if self.embed_norm is not None else []
        for i, b in enumerate(self.blocks):
            out += [(f"blocks[{i}].norm1", b.norm1), (f"blocks[{i}].norm2", b.norm2)]
        if self.final_norm is not None:
            out.append(("final_norm", self.final_norm))
        return out

    @property
    def unembedding_matrix(self) -> Float[Array, "vocab d"] | None:
        """The matrix the logits read the stream with (the token embedding when tied)."""
        if self.unembedding == "tied":
            return self.token_embedding
        return self.unembed

    # -- forward -----------------------------------------------------------------------
    def embed(self, tokens: Int[Array, " n"]) -> Float[Array, "n d"]:
        """The residual stream after the embeddings (and `embed_norm`)."""
        vocab = self.token_embedding.shape[0]
        # jnp.take would wrap a negative id and fill NaN past the vocabulary
        tokens = eqx.error_if(jnp.asarray(tokens), (tokens < 0) | (tokens >= vocab),
                              f"`tokens`: token ids must lie in [0, vocab_size) = [0, {vocab}).")
        x = jnp.take(self.token_embedding, tokens, axis=0)
        if self.position_embedding is not None:
            n = tokens.shape[0]
            if n > self.position_embedding.shape[0]:
                raise ValueError(
                    f"sequence of length {n} is longer than max_len={self.position_embedding.shape[0]}."
                )
            x = x + self.position_embedding[:n]
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return x

    def _allowed(self, n: int, mask: Bool[Array, " n"] | None) -> Bool[Array, "n n"]:
        allowed = jnp.ones((n, n), bool)
        if self.causal:
            allowed = jnp.tril(allowed)
        if mask is not None:
            allowed = allowed & mask[None, :]
        return allowed

    def hidden(self, tokens: Int[Array, " n"], mask: Bool[Array, " n"] | None = None) -> Float[Array, "n d"]:
        """The final residual stream (after the final norm of a pre-norm model)."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"`tokens` must be one sequence of shape (n,), got shape {tokens.shape}; vmap over a batch.")
        if mask is not None:
            mask = jnp.asarray(mask)
            if mask.shape != tokens.shape or mask.dtype != jnp.bool_:
                raise ValueError(
                    f"`mask` must be a boolean array of the tokens' shape {tokens.shape} (True at real "
                    f"tokens), got {mask.dtype} of shape {mask.shape}."
                )
        x = self.embed(tokens)
        allowed = self._allowed(tokens.shape[0], mask)
        for b in self.blocks:
            if self.norm_position == "pre":
                x = x + b.attn(b.norm1(x), allowed, self.rotary)
                x = x + b.mlp(b.norm2(x))
            else:
                x = b.norm1(x + b.attn(x, allowed, self.rotary))
                x = b.norm2(x + b.mlp(x))
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x

    def __call__(
        self, tokens: Int[Array, " n"], mask: Bool[Array, " n"] | None = None
    ) -> Float[Array, "n out"]:
        """Logits `(n, vocab)`, or the final residual stream `(n, d)` when
        `unembedding="none"`. `mask` marks the real (non-padding) tokens; padding keys are
        never attended to, and a query with no key to attend to (a padding position before
        the first real token under a causal mask) attends to nothing. Token ids outside
        `[0, vocab_size)` raise (an equinox run-time error under `jit`)."""
        x = self.hidden(tokens, mask)
        u = self.unembedding_matrix
        if u is None:
            return x
        out = _einsum("vd,nd->nv", u, x)
        if self.unembed_bias is not None:
            out = out + self.unembed_bias[None, :]
        return out
