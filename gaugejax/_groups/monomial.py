"""Monomial groups: a permutation times a diagonal, $g = P D$.

An element `Monomial(perm, scale)` acts as "scale by `scale`, then permute by `perm`":
$g x = P (d \\odot x)$. Since $(PD)^{-T} = P D^{-1}$, a consumed axis is scaled by $1/d$ and
gathered with the same `perm`: one fused scaling and one gather per axis.

Composition is the semidirect product law (MATH.md, "Notes for the engine"):
$P_g D_g P_h D_h = (P_g P_h)(P_h^{-1} D_g P_h) D_h$ and
$P_h^{-1}\\,\\mathrm{diag}(d)\\,P_h = \\mathrm{diag}(d[\\mathrm{perm}_h^{-1}])$.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from .base import (
    AbstractGroup,
    AxisFactors,
    Kind,
    compose_permutations,
    default_float,
    invert_permutation,
    permutation_matrix,
    permutation_words,
    permutations_from_bits,
)
from .diagonal import PositiveDiagonal, SignFlip
from .permutation import Permutation


class Monomial(NamedTuple):
    """A monomial group element $P D$: `perm` (int32, `(*batch, n)`) and the diagonal
    `scale` (float, `(*batch, n)`), applied scale first."""

    perm: Array
    scale: Array


class _AbstractMonomial(AbstractGroup):
    n: eqx.AbstractVar[int]
    batch: eqx.AbstractVar[tuple[int, ...]]

    def _diagonal(self) -> AbstractGroup:
        raise NotImplementedError

    def identity(self, dtype: Any = None) -> Monomial:
        return Monomial(
            Permutation(self.n, self.batch).identity(), self._diagonal().identity(dtype)
        )

    def sample(self, key: PRNGKeyArray, scale: float | None, dtype: Any = None) -> Monomial:
        if self.sample_draws(scale, dtype) is None:  # n above the rank sampler's range
            kp, kd = jax.random.split(key)
            return Monomial(Permutation(self.n, self.batch).sample(kp, None), self._diagonal().sample(kd, scale, dtype))
        return self._sample_via_draws(key, scale, dtype)

    def sample_draws(self, scale: float | None, dtype: Any = None) -> tuple[int, int] | None:
        pw = permutation_words(self.n, self.batch)
        if pw is None:
            return None
        dw, dn = self._diagonal().sample_draws(scale, dtype)
        return pw + dw, dn

    def sample_from_draws(self, words: Array, normals: Array, scale: float | None, dtype: Any = None) -> Monomial:
        # the permutation's words first, then the diagonal's draws
        pw = permutation_words(self.n, self.batch)
        perm = permutations_from_bits(words[:pw], self.n, self.batch)
        return Monomial(perm, self._diagonal().sample_from_draws(words[pw:], normals, scale, dtype))

    def compose(self, g: Monomial, h: Monomial) -> Monomial:
        inv_h = invert_permutation(h.perm)
        scale = jnp.take_along_axis(g.scale, inv_h, axis=-1) * h.scale
        return Monomial(compose_permutations(g.perm, h.perm), scale)

    def inverse(self, g: Monomial) -> Monomial:
        # (P D)^{-1} = D^{-1} P^{-1} = P^{-1} (P D^{-1} P^{-1}), and P diag(d) P^{-1} = diag(d[perm]).
        inv = invert_permutation(g.perm)
        return Monomial(inv, jnp.take_along_axis(self._diagonal().inverse(g.scale), g.perm, axis=-1))

    def factors(self, g: Monomial, kind: Kind) -> AxisFactors:
        diag = self._diagonal().factors(g.scale, kind)
        return AxisFactors(scale=diag.scale, perm=g.perm)

    def as_matrix(self, g: Monomial) -> Array:
        p = permutation_matrix(g.perm, g.scale.dtype)
        return p * g.scale[..., None, :]

    def check(self, g: Monomial) -> list[tuple[Array, str]]:
        return Permutation(self.n, self.batch).check(g.perm) + self._diagonal().check(g.scale)

    @property
    def is_permutation(self) -> bool:
        return False


class PositiveMonomial(_AbstractMonomial):
    """Positive monomial matrices $P D$ with $D$ positive diagonal: the full continuous and
    discrete symmetry of a hidden layer with a positively homogeneous activation (ReLU,
    leaky ReLU). Elements are [`gaugejax.Monomial`][]; Lie algebra: log-scales.

    **Arguments:**

    - `n`: the dimension of the site.
    - `batch`: leading batch shape.
    """

    n: int = eqx.field(static=True)
    batch: tuple[int, ...] = eqx.field(static=True, default=())

    def _diagonal(self) -> PositiveDiagonal:
        return PositiveDiagonal(self.n, self.batch)

    @property
    def algebra_dim(self) -> int:
        return self._diagonal().algebra_dim

    def algebra_zeros(self, dtype: Any = None) -> Array:
        return self._diagonal().algebra_zeros(dtype)

    def sample_algebra(self, key: PRNGKeyArray, scale: float, dtype: Any = None) -> Array:
        return self._diagonal().sample_algebra(key, scale, dtype)

    def exp(self, xi: Array | None, dtype: Any = None) -> Monomial:
        if xi is None:
            return self.identity(dtype)
        return Monomial(Permutation(self.n, self.batch).identity(), jnp.exp(xi))

    def exp_tangent(self, xi: Array, dtype: Any = None) -> Monomial:
        return Monomial(None, xi.astype(default_float(dtype)))  # the permutation is fixed


class SignedPermutation(_AbstractMonomial):
    """Signed permutation matrices $P S$ (the hyperoctahedral group): the symmetry of a
    hidden layer with an odd activation (tanh, sin). Elements are [`gaugejax.Monomial`][]
    with $\\pm 1$ scales. Discrete: no Lie algebra.

    **Arguments:**

    - `n`: the dimension of the site.
    - `batch`: leading batch shape.
    """

    n: int = eqx.field(static=True)
    batch: tuple[int, ...] = eqx.field(static=True, default=())

    def _diagonal(self) -> SignFlip:
        return SignFlip(self.n, self.batch)

    def identity(self, dtype: Any = None) -> Monomial:
        return Monomial(
            Permutation(self.n, self.batch).identity(),
            jnp.ones((*self.batch, self.n), default_float(dtype)),
        )
