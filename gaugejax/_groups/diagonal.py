"""Diagonal groups: positive rescalings $D = \\mathrm{diag}(d)$, $d > 0$, and sign flips.

Produced axes scale by $d$, consumed axes by $d^{-1}$ (since $D^{-T} = D^{-1}$). These are
the symmetries of positively homogeneous activations (ReLU, leaky ReLU) and of odd ones
(tanh) respectively.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from .base import AbstractGroup, AxisFactors, Kind, default_float


class PositiveDiagonal(AbstractGroup):
    """Positive diagonal matrices $\\mathrm{diag}(d)$, $d_i > 0$; elements are the arrays `d`
    of shape `(*batch, n)`. Lie algebra: log-scales, $\\exp$ elementwise.

    **Arguments:**

    - `n`: the dimension of the site.
    - `batch`: leading batch shape (one independent copy of the group per entry).
    """

    n: int = eqx.field(static=True)
    batch: tuple[int, ...] = eqx.field(static=True, default=())

    def identity(self, dtype: Any = None) -> Array:
        return jnp.ones((*self.batch, self.n), default_float(dtype))

    def sample(self, key: PRNGKeyArray, scale: float | None, dtype: Any = None) -> Array:
        return self._sample_via_draws(key, scale, dtype)

    def sample_draws(self, scale: float | None, dtype: Any = None) -> tuple[int, int]:
        return 0, self.n * self.batch_size()

    def sample_from_draws(self, words: Array, normals: Array, scale: float | None, dtype: Any = None) -> Array:
        # exp(s z), z ~ N(0, 1): the exponential of `sample_algebra`'s distribution
        dtype = default_float(dtype)
        z = normals.reshape(*self.batch, self.n).astype(dtype)
        return jnp.exp(jnp.asarray(0.5 if scale is None else scale, dtype) * z)

    def compose(self, g: Array, h: Array) -> Array:
        return g * h

    def inverse(self, g: Array) -> Array:
        return 1 / g

    def factors(self, g: Array, kind: Kind) -> AxisFactors:
        return AxisFactors(scale=g if kind == "produce" else 1 / g)

    def as_matrix(self, g: Array) -> Array:
        return g[..., :, None] * jnp.eye(self.n, dtype=g.dtype)

    def check(self, g: Array) -> list[tuple[Array, str]]:
        return [
            (jnp.any(~jnp.isfinite(g)), "contains NaN or inf"),
            (jnp.any(g <= 0), "has a non-positive scale; a positive group needs every scale > 0"),
        ]

    @property
    def algebra_dim(self) -> int:
        return self.n * self.batch_size()

    def algebra_zeros(self, dtype: Any = None) -> Array:
        return jnp.zeros((*self.batch, self.n), default_float(dtype))

    def sample_algebra(self, key: PRNGKeyArray, scale: float, dtype: Any = None) -> Array:
        return scale * jax.random.normal(key, (*self.batch, self.n), default_float(dtype))

    def exp(self, xi: Array | None, dtype: Any = None) -> Array:
        if xi is None:
            return self.identity(dtype)
        return jnp.exp(xi)

    def exp_tangent(self, xi: Array, dtype: Any = None) -> Array:
        return xi.astype(default_float(dtype))


class SignFlip(AbstractGroup):
    """Diagonal sign matrices $\\mathrm{diag}(\\pm 1)$; elements are float arrays of $\\pm 1$,
    shape `(*batch, n)`. Discrete: no Lie algebra.

    **Arguments:**

    - `n`: the dimension of the site.
    - `batch`: leading batch shape.
    """

    n: int = eqx.field(static=True)
    batch: tuple[int, ...] = eqx.field(static=True, default=())

    def identity(self, dtype: Any = None) -> Array:
        return jnp.ones((*self.batch, self.n), default_float(dtype))

    def sample(self, key: PRNGKeyArray, scale: float | None, dtype: Any = None) -> Array:
        return self._sample_via_draws(key, scale, dtype)

    def sample_draws(self, scale: float | None, dtype: Any = None) -> tuple[int, int]:
        return self.n * self.batch_size(), 0

    def sample_from_draws(self, words: Array, normals: Array, scale: float | None, dtype: Any = None) -> Array:
        # a fair sign per entry: the top bit of its word
        del normals, scale
        dtype = default_float(dtype)
        flip = (words.reshape(*self.batch, self.n) >> jnp.uint32(31)).astype(dtype)
        return 1 - 2 * flip

    def compose(self, g: Array, h: Array) -> Array:
        return g * h

    def inverse(self, g: Array) -> Array:
        return g

    def factors(self, g: Array, kind: Kind) -> AxisFactors:
        del kind  # S^{-T} = S
        return AxisFactors(scale=g)

    def as_matrix(self, g: Array) -> Array:
        return g[..., :, None] * jnp.eye(self.n, dtype=g.dtype)

    def check(self, g: Array) -> list[tuple[Array, str]]:
        return [(jnp.any(jnp.abs(g) != 1), "has an entry that is not +1 or -1")]
