"""One registry of (model, gauge) cases drives the law, invariance, jit, vmap, grad and
dtype tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import gaugejax as gj


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Any, Any], tuple[Any, gj.Gauge, Callable, Any]]  # (key, dtype) -> (params, gauge, fn, x)


def _mlp_case(activation, group=None, sizes=(5, 7, 6, 3)):
    def build(key, dtype):
        km, kx = jax.random.split(key)
        model = gj.nn.MLP(sizes, activation, key=km, dtype=dtype)
        gauge = gj.derive_gauge(model, group=group)
        x = jax.random.normal(kx, (11, sizes[0]), dtype)
        return model, gauge, lambda m, x: m(x), x

    return build


def _eqx_mlp(key, dtype):
    km, kx = jax.random.split(key)
    model = eqx.nn.MLP(4, 3, 6, 2, activation=jnp.tanh, key=km, dtype=dtype)
    gauge = gj.derive_gauge(model)
    x = jax.random.normal(kx, (9, 4), dtype)
    return model, gauge, lambda m, x: jax.vmap(m)(x), x


def _pairs(key, dtype):
    k = jax.random.split(key, 5)
    params = [
        (jax.random.normal(k[0], (6, 4), dtype), jax.random.normal(k[1], (6,), dtype)),
        (jax.random.normal(k[2], (3, 6), dtype), jax.random.normal(k[3], (3,), dtype)),
    ]
    gauge = gj.feedforward_gauge(params, jax.nn.leaky_relu)

    def fn(p, x):
        h = jax.nn.leaky_relu(x @ p[0][0].T + p[0][1][None])
        return h @ p[1][0].T + p[1][1][None]

    return params, gauge, fn, jax.random.normal(k[4], (8, 4), dtype)


def _flax_dict(key, dtype):
    k = jax.random.split(key, 7)
    params = {"params": {
        "Dense_0": {"kernel": jax.random.normal(k[0], (4, 6), dtype), "bias": jax.random.normal(k[1], (6,), dtype)},
        "Dense_1": {"kernel": jax.random.normal(k[2], (6, 5), dtype), "bias": jax.random.normal(k[3], (5,), dtype)},
        "Dense_2": {"kernel": jax.random.normal(k[4], (5, 2), dtype), "bias": jax.random.normal(k[5], (2,), dtype)},
    }}
    gauge = gj.feedforward_gauge(params, jax.nn.relu)

    def fn(p, x):
        d = p["params"]
        for i in range(3):
            x = x @ d[f"Dense_{i}"]["kernel"] + d[f"Dense_{i}"]["bias"][None]
            if i < 2:
                x = jax.nn.relu(x)
        return x

    return params, gauge, fn, jax.random.normal(k[6], (8, 4), dtype)


def _attention(key, dtype):
    """A toy single attention layer: heads x per-head GL(d_k) x per-head GL(d_v), with a
    translated key bias: the semidirect and affine parts of the engine."""
    H, dk, dv, d = 3, 2, 4, 5
    k = jax.random.split(key, 8)
    params = {
        "WQ": jax.random.normal(k[0], (H, dk, d), dtype), "bQ": jax.random.normal(k[1], (H, dk), dtype),
        "WK": jax.random.normal(k[2], (H, dk, d), dtype), "bK": jax.random.normal(k[3], (H, dk), dtype),
        "WV": jax.random.normal(k[4], (H, dv, d), dtype), "WO": jax.random.normal(k[5], (d, H, dv), dtype),
    }
    sites = {"heads": gj.Permutation(H), "qk": gj.GL(dk, (H,)), "ov": gj.GL(dv, (H,)), "shift": gj.Translation((H, dk))}
    couplings = [
        *(gj.Produce(leaf, 0, "heads") for leaf in ("WQ", "bQ", "WK", "bK", "WV")),
        gj.Produce("WO", 1, "heads"),
        gj.Produce("WQ", 1, "qk", (0,)), gj.Produce("bQ", 1, "qk", (0,)),
        gj.Consume("WK", 1, "qk", (0,)), gj.Consume("bK", 1, "qk", (0,)),
        gj.Produce("WV", 1, "ov", (0,)), gj.Consume("WO", 2, "ov", (1,)),
        gj.Translate("bK", "shift"),
    ]
    gauge = gj.Gauge(sites, couplings, params)

    def fn(p, x):
        q = jnp.einsum("hkd,nd->hnk", p["WQ"], x) + p["bQ"][:, None, :]
        kk = jnp.einsum("hkd,nd->hnk", p["WK"], x) + p["bK"][:, None, :]
        v = jnp.einsum("hvd,nd->hnv", p["WV"], x)
        a = jax.nn.softmax(jnp.einsum("hnk,hmk->hnm", q, kk), axis=-1)
        return jnp.einsum("dhv,hnv->nd", p["WO"], jnp.einsum("hnm,hmv->hnv", a, v))

    return params, gauge, fn, 0.5 * jax.random.normal(k[6], (7, d), dtype)


def _eqx_attention(key, dtype):
    """`equinox.nn.MultiheadAttention` with every bias: the gauge acts on views of the
    projections (heads x width), and the translated key bias is a view too."""
    k = jax.random.split(key, 2)
    mha = eqx.nn.MultiheadAttention(2, 6, use_query_bias=True, use_key_bias=True, use_value_bias=True,
                                    use_output_bias=True, key=k[0], dtype=dtype)
    # equinox initialises biases at zero; draw them so that the key shift moves something
    leaves, treedef = jax.tree.flatten(mha)
    bkeys = jax.random.split(k[1], len(leaves))
    mha = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(bk, x.shape, x.dtype) if eqx.is_array(x) and x.ndim == 1 else x
                                       for x, bk in zip(leaves, bkeys)])
    gauge = gj.multihead_attention_gauge(mha)

    def fn(p, x):
        return p(x, x, x)

    return mha, gauge, fn, 0.5 * jax.random.normal(jax.random.fold_in(key, 7), (5, 6), dtype)


def _rotation(key, dtype):
    """A linear residual map read through a scale-free RMSNorm: O(d) rotations."""
    d = 4
    k = jax.random.split(key, 4)
    params = {"E": jax.random.normal(k[0], (d, 3), dtype), "W": jax.random.normal(k[1], (d, d), dtype),
              "R": jax.random.normal(k[2], (2, d), dtype)}
    gauge = gj.Gauge({"r": gj.Orthogonal(d)}, [
        gj.Produce("E", 0, "r"), gj.Produce("W", 0, "r"), gj.Consume("W", 1, "r"), gj.Consume("R", 1, "r")], params)

    def fn(p, x):
        h = x @ p["E"].T
        h = h / jnp.sqrt(jnp.mean(h**2, axis=-1, keepdims=True))
        h = h + h @ p["W"].T
        h = h / jnp.sqrt(jnp.mean(h**2, axis=-1, keepdims=True))
        return h @ p["R"].T

    return params, gauge, fn, jax.random.normal(k[3], (6, 3), dtype)


def _lattice(key, dtype):
    """A linear ResNet x_{l+1} = (I + h A_l) x_l: links with stream sites (GL) between."""
    d, L, h = 3, 3, 0.25
    k = jax.random.split(key, L + 1)
    params = {"A": [jax.random.normal(k[i], (d, d), dtype) for i in range(L)]}
    sites = {f"s{i}": gj.GL(d) for i in range(1, L)}
    couplings = [gj.Link(f"['A'][{i}]", f"s{i + 1}" if i + 1 < L else None, f"s{i}" if i > 0 else None, h) for i in range(L)]
    gauge = gj.Gauge(sites, couplings, params)

    def fn(p, x):
        for a in p["A"]:
            x = x + h * x @ a.T
        return x

    return params, gauge, fn, jax.random.normal(k[L], (5, d), dtype)


CASES = [
    Case("mlp-relu", _mlp_case(jax.nn.relu)),
    Case("mlp-relu-diagonal", _mlp_case(jax.nn.relu, gj.PositiveDiagonal)),
    Case("mlp-tanh", _mlp_case(jnp.tanh)),
    Case("mlp-tanh-signflip", _mlp_case(jnp.tanh, gj.SignFlip)),
    Case("mlp-gelu", _mlp_case(jax.nn.gelu)),
    Case("mlp-linear", _mlp_case(gj.identity)),
    Case("mlp-linear-orthogonal", _mlp_case(gj.identity, gj.Orthogonal)),
    Case("eqx-mlp-tanh", _eqx_mlp),
    Case("pairs-leaky", _pairs),
    Case("flax-relu", _flax_dict),
    Case("attention", _attention),
    Case("eqx-attention-biases", _eqx_attention),
    Case("rmsnorm-rotation", _rotation),
    Case("linear-resnet-links", _lattice),
]
CASE_IDS = [c.name for c in CASES]


def tree_max_abs_diff(a, b) -> float:
    la = [x for x in jax.tree.leaves(a) if eqx.is_array(x)]
    lb = [x for x in jax.tree.leaves(b) if eqx.is_array(x)]
    assert len(la) == len(lb)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb))


def tree_max_abs(a) -> float:
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(a) if eqx.is_array(x))


def rel(a, b) -> float:
    return tree_max_abs_diff(a, b) / tree_max_abs(b)


# Exact discrete symmetries and near-identity continuous ones; the engine's
# group laws are algebraic identities and meet the exact ones.
LAW_RTOL = {jnp.float32: 1e-5, jnp.float64: 1e-12}
INVARIANCE_RTOL = {jnp.float32: 1e-5, jnp.float64: 1e-10}


def fd_check(fn, params, key, rtol=1e-6):
    """Central differences of `fn` along a random direction against `jax.grad` and `jax.jvp`."""
    # zero entries stay zero: at a degenerate neuron the balanced point is not continuous
    # (any weight on its empty side gives it a balanced point of its own)
    direction = jax.tree.map(lambda a: jnp.where(a != 0, jax.random.normal(key, a.shape, a.dtype), 0)
                             if eqx.is_inexact_array(a) else None, params)
    h = 1e-6

    @eqx.filter_jit  # one program (eagerly, every operation would compile on its own)
    def derivatives(params, direction):
        plus = eqx.apply_updates(params, jax.tree.map(lambda d: h * d, direction))
        minus = eqx.apply_updates(params, jax.tree.map(lambda d: -h * d, direction))
        fd = (fn(plus) - fn(minus)) / (2 * h)
        grad = eqx.filter_grad(fn)(params)
        by_grad = sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
        _, by_jvp = eqx.filter_jvp(fn, (params,), (direction,))
        return fd, by_grad, by_jvp

    fd, by_grad, by_jvp = (float(v) for v in derivatives(params, direction))
    assert abs(by_grad - fd) <= rtol * abs(fd), (by_grad, fd)
    assert abs(by_jvp - by_grad) <= 1e-10 * abs(by_grad)


def linear_readout(key, params):
    """A random linear function of the float leaves of trees shaped like `params`."""
    w = jax.tree.map(lambda a: jax.random.normal(key, a.shape, a.dtype) if eqx.is_inexact_array(a) else None, params)

    def fn(p):
        return sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(eqx.filter(p, eqx.is_inexact_array)), jax.tree.leaves(w)))
    return fn
