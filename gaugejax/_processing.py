"""Weight processing as gauge fixing (MATH.md S14-S17).

TransformerLens-style weight processing (`fold_ln`, `center_writing_weights`,
`refactor_factored_attn_matrices`) and SliceGPT/QuaRot-style preparation for rotations
are, in gauge language, choices of a point on an orbit, or changes of parametrisation
that keep the function and *enlarge* the gauge group:

1. [`gaugejax.fold_norm_gains`][]: a pre-norm's gain $\\gamma$ and bias $\\beta$ move into the
   linear maps that read the norm, $W \\mapsto W\\,\\mathrm{diag}(\\gamma)$, $b \\mapsto b + W\\beta$.
2. [`gaugejax.center_writing_weights`][]: every weight that writes the residual stream is
   projected onto the mean-zero subspace (the stream is only ever read through
   LayerNorms, which remove the mean).
3. [`gaugejax.layernorm_to_rmsnorm`][]: on a centered stream LayerNorm *is* RMSNorm; after
   1-3 every norm is a scale-free RMSNorm and residual rotations $O(d)$ are exact (S17).
4. [`gaugejax.fold_value_biases`][]: softmax rows sum to one, so $W_O b_V$ is a constant
   that moves into $b_O$.
5. [`gaugejax.balance_attention`][]: gauge fixing of $GL(d_k)^H$, $GL(d_v)^H$ and the key
   shift: $b_K = 0$ and, per head, the SVD-balanced factors of $W_Q^T W_K$ and $W_O W_V$
   (the minimum-norm point of the orbit, where the moment map vanishes).

Every step returns a new model and preserves the function exactly (up to rounding);
[`gaugejax.process_weights`][] runs them in order and reports the error of each.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from .nn._transformer import Norm, Transformer


_HIGHEST = jax.lax.Precision.HIGHEST


def _check_model(model: Any, what: str) -> Transformer:
    if not isinstance(model, Transformer):
        raise TypeError(f"{what} expects a gaugejax.nn.Transformer, got {type(model).__name__}.")
    if type(model) is not Transformer:  # as transformer_gauge: each step assumes its forward pass
        raise TypeError(
            f"{what} processes gaugejax.nn.Transformer itself; got the subclass "
            f"{type(model).__name__}, which may change the forward pass that each step keeps."
        )
    if model.grouped:
        raise ValueError(
            f"{what}: the model uses grouped-query attention (n_kv_heads={model.n_kv_heads}); "
            "weight processing is implemented for the plain multi-head layout only."
        )
    return model


def _with_static(model: Transformer, **fields: Any) -> Transformer:
    """A copy of `model` with static configuration fields replaced (tree_at edits leaves only)."""
    new = copy.copy(model)
    for name, value in fields.items():
        object.__setattr__(new, name, value)
    return new


def _gain_bias(norm: Norm, d: int, dtype: Any) -> tuple[Array, Array]:
    g = jnp.ones((d,), dtype) if norm.weight is None else norm.weight
    b = jnp.zeros((d,), dtype) if norm.bias is None else norm.bias
    return g, b


def _plain(norm: Norm) -> Norm:
    return Norm(None, None, norm.kind, norm.eps)


def _require_pre_norm(model: Transformer, what: str) -> None:
    if model.norm_position != "pre":
        raise ValueError(
            f"{what}: this model is post-norm; its normalised stream is carried by the "
            "residual connection itself, so the norms' gains cannot move into the readers and "
            "the stream's mean is not invisible. Only the per-head steps (fold_value_biases, "
            "balance_attention) apply to post-norm models."
        )


def fold_norm_gains(model: Transformer, *, untie: bool = True) -> Transformer:
    """Fold every pre-norm's gain $\\gamma$ and bias $\\beta$ into the linear maps that read it.

    A reader $W$ of $\\mathrm{N}(x) = \\gamma \\odot n(x) + \\beta$ becomes
    $W\\,\\mathrm{diag}(\\gamma)$ with bias $b + W\\beta$: $W_Q, W_K, W_V$ for `norm1`, $W_{in}$ for
    `norm2`, the unembedding for `final_norm`. The norms are left without gain or bias.

    A tied unembedding cannot absorb the final gain without changing the token
    embedding: with `untie=True` it becomes an explicit (untied) unembedding
    $E\\,\\mathrm{diag}(\\gamma)$, so the function is unchanged; with `untie=False` that case
    raises. The final norm of a model without unembedding and an `embed_norm` have no
    reader to fold into and are left as they are.

    **Arguments:**

    - `model`: a pre-norm [`gaugejax.nn.Transformer`][].
    - `untie`: allow untying a tied unembedding.

    **Returns:** the processed model.
    """
    _check_model(model, "fold_norm_gains")
    _require_pre_norm(model, "fold_norm_gains")
    fn = model.final_norm
    if (model.unembedding == "tied" and not untie and fn is not None
            and (fn.weight is not None or fn.bias is not None)):
        raise ValueError(
            "fold_norm_gains(untie=False): the unembedding is tied to the token embedding, "
            "and folding final_norm's gain into it would change the embedding too. Pass "
            "untie=True to make the unembedding explicit, or keep the final gain."
        )
    return _fold_norm_gains(model)


# The steps' array work as compiled programs: eagerly, each of their dozens of small
# operations compiles on its own (seconds per model).
@eqx.filter_jit
def _fold_norm_gains(model: Transformer) -> Transformer:
    d, dtype = model.d_model, model.token_embedding.dtype
    blocks = []
    for blk in model.blocks:
        g1, b1 = _gain_bias(blk.norm1, d, dtype)
        g2, b2 = _gain_bias(blk.norm2, d, dtype)
        at = blk.attn
        new_at = eqx.tree_at(
            lambda a: (a.W_Q, a.b_Q, a.W_K, a.b_K, a.W_V, a.b_V),
            at,
            (
                at.W_Q * g1[None, None, :], at.b_Q + jnp.einsum("hkd,d->hk", at.W_Q, b1, precision=_HIGHEST),
                at.W_K * g1[None, None, :], at.b_K + jnp.einsum("hkd,d->hk", at.W_K, b1, precision=_HIGHEST),
                at.W_V * g1[None, None, :], at.b_V + jnp.einsum("hvd,d->hv", at.W_V, b1, precision=_HIGHEST),
            ),
        )
        mp = blk.mlp
        new_mp = eqx.tree_at(
            lambda m: (m.W_in, m.b_in),
            mp,
            (mp.W_in * g2[None, :], mp.b_in + jnp.matmul(mp.W_in, b2, precision=_HIGHEST)),
        )
        blocks.append(dataclasses.replace(blk, attn=new_at, mlp=new_mp, norm1=_plain(blk.norm1), norm2=_plain(blk.norm2)))
    new = eqx.tree_at(lambda m: m.blocks, model, tuple(blocks))
    fn = model.final_norm
    trivial = fn is None or (fn.weight is None and fn.bias is None)
    if trivial or model.unembedding == "none":
        return new
    g, b = _gain_bias(fn, d, dtype)
    u = model.unembedding_matrix
    ub = model.unembed_bias if model.unembed_bias is not None else jnp.zeros((u.shape[0],), dtype)
    new_u, new_ub = u * g[None, :], ub + jnp.matmul(u, b, precision=_HIGHEST)
    if model.unembedding == "tied":
        new = _with_static(new, unembedding="untied")
        new = eqx.tree_at(lambda m: m.unembed, new, new_u, is_leaf=lambda x: x is None)
    else:
        new = eqx.tree_at(lambda m: m.unembed, new, new_u)
    new = eqx.tree_at(lambda m: m.unembed_bias, new, new_ub, is_leaf=lambda x: x is None)
    return eqx.tree_at(lambda m: m.final_norm, new, _plain(fn))


def _writers(model: Transformer) -> list[tuple[str, Any, int]]:
    """`(path, getter, stream axis)` for every leaf that writes the residual stream."""
    out = [("token_embedding", lambda m: m.token_embedding, 1)]
    if model.position_embedding is not None:
        out.append(("position_embedding", lambda m: m.position_embedding, 1))
    for i in range(model.n_layers):
        out += [
            (f"blocks[{i}].attn.W_O", lambda m, i=i: m.blocks[i].attn.W_O, 0),
            (f"blocks[{i}].attn.b_O", lambda m, i=i: m.blocks[i].attn.b_O, 0),
            (f"blocks[{i}].mlp.W_out", lambda m, i=i: m.blocks[i].mlp.W_out, 0),
            (f"blocks[{i}].mlp.b_out", lambda m, i=i: m.blocks[i].mlp.b_out, 0),
        ]
    return out


def center_writing_weights(model: Transformer) -> Transformer:
    """Project every weight that writes the residual stream onto the mean-zero subspace,
    $W \\mapsto (I - \\tfrac{1}{d}\\mathbf{1}\\mathbf{1}^T) W$ on its stream axis (embeddings,
    $W_O, b_O, W_{out}, b_{out}$).

    Exact when the stream is read only through LayerNorms (which subtract the mean):
    a pre-LayerNorm model without `embed_norm`. With a tied unembedding, the token
    embedding is also the reader of the final norm's output, which must then be
    mean-free (final norm without gain and bias: run [`gaugejax.fold_norm_gains`][] first,
    which unties).

    **Returns:** the processed model.
    """
    _check_model(model, "center_writing_weights")
    _require_pre_norm(model, "center_writing_weights")
    if model.embed_norm is not None:
        raise ValueError("center_writing_weights: the model has an embed_norm, whose output writes the stream un-centered; not supported.")
    for path, norm in model.norms():
        if norm.kind != "layer":
            raise ValueError(
                f"center_writing_weights: {path} is an RMSNorm, which sees the stream's mean; "
                "centering the writers would change the model (it is exact only when every "
                "reader is a LayerNorm)."
            )
    fn = model.final_norm
    if model.unembedding == "tied" and (fn.weight is not None or fn.bias is not None):
        raise ValueError(
            "center_writing_weights: the unembedding is tied to the token embedding and reads "
            "final_norm's output, which has a gain/bias (so it is not mean-free); centering the "
            "embedding would change the logits. Run gaugejax.fold_norm_gains(model) first "
            "(it unties the unembedding)."
        )
    return _center_writers(model)


@eqx.filter_jit
def _center_writers(model: Transformer) -> Transformer:
    new = model
    for _, get, axis in _writers(model):
        # twice: a vector nearly constant along the stream leaves, after one pass, a
        # rounding residue in its mean (eps times the constant) that is large next to the
        # small centered vector; the second pass removes it (layernorm_to_rmsnorm checks
        # the mean relative to the vector)
        w = get(model)
        w = w - jnp.mean(w, axis=axis, keepdims=True)
        new = eqx.tree_at(get, new, w - jnp.mean(w, axis=axis, keepdims=True))
    return new


def layernorm_to_rmsnorm(model: Transformer, *, rtol: float | None = None) -> Transformer:
    """Replace every LayerNorm by an RMSNorm (same gain, bias and epsilon). On a centered
    stream they are the same function; the stream is centered when every writer is
    (checked: a writer with a vector along the stream axis whose mean exceeds `rtol` times
    that vector's largest entry raises, naming the leaf; default `rtol` 100 machine
    epsilons. Vector by vector, so that one large writer vector cannot hide an
    uncentered small one). Under `jit` the
    check runs with the program (an `equinox` run-time error naming the leaf).

    **Returns:** the processed model.
    """
    _check_model(model, "layernorm_to_rmsnorm")
    _require_pre_norm(model, "layernorm_to_rmsnorm")
    if model.embed_norm is not None:
        raise ValueError("layernorm_to_rmsnorm: the model has an embed_norm; not supported.")
    eps = float(jnp.finfo(model.token_embedding.dtype).eps)
    rtol = 100 * eps if rtol is None else rtol
    writers, error = _writers(model), None
    if _is_concrete(*jax.tree.leaves(model)):
        stats = np.asarray(_writer_stats(model))
        for (path, _, _), ratio in zip(writers, stats):
            if ratio > rtol:
                raise ValueError(
                    f"layernorm_to_rmsnorm: leaf {path!r} writes a non-centered stream (a vector along "
                    f"the stream axis has |mean| = {ratio:.2e} x its largest entry, expected <= "
                    f"{rtol:.2e}); run gaugejax.center_writing_weights(model) first."
                )
    else:  # under a user's `jit`: the same check, raised when the program runs
        bad = _writer_stats(model) > rtol
        messages = [f"layernorm_to_rmsnorm: leaf {path!r} writes a non-centered stream (a vector along the "
                    f"stream axis has |mean| > {rtol:.0e} x its largest entry); run gaugejax.center_writing_weights("
                    "model) first." for path, _, _ in writers]
        error = (jnp.any(bad), jnp.argmax(bad), messages)
    blocks = tuple(
        dataclasses.replace(b, norm1=dataclasses.replace(b.norm1, kind="rms"), norm2=dataclasses.replace(b.norm2, kind="rms"))
        for b in model.blocks
    )
    new = eqx.tree_at(lambda m: m.blocks, model, blocks)
    if model.final_norm is not None:
        new = eqx.tree_at(lambda m: m.final_norm, new, dataclasses.replace(model.final_norm, kind="rms"))
    if error is not None:  # on every array, so that no part of the result escapes the check
        arrays, static = eqx.partition(new, eqx.is_array)
        new = eqx.combine(eqx.branched_error_if(arrays, *error), static)
    return new


@eqx.filter_jit
def _writer_stats(model: Transformer) -> Array:
    """Per stream writer, the largest `|mean| / max |entry|` of its vectors along the
    stream axis (0 for a zero vector)."""

    def worst(w, axis):
        mean = jnp.abs(jnp.mean(w, axis=axis))
        scale = jnp.max(jnp.abs(w), axis=axis)
        return jnp.max(mean / jnp.maximum(scale, jnp.finfo(w.dtype).tiny))

    return jnp.stack([worst(get(model), axis) for _, get, axis in _writers(model)])


def fold_value_biases(model: Transformer) -> Transformer:
    """Move the value biases into the output bias: $b_O \\mapsto b_O + \\sum_h W_O^h b_V^h$,
    $b_V \\mapsto 0$. Exact because each row of attention weights sums to one, at every query
    that attends to some key: every query of a bidirectional model with a real token, and
    every query from the first real token on under a causal mask. A padding query before
    it attends to nothing; only its own output changes, which no real token reads.

    **Returns:** the processed model.
    """
    _check_model(model, "fold_value_biases")
    return _fold_value_biases(model)


@eqx.filter_jit
def _fold_value_biases(model: Transformer) -> Transformer:
    blocks = []
    for blk in model.blocks:
        a = blk.attn
        b_O = a.b_O + jnp.einsum("dhv,hv->d", a.W_O, a.b_V, precision=_HIGHEST)
        blocks.append(dataclasses.replace(blk, attn=dataclasses.replace(a, b_O=b_O, b_V=jnp.zeros_like(a.b_V))))
    return eqx.tree_at(lambda m: m.blocks, model, tuple(blocks))


def _sign_fix(left: Array, right: Array, xp: Any = jnp) -> tuple[Array, Array]:
    """Flip paired columns of `left` (`(..., m, r)`) and rows of `right` (`(..., r, n)`)
    so that each column of `left` has its largest-magnitude entry positive."""
    idx = xp.argmax(xp.abs(left), axis=-2)[..., None, :]
    sign = xp.sign(xp.take_along_axis(left, idx, axis=-2))
    sign = xp.where(sign == 0, xp.ones_like(sign), sign)
    return left * sign, right * xp.swapaxes(sign, -1, -2)


def _is_concrete(*xs: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def balanced_factors(left: Array, right: Array) -> tuple[Array, Array]:
    """The SVD-balanced factorisation of a product `left @ right` (batched), computed from
    the factors: with `left = Q1 R1`, `right^T = Q2 R2` (thin QR) and
    `R1 R2^T = u s v^T`, returns `(Q1 u s^{1/2}, s^{1/2} (Q2 v)^T)` with a sign convention.

    The result depends only on the product (it is canonical on the $GL(r)$ orbit
    `left -> left M^{-1}`, `right -> M right`, ties of singular values aside) and is its
    minimum-norm factorisation: `L^T L = R R^T = diag(s)`.

    Concrete (non-traced) inputs are factorised on the host with NumPy: batched LAPACK
    custom calls inside XLA:CPU programs can stall or deadlock on small machines (see
    `gaugejax/_groups/_linalg.py`), and processing is a one-off host-side step. Under `jax.jit`
    the same algorithm runs with `jax.numpy`. Half-precision factors (bfloat16, float16,
    which neither LAPACK path takes) are factorised in float32 and the result cast back.
    """
    dtype = jnp.result_type(left, right)
    if jnp.finfo(dtype).bits < 32:
        lo, ro = balanced_factors(jnp.asarray(left, jnp.float32), jnp.asarray(right, jnp.float32))
        return lo.astype(dtype), ro.astype(dtype)
    if _is_concrete(left, right):
        a, b = np.asarray(left), np.asarray(right)
        q1, r1 = np.linalg.qr(a)
        q2, r2 = np.linalg.qr(np.swapaxes(b, -1, -2))
        u, s, vt = np.linalg.svd(r1 @ np.swapaxes(r2, -1, -2))
        lu, rvt = _sign_fix(q1 @ u, np.swapaxes(q2 @ np.swapaxes(vt, -1, -2), -1, -2), np)
        root = np.sqrt(s)
        return (jnp.asarray(lu * root[..., None, :], dtype), jnp.asarray(rvt * root[..., :, None], dtype))
    q1, r1 = jnp.linalg.qr(left)
    q2, r2 = jnp.linalg.qr(jnp.swapaxes(right, -1, -2))
    u, s, vt = jnp.linalg.svd(jnp.matmul(r1, jnp.swapaxes(r2, -1, -2), precision=_HIGHEST))
    lu = jnp.matmul(q1, u, precision=_HIGHEST)
    rv = jnp.matmul(q2, jnp.swapaxes(vt, -1, -2), precision=_HIGHEST)
    lu, rvt = _sign_fix(lu, jnp.swapaxes(rv, -1, -2))
    root = jnp.sqrt(s)
    return lu * root[..., None, :], rvt * root[..., :, None]


def head_order(model: Transformer, layer: int) -> Array:
    """The canonical order of a layer's heads: by descending Frobenius norm of the
    bias-augmented $W_{QK} = [W_Q\\,b_Q]^T [W_K\\,b_K]$, ties broken by descending
    $\\|W_O [W_V\\,b_V]\\|_F$ (then by the current index).

    Both norms are computed from the factors ($\\|L R\\|_F^2 = \\mathrm{tr}(L^T L\\,R R^T)$) and are
    invariant under the per-head $GL(d_k)$, $GL(d_v)$ (and, after $b_K = 0$, the key
    shift), so the order is a function of the orbit: `model.blocks[layer]` with its heads
    taken in this order is the same for every point of the
    $(GL(d_k)^H \\times GL(d_v)^H) \\rtimes S_H$ orbit, up to ties.

    **Returns:** an `(H,)` integer permutation (new head `i` is old head `order[i]`).
    """
    _check_model(model, "head_order")
    if not (isinstance(layer, int) and -model.n_layers <= layer < model.n_layers):
        raise ValueError(f"head_order: layer {layer!r} is out of range for a model with {model.n_layers} layers.")
    a = model.blocks[layer].attn
    aq = jnp.concatenate([a.W_Q, a.b_Q[..., None]], axis=-1)  # (H, dk, d+1)
    ak = jnp.concatenate([a.W_K, a.b_K[..., None]], axis=-1)
    av = jnp.concatenate([a.W_V, a.b_V[..., None]], axis=-1)  # (H, dv, d+1)
    wo = jnp.transpose(a.W_O, (1, 0, 2))  # (H, d, dv)
    hi = dict(precision=_HIGHEST)
    qk = jnp.einsum("hij,hji->h", jnp.einsum("hkd,hjd->hkj", aq, aq, **hi), jnp.einsum("hkd,hjd->hjk", ak, ak, **hi), **hi)
    ov = jnp.einsum("hij,hji->h", jnp.einsum("hdv,hdw->hvw", wo, wo, **hi), jnp.einsum("hvd,hwd->hwv", av, av, **hi), **hi)
    if _is_concrete(qk, ov):
        return jnp.asarray(np.lexsort((np.arange(qk.shape[0]), -np.asarray(ov), -np.asarray(qk))))
    return jnp.lexsort((jnp.arange(qk.shape[0]), -ov, -qk))


def _permute_heads(a: Any, order: Array) -> Any:
    take = lambda x, axis: jnp.take(x, order, axis=axis)  # noqa: E731
    return dataclasses.replace(
        a, W_Q=take(a.W_Q, 0), b_Q=take(a.b_Q, 0), W_K=take(a.W_K, 0), b_K=take(a.b_K, 0),
        W_V=take(a.W_V, 0), b_V=take(a.b_V, 0), W_O=take(a.W_O, 1),
    )


def balance_attention(model: Transformer, *, sort_heads: bool = True) -> Transformer:
    """Gauge-fix every head's $GL(d_k)$, $GL(d_v)$ and key shift: $b_K \\mapsto 0$, then the
    SVD-balanced factors of the bias-augmented products
    $[W_Q\\,b_Q]^T [W_K\\,0]$ and $W_O [W_V\\,b_V]$ (see [`gaugejax.balanced_factors`][]);
    then (`sort_heads=True`) fix the head permutations too, by putting each layer's heads
    in the canonical order of [`gaugejax.head_order`][] (descending $\\|W_{QK}\\|_F$, ties by
    descending $\\|W_{OV}\\|_F$).

    The result is canonical (the same for every point of the orbit under these sites,
    heads included, up to ties between singular values or head norms) and balanced: per head
    $W_Q W_Q^T + b_Q b_Q^T = W_K W_K^T$ and $W_V W_V^T + b_V b_V^T = W_O^T W_O$, the
    vanishing of the moment map (Kempf-Ness), i.e. the minimum-norm point of the orbit.
    Needs $d_k, d_v \\le d$. Rotary models keep their $Q/K$ factors (their $GL(d_k)$ is not a
    symmetry); only $V/O$ is balanced.

    **Returns:** the processed model.
    """
    _check_model(model, "balance_attention")
    if model.d_k > model.d_model or model.d_v > model.d_model:
        raise ValueError(f"balance_attention needs d_k, d_v <= d_model; got d_k={model.d_k}, d_v={model.d_v}, d_model={model.d_model}.")
    blocks = []
    for blk in model.blocks:
        a = blk.attn
        W_Q, b_Q, W_K, b_K = a.W_Q, a.b_Q, a.W_K, a.b_K
        if not model.rotary:
            aq = jnp.concatenate([W_Q, b_Q[..., None]], axis=-1)  # (H, dk, d+1)
            ak = jnp.concatenate([W_K, jnp.zeros_like(b_K)[..., None]], axis=-1)
            left, right = balanced_factors(jnp.swapaxes(aq, -1, -2), ak)
            aq = jnp.swapaxes(left, -1, -2)
            W_Q, b_Q, W_K = aq[..., :-1], aq[..., -1], right[..., :-1]
            b_K = jnp.zeros_like(b_K)
        av = jnp.concatenate([a.W_V, a.b_V[..., None]], axis=-1)  # (H, dv, d+1)
        wo = jnp.transpose(a.W_O, (1, 0, 2))  # (H, d, dv)
        wo, av = balanced_factors(wo, av)
        new_a = dataclasses.replace(
            a, W_Q=W_Q, b_Q=b_Q, W_K=W_K, b_K=b_K, W_V=av[..., :-1], b_V=av[..., -1],
            W_O=jnp.transpose(wo, (1, 0, 2)),
        )
        blocks.append(dataclasses.replace(blk, attn=new_a))
    new = eqx.tree_at(lambda m: m.blocks, model, tuple(blocks))
    if not sort_heads:
        return new
    blocks = tuple(dataclasses.replace(b, attn=_permute_heads(b.attn, head_order(new, i)))
                   for i, b in enumerate(new.blocks))
    return eqx.tree_at(lambda m: m.blocks, new, blocks)


@dataclasses.dataclass(frozen=True)
class ProcessingReport:
    """Per-step function errors of [`gaugejax.process_weights`][].

    **Fields:**

    - `dtype`: the parameters' dtype.
    - `steps`: `[(step name, max relative error of the output vs the unprocessed model)]`.
    - `eps`: the dtype's machine epsilon.
    """

    dtype: str
    steps: list[tuple[str, float]]
    eps: float

    @property
    def max_rel_error(self) -> float:
        return max((e for _, e in self.steps), default=0.0)

    def __str__(self) -> str:
        rows = "".join(f"\n  {name}: {err:.2e} ({err / self.eps:.1f} eps)" for name, err in self.steps)
        return f"weight processing ({self.dtype}), max rel. error vs the original:{rows}"


def _rel_error(a: Array, b: Array, mask: Array | None = None) -> float:
    if mask is not None:  # the real tokens' outputs (a padding position's is nobody's)
        a, b = a[mask], b[mask]
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def process_weights(
    model: Transformer,
    tokens: Int[Array, "batch n"] | None = None,
    mask: Bool[Array, "batch n"] | None = None,
    *,
    untie: bool = True,
    balance: bool = True,
) -> Transformer | tuple[Transformer, ProcessingReport]:
    """All the processing steps that apply to `model`, in order.

    Pre-norm models: [`gaugejax.fold_norm_gains`][], then for LayerNorm models
    [`gaugejax.center_writing_weights`][] and [`gaugejax.layernorm_to_rmsnorm`][] (after which
    every norm is a scale-free RMSNorm and [`gaugejax.transformer_gauge`][] includes the
    residual rotation), then [`gaugejax.fold_value_biases`][] and
    [`gaugejax.balance_attention`][] (which also sorts the heads, see
    [`gaugejax.head_order`][]). Post-norm models get the last two only: a post-norm's
    gain acts on the stream the residual connection carries on, so it cannot be folded
    into the next layer's readers (the pre-norm steps raise a `ValueError` saying so).

    **Arguments:**

    - `model`: a [`gaugejax.nn.Transformer`][].
    - `tokens`, `mask`: optional `(batch, n)` inputs; when given, the output error of each
      step against the original model is measured (at the real tokens, where `mask` is
      True) and returned.
    - `untie`: passed to [`gaugejax.fold_norm_gains`][].
    - `balance`: run [`gaugejax.balance_attention`][].

    **Returns:** the processed model, or `(model, ProcessingReport)` when `tokens` is given.
    """
    _check_model(model, "process_weights")
    if tokens is None and mask is not None:
        raise ValueError("process_weights: `mask` is given without `tokens`; it only marks the real tokens of `tokens`.")
    if tokens is not None and not _is_concrete(*jax.tree.leaves(model), tokens):
        raise ValueError(
            "process_weights: with `tokens` it measures each step's error on the host, eagerly; "
            "call it outside `jit`, or without `tokens` (the steps themselves work under `jit`)."
        )
    if tokens is not None and jnp.ndim(tokens) != 2:
        raise ValueError(f"process_weights: `tokens` must be a batch of shape (batch, n), got shape {jnp.shape(tokens)}.")
    steps = []
    if model.norm_position == "pre":
        steps.append(("fold_norm_gains", lambda m: fold_norm_gains(m, untie=untie)))
        if model.embed_norm is None and all(n.kind == "layer" for _, n in model.norms()):
            steps += [("center_writing_weights", center_writing_weights), ("layernorm_to_rmsnorm", layernorm_to_rmsnorm)]
    steps.append(("fold_value_biases", fold_value_biases))
    if balance:
        steps.append(("balance_attention", balance_attention))
    fwd = None
    if tokens is not None:
        fwd = eqx.filter_jit(lambda m, t, k: jax.vmap(m)(t, k) if k is not None else jax.vmap(m)(t))
        y0 = fwd(model, tokens, mask)
    errors = []
    new = model
    for name, step in steps:
        new = step(new)
        if fwd is not None:
            errors.append((name, _rel_error(fwd(new, tokens, mask), y0, mask)))
    if fwd is None:
        return new
    dt = model.token_embedding.dtype
    return new, ProcessingReport(jnp.dtype(dt).name, errors, float(jnp.finfo(dt).eps))
