"""Permutation matrices: the symmetry of every elementwise activation.

An element is an int32 array `perm` of shape `(*batch, n)` acting as
$(P x)_i = x_{\\mathrm{perm}[i]}$. Since $P^{-T} = P$, produced and consumed axes are
gathered with the same indices. Permutations are applied as gathers, never as matrices.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from .base import (
    AbstractGroup,
    AxisFactors,
    Kind,
    compose_permutations,
    invert_permutation,
    permutation_matrix,
    permutation_words,
    permutations_from_bits,
    random_permutations,
)


class Permutation(AbstractGroup):
    """The symmetric group $S_n$ as permutation matrices; elements are int32 index arrays.

    **Arguments:**

    - `n`: the dimension of the site.
    - `batch`: leading batch shape.
    """

    n: int = eqx.field(static=True)
    batch: tuple[int, ...] = eqx.field(static=True, default=())

    def identity(self, dtype: Any = None) -> Array:
        del dtype
        return jnp.broadcast_to(jnp.arange(self.n, dtype=jnp.int32), (*self.batch, self.n))

    def sample(self, key: PRNGKeyArray, scale: float | None, dtype: Any = None) -> Array:
        del scale, dtype
        return random_permutations(key, self.n, self.batch)

    def sample_draws(self, scale: float | None, dtype: Any = None) -> tuple[int, int] | None:
        del scale, dtype
        words = permutation_words(self.n, self.batch)
        return None if words is None else (words, 0)

    def sample_from_draws(self, words: Array, normals: Array, scale: float | None, dtype: Any = None) -> Array:
        del normals, scale, dtype
        return permutations_from_bits(words, self.n, self.batch)

    def compose(self, g: Array, h: Array) -> Array:
        return compose_permutations(g, h)

    def inverse(self, g: Array) -> Array:
        return invert_permutation(g)

    def factors(self, g: Array, kind: Kind) -> AxisFactors:
        del kind
        return AxisFactors(perm=g)

    def as_matrix(self, g: Array, dtype: Any = None) -> Array:
        return permutation_matrix(g, jnp.float32 if dtype is None else dtype)

    def check(self, g: Array) -> list[tuple[Array, str]]:
        counts = jnp.zeros((*g.shape[:-1], self.n), jnp.int32)
        counts = jnp.put_along_axis(counts, g, 1, axis=-1, inplace=False, mode="drop")
        bad = jnp.any((g < 0) | (g >= self.n)) | jnp.any(counts != 1)
        return [(bad, "is not a permutation of 0..n-1")]

    @property
    def is_permutation(self) -> bool:
        return True

    def permutation(self, g: Array) -> Array:
        return g
