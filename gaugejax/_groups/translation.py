"""Translations $x \\mapsto x + t$: an additive (affine, not linear) gauge.

The key bias of an attention head can be shifted by any vector: it adds a per-query
constant to the scores, which softmax removes (MATH.md, S16). A translation site acts on
a whole leaf, after the leaf's linear couplings, so its element has the leaf's shape;
the engine composes it with those couplings as the affine group it is.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from .base import AbstractGroup, AxisFactors, Kind, default_float


class Translation(AbstractGroup):
    """The additive group $\\mathbb{R}^{\\mathrm{shape}}$; elements are arrays of `shape`.

    Used only with [`gaugejax.Translate`][] couplings. Lie algebra: itself, $\\exp$ the
    identity map.

    **Arguments:**

    - `shape`: the shape of the translated leaf.
    """

    shape: tuple[int, ...] = eqx.field(static=True)
    n: int = eqx.field(static=True)
    batch: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(int(s) for s in shape)
        self.n = self.shape[-1] if self.shape else 1
        self.batch = ()

    def identity(self, dtype: Any = None) -> Array:
        return jnp.zeros(self.shape, default_float(dtype))

    def sample(self, key: PRNGKeyArray, scale: float | None, dtype: Any = None) -> Array:
        return self._sample_via_draws(key, scale, dtype)

    def sample_draws(self, scale: float | None, dtype: Any = None) -> tuple[int, int]:
        return 0, self.algebra_dim

    def sample_from_draws(self, words: Array, normals: Array, scale: float | None, dtype: Any = None) -> Array:
        dtype = default_float(dtype)
        return jnp.asarray(0.5 if scale is None else scale, dtype) * normals.reshape(self.shape).astype(dtype)

    def compose(self, g: Array, h: Array) -> Array:
        return g + h  # the engine adds the linear part of g acting on h

    def inverse(self, g: Array) -> Array:
        return -g  # likewise

    def factors(self, g: Array, kind: Kind) -> AxisFactors:
        raise TypeError("a Translation site acts through Translate couplings only")

    def as_matrix(self, g: Array) -> Array:
        raise TypeError("a translation is not a linear map")

    def check(self, g: Array) -> list[tuple[Array, str]]:
        return [(jnp.any(~jnp.isfinite(g)), "contains NaN or inf")]

    @property
    def algebra_dim(self) -> int:
        size = 1
        for s in self.shape:
            size *= s
        return size

    def algebra_zeros(self, dtype: Any = None) -> Array:
        return self.identity(dtype)

    def sample_algebra(self, key: PRNGKeyArray, scale: float, dtype: Any = None) -> Array:
        return scale * jax.random.normal(key, self.shape, default_float(dtype))

    def exp(self, xi: Array | None, dtype: Any = None) -> Array:
        return self.identity(dtype) if xi is None else xi

    def exp_tangent(self, xi: Array, dtype: Any = None) -> Array:
        return xi.astype(default_float(dtype))

    def __repr__(self) -> str:
        return f"Translation({self.shape})"
