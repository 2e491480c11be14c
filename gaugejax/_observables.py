"""Gauge-invariant observables of attention, and orbit dimensions by formula.

Under $W_Q \\mapsto M W_Q$, $W_K \\mapsto M^{-T} W_K$ (S14) the bilinear form
$W_{QK} = W_Q^T W_K$ is invariant; under $W_V \\mapsto N W_V$, $W_O \\mapsto W_O N^{-1}$ (S15)
so is $W_{OV} = W_O W_V$. Both are $d \\times d$ matrices of rank at most $d_k$ / $d_v$, so
they are kept as a [`gaugejax.FactoredMatrix`][] (the two thin factors) and their
singular values and eigenvalues are computed from the factors in $O(d\\,r^2)$.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._groups._linalg import upcast_half
from .nn._transformer import Transformer


_HIGHEST = jax.lax.Precision.HIGHEST


def _mT(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


class FactoredMatrix(eqx.Module):
    """A (batched) low-rank matrix kept as the product `left @ right` of its factors,
    `left: (..., m, r)`, `right: (..., r, n)`, never formed unless asked (`dense()`).

    The factors are not gauge-invariant. For `qk_circuit` and `ov_circuit`, the product
    and everything computed from it are invariant under the per-head $GL$ parts of the
    transformer's gauge (and the key shift and MLP sites); a `heads` permutation reorders
    the per-head results, and a `stream` rotation or permutation $Q$ (the `stream` site:
    $O(d)$, or $S_d$ with `rotation=False`) conjugates the product ($W \\mapsto Q W Q^T$:
    its singular values and eigenvalues are invariant, `dense()` and the singular vectors
    are not).
    """

    left: Float[Array, "*batch m r"]
    right: Float[Array, "*batch r n"]

    def __check_init__(self):
        if self.left.shape[-1] != self.right.shape[-2] or self.left.shape[:-2] != self.right.shape[:-2]:
            raise ValueError(
                f"FactoredMatrix: left {self.left.shape} and right {self.right.shape} do not "
                "chain (expected (..., m, r) and (..., r, n) with the same batch shape)."
            )

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.left.shape[:-1], self.right.shape[-1])

    def dense(self) -> Array:
        """The product as a dense array."""
        return jnp.matmul(self.left, self.right, precision=_HIGHEST)

    def svd(self) -> tuple[Array, Array, Array]:
        """Thin SVD `(U, S, Vh)` of the product (rank-`r` part), from the factors: with
        `left = Q1 R1`, `right^T = Q2 R2`, `U = Q1 u`, `Vh = (Q2 v)^T` where
        `R1 R2^T = u S v^T`. Half precision is computed in float32 (LAPACK has no
        half-precision routines) and cast back."""
        dtype = jnp.result_type(self.left, self.right)
        left, right = upcast_half(self.left), upcast_half(self.right)
        q1, r1 = jnp.linalg.qr(left)
        q2, r2 = jnp.linalg.qr(_mT(right))
        u, s, vt = jnp.linalg.svd(jnp.matmul(r1, _mT(r2), precision=_HIGHEST), full_matrices=False)
        return (
            jnp.matmul(q1, u, precision=_HIGHEST).astype(dtype),
            s.astype(dtype),
            _mT(jnp.matmul(q2, _mT(vt), precision=_HIGHEST)).astype(dtype),
        )

    def singular_values(self) -> Array:
        """The `r` largest singular values, descending."""
        return self.svd()[1]

    def eigenvalues(self) -> Array:
        """The `r` eigenvalues of `right @ left` (`r x r`) for a square product: its nonzero
        eigenvalues are those of `left @ right`, and the rest are zeros (all of them when
        `r > m`: `r - m` zeros at least). Complex (complex64 for half-precision factors,
        computed in float32), sorted by descending magnitude."""
        if self.shape[-1] != self.shape[-2]:
            raise ValueError(f"eigenvalues need a square product, got shape {self.shape}.")
        small = jnp.matmul(upcast_half(self.right), upcast_half(self.left), precision=_HIGHEST)
        ev = jnp.linalg.eigvals(small)
        order = jnp.argsort(-jnp.abs(ev), axis=-1)
        return jnp.take_along_axis(ev, order, axis=-1)

    def frobenius_norm(self) -> Array:
        """$\\|LR\\|_F$ from the factors: $\\sqrt{\\mathrm{tr}((L^TL)(RR^T))}$."""
        gl = jnp.matmul(_mT(self.left), self.left, precision=_HIGHEST)
        gr = jnp.matmul(self.right, _mT(self.right), precision=_HIGHEST)
        return jnp.sqrt(jnp.sum(gl * gr, axis=(-2, -1)))

    @property
    def T(self) -> FactoredMatrix:
        return FactoredMatrix(_mT(self.right), _mT(self.left))


def _layer(model: Transformer, layer: int):
    if not isinstance(model, Transformer):
        raise TypeError(f"expected a gaugejax.nn.Transformer, got {type(model).__name__}.")
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"`layer` must be an integer, got {layer!r}.")
    if not -model.n_layers <= layer < model.n_layers:
        raise ValueError(f"layer {layer} is out of range for a model with {model.n_layers} layers.")
    if model.grouped:
        raise ValueError(
            f"the model uses grouped-query attention (n_kv_heads={model.n_kv_heads}); per-head "
            "circuits are implemented for the plain multi-head layout only."
        )
    return model.blocks[layer].attn


def qk_circuit(model: Transformer, layer: int, *, bias: bool = False) -> FactoredMatrix:
    """Per-head $W_{QK}^h = W_Q^{hT} W_K^h$ of a layer, shape `(H, d, d)`, as a
    [`gaugejax.FactoredMatrix`][]; scores are $x_i^T W_{QK} x_j / \\sqrt{d_k}$ (without
    rotary embeddings; with them the scores rotate queries and keys by position first, and
    $W_{QK}$ is invariant only under the rotation-commuting part of $GL(d_k)$).

    With `bias=True`, the bias-augmented form $[W_Q\\,b_Q]^T [W_K\\,b_K]$ of shape
    `(H, d+1, d+1)` (invariant under $GL(d_k)$ but not under the key shift).
    """
    a = _layer(model, layer)
    wq, wk = a.W_Q, a.W_K
    if bias:
        wq = jnp.concatenate([wq, a.b_Q[..., None]], axis=-1)
        wk = jnp.concatenate([wk, a.b_K[..., None]], axis=-1)
    return FactoredMatrix(_mT(wq), wk)


def ov_circuit(model: Transformer, layer: int) -> FactoredMatrix:
    """Per-head $W_{OV}^h = W_O^h W_V^h$ of a layer, shape `(H, d, d)`, as a
    [`gaugejax.FactoredMatrix`][]: what head $h$ writes to the stream per unit of attention
    to a token."""
    a = _layer(model, layer)
    return FactoredMatrix(jnp.transpose(a.W_O, (1, 0, 2)), a.W_V)


def attention_orbit_dim(n_layers: int, n_heads: int, d_k: int, d_v: int) -> int:
    """The dimension of the attention $GL$ part of the gauge group,
    $L \\cdot H \\cdot (d_k^2 + d_v^2)$ (BERT-base: $12 \\cdot 12 \\cdot (64^2 + 64^2) = 1{,}179{,}648$)."""
    for name, v in (("n_layers", n_layers), ("n_heads", n_heads), ("d_k", d_k), ("d_v", d_v)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"`{name}` must be a non-negative integer, got {v!r}.")
    return n_layers * n_heads * (d_k * d_k + d_v * d_v)


def transformer_orbit_dim(
    model: Transformer, *, qk: bool = True, ov: bool = True, key_shift: bool = True,
    mlp: bool = True, rotation: bool = True,
) -> int:
    """The dimension of a generic orbit of the gauge [`gaugejax.transformer_gauge`][]
    derives for `model`, by formula (with the same switches; families the model does not
    admit count zero): $L H (d_k^2 + d_v^2)$ for attention ($H$ the number of key/value
    heads), $L H d_k$ for key shifts, $L\\,d_{mlp}$ for ReLU MLPs (positive scalings; GELU
    has none), $d(d-1)/2$ for the residual rotation; less the stabiliser of heads wider
    than the stream.

    That stabiliser: a $GL(d_k)$ element fixes the queries and keys when $g - I$ vanishes
    on the span of the query weights and biases (dimension $r_Q = \\min(d_k, r(d + 1))$,
    $r$ query heads per key/value head) and maps into the orthogonal complement of the
    keys' span ($r_K = \\min(d_k, d)$ with the key shift, whose translation absorbs the key
    bias; $\\min(d_k, d + 1)$ without): $(d_k - r_Q)(d_k - r_K)$ dimensions per head,
    zero unless $d_k > d + 1$. Likewise $(d_v - \\min(d_v, d + 1))(d_v - \\min(d_v, r d))$
    for values and outputs. So this equals [`gaugejax.Gauge.orbit_dim`][] (the group's
    dimension) for heads no wider than the stream plus one, and
    [`gaugejax.Gauge.orbit_rank`][] (the measured rank) at generic parameters always.
    Independent of the engine, for comparing with both.
    """
    from ._transformer_gauge import rotation_obstruction

    if not isinstance(model, Transformer):
        raise TypeError(f"transformer_orbit_dim expects a gaugejax.nn.Transformer, got {type(model).__name__}.")
    L, H, dk, dv, d, m = model.n_layers, model.n_heads, model.d_k, model.d_v, model.d_model, model.d_mlp
    r = H // model.n_kv_heads if model.grouped else 1  # query heads per key/value head
    H = model.n_kv_heads if model.grouped else H  # one GL(d_k), GL(d_v), key shift per key/value head
    qk = qk and not model.rotary
    key_shift = key_shift and not model.rotary
    dim = attention_orbit_dim(L, H, dk if qk else 0, dv if ov else 0)
    dim += L * H * dk if key_shift else 0
    dim += L * m if (mlp and model.activation == "relu") else 0
    dim += d * (d - 1) // 2 if (rotation and rotation_obstruction(model) is None) else 0
    if qk:
        dim -= L * H * (dk - min(dk, r * (d + 1))) * (dk - min(dk, d if key_shift else d + 1))
    if ov:
        dim -= L * H * (dv - min(dv, d + 1)) * (dv - min(dv, r * d))
    return dim
