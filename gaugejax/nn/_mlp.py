"""A reference multilayer perceptron with per-layer widths."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._init import linears


def _width(size: Any, i: int) -> int:
    """A layer width: an integer (a bool or a float such as 6.7 is refused, not truncated)."""
    if not isinstance(size, bool):
        try:
            return operator.index(size)
        except TypeError:
            pass
    raise ValueError(
        f"`sizes[{i}]` must be an integer layer width, got {size!r} of type {type(size).__name__}."
    )


class MLP(eqx.Module):
    """$x_l = \\sigma(W_l x_{l-1} + b_l)$ for $l = 1..L-1$, and a linear last layer.

    Weights use equinox's `(out, in)` layout (`eqx.nn.Linear`). The call accepts any
    number of leading batch dimensions. Matrix products use `Precision.HIGHEST`, so
    float32 invariance checks are not spoiled by reduced-precision (TF32) matmuls on GPUs.

    **Arguments:**

    - `sizes`: layer widths `[in, hidden_1, ..., hidden_{L-1}, out]`.
    - `activation`: the hidden activation (its symmetry family decides the gauge, see
      [`gaugejax.derive_gauge`][]).
    - `key`: a JAX PRNG key (keyword-only).
    - `dtype`: parameter dtype.
    - `use_bias`: whether layers have biases.
    """

    layers: tuple[eqx.nn.Linear, ...]
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        sizes: Sequence[int],
        activation: Callable = jax.nn.relu,
        *,
        key: PRNGKeyArray,
        dtype: Any = None,
        use_bias: bool = True,
    ):
        sizes = [_width(s, i) for i, s in enumerate(sizes)]
        if len(sizes) < 2 or any(s <= 0 for s in sizes):
            raise ValueError(f"`sizes` needs at least two positive widths, got {sizes}.")
        if not callable(activation):
            raise TypeError(f"`activation` must be a callable (e.g. jax.nn.relu), got {activation!r}.")
        # equinox's initialisation, all layers from one draw (one compilation, not one per
        # layer shape)
        self.layers = tuple(linears(list(zip(sizes[:-1], sizes[1:])), use_bias=use_bias, key=key, dtype=dtype))
        self.activation = activation

    @property
    def sizes(self) -> list[int]:
        """The layer widths `[in, ..., out]`."""
        return [self.layers[0].in_features] + [layer.out_features for layer in self.layers]

    def __call__(self, x: Float[Array, "*batch in"]) -> Float[Array, "*batch out"]:
        for i, layer in enumerate(self.layers):
            x = jnp.matmul(x, layer.weight.T, precision=jax.lax.Precision.HIGHEST)
            if layer.bias is not None:
                x = x + jnp.expand_dims(layer.bias, tuple(range(x.ndim - 1)))
            if i < len(self.layers) - 1:
                x = self.activation(x)
        return x
