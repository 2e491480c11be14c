"""A ResNet with a linear part, and the maps between it and the parametric neural ODE.

$x_{l+1} = x_l + h\\,(A_l x_l + W_{2,l}\\,\\sigma(W_{1,l} x_l + b_l) + c_l)$, $h = T/L$:
the forward-Euler discretisation of
$\\dot x = A(t) x + W_2(t)\\sigma(W_1(t) x + b(t)) + c(t)$ with block $l$ at time $t_l = l h$.
Its exact lattice gauge (MATH.md, "Continuum limit") is built by
[`gaugejax.resnet_gauge`][].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._node import (
    NeuralODE,
    ParametricField,
    _apply,
    check_input,
    check_readout,
    float_state,
    is_concrete,
    random_blocks,
    vector_field,
)


_KEYS = ("A", "W1", "b", "W2", "c")


def euler_flow(stacked: dict[str, Array], x: Array, h: Any, activation: Callable) -> Array:
    """$L$ residual blocks, parameters stacked on a leading block axis, run with
    `jax.lax.scan`: $x \\leftarrow x + h\\,v_l(x)$."""

    def step(x, p):
        return x + h * vector_field(p, x, activation), None

    out, _ = jax.lax.scan(step, x, stacked)
    return out


class ResNet(eqx.Module):
    """$x_{l+1} = x_l + h\\,(A_l x_l + W_{2,l}\\,\\sigma(W_{1,l} x_l + b_l) + c_l)$,
    $l = 0..L-1$, $h = T/L$, between an embedding $E$ and a readout $R$.

    Per-block parameters are tuples of arrays (`A[l]` is the $(d, d)$ matrix of block $l$):
    each block's $U_l = I + hA_l$ is its own leaf, a [`gaugejax.Link`][] between the stream
    sites $s_l$ and $s_{l+1}$ (see [`gaugejax.resnet_gauge`][]). The forward pass stacks
    them and runs one `jax.lax.scan`.

    **Arguments:**

    - `A`, `W1`, `b`, `W2`, `c`: sequences of `L` arrays of shapes `(dim, dim)`,
      `(width, dim)`, `(width,)`, `(dim, width)`, `(dim,)` (or stacked arrays).
    - `T`: total "time"; the step is $h = T / L$.
    - `activation`: the hidden $\\sigma$.
    - `embedding`, `readout`: callables (e.g. `equinox.nn.Linear`) or `None` (identity).
      Linear ones can absorb the boundary stream sites $s_0$, $s_L$ of the gauge.
    """

    A: tuple[Array, ...]
    W1: tuple[Array, ...]
    b: tuple[Array, ...]
    W2: tuple[Array, ...]
    c: tuple[Array, ...]
    embedding: Callable | None
    readout: Callable | None
    T: float = eqx.field(static=True)
    activation: Callable = eqx.field(static=True)

    def __init__(self, A, W1, b, W2, c, *, T: float = 1.0, activation: Callable = jnp.tanh,
                 embedding: Callable | None = None, readout: Callable | None = None):
        A, W1, b, W2, c = (tuple(jnp.asarray(a) for a in x) for x in (A, W1, b, W2, c))
        for name, xs in zip(_KEYS, (A, W1, b, W2, c)):
            for l, a in enumerate(xs):
                if not jnp.issubdtype(a.dtype, jnp.inexact):
                    raise TypeError(f"`{name}[{l}]`: the blocks' parameters must be float arrays, received {a.dtype}.")
        L = len(A)
        if L < 1:
            raise ValueError("a ResNet needs at least one block; received L = 0.")
        for name, xs in zip(_KEYS, (A, W1, b, W2, c)):
            if len(xs) != L:
                raise ValueError(f"`{name}`: expected {L} blocks (as many as `A`), received {len(xs)}.")
        d, m = A[0].shape[0], W1[0].shape[0]
        want = {"A": (d, d), "W1": (m, d), "b": (m,), "W2": (d, m), "c": (d,)}
        for name, xs in zip(_KEYS, (A, W1, b, W2, c)):
            for l, a in enumerate(xs):
                if a.shape != want[name]:
                    raise ValueError(f"`{name}[{l}]`: expected shape {want[name]} (dim={d}, width={m}), received {a.shape}.")
        if not float(T) > 0:
            raise ValueError(f"`T` must be positive; received {T!r}.")
        self.A, self.W1, self.b, self.W2, self.c = A, W1, b, W2, c
        self.T = float(T)
        self.activation = activation
        self.embedding = embedding
        self.readout = readout

    @classmethod
    def random(cls, dim: int, width: int, depth: int, *, T: float = 1.0, activation: Callable = jnp.tanh,
               scale: float = 1.0, key: PRNGKeyArray, dtype: Any = None,
               embedding: Callable | None = None, readout: Callable | None = None) -> ResNet:
        """A random ResNet with `depth` blocks (entries $\\sim N(0, \\mathrm{scale}^2/\\mathrm{fan\\_in})$)."""
        dtype = dtype or jnp.zeros(()).dtype
        A, W1, b, W2, c = random_blocks(key, depth, dim, width, scale, dtype)
        return cls(A, W1, b, W2, c, T=T, activation=activation, embedding=embedding, readout=readout)

    @property
    def depth(self) -> int:
        """The number of blocks $L$."""
        return len(self.A)

    @property
    def dim(self) -> int:
        return self.A[0].shape[0]

    @property
    def width(self) -> int:
        return self.W1[0].shape[0]

    @property
    def h(self) -> float:
        """The step $h = T / L$."""
        return self.T / self.depth

    def stacked(self) -> dict[str, Array]:
        return {k: jnp.stack(getattr(self, k)) for k in _KEYS}

    def flow(self, x: Float[Array, "*batch dim"]) -> Array:
        """The residual stream after the $L$ blocks (no $E$, $R$); an integer state becomes
        a float one in the blocks' dtype, a float state coarser than the blocks (float32
        into a float64 ResNet) is promoted to theirs."""
        x = float_state(x, self.A[0].dtype)
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"`x`: expected a state of dimension {self.dim} on the last axis, received shape {x.shape}.")
        return euler_flow(self.stacked(), x, jnp.asarray(self.h, x.dtype), self.activation)

    def __call__(self, x: Float[Array, "*batch in"]) -> Array:
        x = jnp.asarray(x)
        check_input(self.embedding, x, "embedding")
        z = _apply(self.embedding, x)
        if z.shape[-1:] != (self.dim,):
            raise ValueError(f"`embedding`: maps the input to dimension {z.shape[-1:]}, but the stream dimension is {self.dim}.")
        out = self.flow(z)
        check_readout(self.readout, self.dim, out.dtype)
        return _apply(self.readout, out)


@eqx.filter_jit
def _at_times(field: ParametricField, ts: Array) -> dict[str, Array]:
    return jax.vmap(field.at)(ts)


def discretize(node: NeuralODE, L: int) -> ResNet:
    """The forward-Euler ResNet of a parametric neural ODE: $L$ blocks, $h = T/L$, block $l$
    taking the field's parameters at $t_l = l h$ (so $x_{l+1} = x_l + h\\,v(x_l, l h)$).
    Embedding and readout are kept. The ResNet's output converges to the ODE's with error
    $O(1/L)$ (MATH.md S12).

    **Arguments:**

    - `node`: a [`gaugejax.nn.NeuralODE`][] whose field is a [`gaugejax.nn.ParametricField`][].
    - `L`: the number of blocks (a positive int).
    """
    if not isinstance(node, NeuralODE) or not isinstance(node.field, ParametricField):
        raise TypeError(
            "`node`: discretize needs a gaugejax.nn.NeuralODE whose field is a "
            f"gaugejax.nn.ParametricField; received {type(node).__name__}"
            f"{'' if not isinstance(node, NeuralODE) else ' with field ' + type(node.field).__name__}."
        )
    if not (isinstance(L, (int, np.integer)) and L >= 1):
        raise ValueError(f"`L` must be a positive int; received {L!r}.")
    if not is_concrete(node.T):
        raise ValueError("`node.T` must be concrete to discretize (the step h = T / L is static).")
    T = float(node.T)
    dtype = node.field.ts.dtype
    ts = jnp.arange(L, dtype=dtype) * (T / L)
    p = _at_times(node.field, ts)
    return ResNet(*(p[k] for k in _KEYS), T=T, activation=node.field.activation,
                  embedding=node.embedding, readout=node.readout)


def continuum_limit(resnet: ResNet, **node_kwargs: Any) -> NeuralODE:
    """The parametric neural ODE whose Euler discretisation with $L$ blocks is `resnet`.

    Block $l$'s parameters become the grid node $t_l = l h$, $l = 0..L-1$; the last node
    $t_L = T$ repeats block $L-1$ (the ResNet does not define it). Parameters are
    piecewise-linear between nodes, so `discretize(continuum_limit(r), r.depth)` returns
    `r`'s parameters exactly.

    **Arguments:**

    - `resnet`: a [`gaugejax.nn.ResNet`][].
    - `**node_kwargs`: passed to [`gaugejax.nn.NeuralODE`][] (solver, controller, ...).
    """
    if not isinstance(resnet, ResNet):
        raise TypeError(f"`resnet`: expected a gaugejax.nn.ResNet, received {type(resnet).__name__}.")
    L, T = resnet.depth, resnet.T
    dtype = resnet.A[0].dtype
    ts = jnp.arange(L + 1, dtype=dtype) * (T / L)
    params = [tuple(getattr(resnet, k)) + (getattr(resnet, k)[-1],) for k in _KEYS]
    field = ParametricField(ts, *params, activation=resnet.activation)
    return NeuralODE(field, T, embedding=resnet.embedding, readout=resnet.readout, **node_kwargs)
