"""Random initial weights of many shapes from one random draw.

Called eagerly, every `jax.random.normal` / `jax.random.uniform` of a new shape is a
compilation of its own (about 0.1-0.3 s each on a CPU), and so is every eager scaling of
the result: a transformer's constructor compiled dozens of programs. Here the constructor
runs twice: once to record the shapes it asks for (no arrays drawn), then with slices of a
single draw of the total size (one compilation per total size), scaled on the host with
NumPy. Under tracing (a constructor `vmap`ped over keys, say) the same slices and scalings
are traced instead, so eager and traced construction give the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray


Draw = Callable[..., Any]


def build(key: PRNGKeyArray, dtype: Any, fn: Callable[[Draw], Any],
          kind: Literal["normal", "uniform"] = "normal") -> Any:
    """`fn(draw)`, where `draw(shape, scale=1.0)` returns `scale` times standard normals
    (`kind="normal"`) or uniforms on $[-1, 1]$ (`kind="uniform"`) of that shape, all slices
    of one draw from `key`. `fn` must ask for the same shapes in the same order each time
    it is called. NumPy arrays in the result become JAX arrays."""
    specs: list[tuple[tuple[int, ...], float]] = []

    def record(shape, scale=1.0):
        specs.append((tuple(int(s) for s in shape), float(scale)))
        return np.zeros(shape, np.float32)

    fn(record)
    sizes = [math.prod(shape) for shape, _ in specs]
    total = sum(sizes)
    if kind == "normal":
        flat = jax.random.normal(key, (total,), dtype)
    elif kind == "uniform":
        flat = jax.random.uniform(key, (total,), dtype, -1.0, 1.0)
    else:
        raise ValueError(f"`kind` must be 'normal' or 'uniform', got {kind!r}.")
    if not isinstance(flat, jax.core.Tracer):
        flat = np.asarray(flat)
    values, offset = [], 0
    for (shape, scale), n in zip(specs, sizes):
        # the scale in the draw's dtype: a Python float times a NumPy bfloat16 array
        # promotes to float32 (a traced one stays bfloat16)
        values.append(flat[offset:offset + n].reshape(shape) * np.asarray(scale, flat.dtype))
        offset += n
    it = iter(values)
    out = fn(lambda shape, scale=1.0: next(it))
    # arithmetic in `fn` on the host (`1.0 + draw(...)`, a norm's gain) promotes a NumPy
    # bfloat16 array to float32 where a traced one stays bfloat16: back to the draw's dtype
    return jax.tree.map(
        lambda x: jnp.asarray(x, flat.dtype if np.issubdtype(x.dtype, np.floating) else None)
        if isinstance(x, np.ndarray) else x, out)


def linears(sizes: list[tuple[int, int]], *, use_bias: bool = True, key: PRNGKeyArray,
            dtype: Any = None) -> list[eqx.nn.Linear]:
    """`eqx.nn.Linear(n_in, n_out)` for each pair, with equinox's initialisation (weights and
    biases uniform on $\\pm 1/\\sqrt{n_{in}}$) drawn at once."""
    dtype = jnp.zeros(()).dtype if dtype is None else dtype
    shells = eqx.filter_eval_shape(
        lambda: [eqx.nn.Linear(a, b, use_bias=use_bias, key=jax.random.key(0), dtype=dtype) for a, b in sizes])

    def fn(draw):
        out = []
        for (a, b), shell in zip(sizes, shells):
            lim = 1.0 / math.sqrt(a)
            w = draw((b, a), lim)
            if use_bias:
                out.append(eqx.tree_at(lambda l: (l.weight, l.bias), shell, (w, draw((b,), lim))))
            else:
                out.append(eqx.tree_at(lambda l: l.weight, shell, w))
        return out

    return build(key, dtype, fn, kind="uniform")
