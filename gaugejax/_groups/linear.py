"""Dense matrix groups: the general linear group $GL(n)$ and the orthogonal group $O(n)$.

$GL(n)$ is the symmetry of a site with no nonlinearity (identity activations, the
query/key and value/output spaces of attention heads); $O(n)$ that of a residual stream
read through a scale-free RMSNorm. Elements are `(*batch, n, n)` matrices. A produced axis
is multiplied by $g$, a consumed axis by $g^{-T}$ (a solve-free explicit inverse for $GL$,
$g$ itself for $O(n)$). Inverses and exponentials avoid LAPACK custom calls on small
matrices (see `gaugejax/_groups/_linalg.py` for the XLA:CPU deadlock this prevents).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from . import _linalg
from .base import AbstractGroup, AxisFactors, Kind, default_float


_expm = _linalg.expm


def _mT(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


#: exact float32 products on accelerators too (their default rounds to TF32 / bf16 passes)
_HIGHEST = jax.lax.Precision.HIGHEST


class _AbstractMatrixGroup(AbstractGroup):
    n: eqx.AbstractVar[int]
    batch: eqx.AbstractVar[tuple[int, ...]]

    def identity(self, dtype: Any = None) -> Array:
        eye = jnp.eye(self.n, dtype=default_float(dtype))
        return jnp.broadcast_to(eye, (*self.batch, self.n, self.n))

    def compose(self, g: Array, h: Array) -> Array:
        return jnp.matmul(g, h, precision=_HIGHEST)

    def as_matrix(self, g: Array) -> Array:
        return g

    def algebra_zeros(self, dtype: Any = None) -> Array:
        return jnp.zeros((*self.batch, self.n, self.n), default_float(dtype))

    def sample(self, key: PRNGKeyArray, scale: float | None, dtype: Any = None) -> Array:
        return self._sample_via_draws(key, scale, dtype)

    def sample_draws(self, scale: float | None, dtype: Any = None) -> tuple[int, int]:
        return 0, self.batch_size() * self.n * self.n  # one Gaussian matrix per element


class GL(_AbstractMatrixGroup):
    """The general linear group $GL(n)$; elements are invertible `(*batch, n, n)` matrices.
    Lie algebra $\\mathfrak{gl}(n)$ (all matrices), exponential = matrix exponential.

    `sample(key, scale)` draws $\\exp(s X/\\sqrt{n})$ with $X$ standard Gaussian, so the
    spectrum of the generator is of size $s$.

    **Arguments:**

    - `n`: the dimension of the site.
    - `batch`: leading batch shape (e.g. `(heads,)` for one $GL(d_k)$ per head).
    """

    n: int = eqx.field(static=True)
    batch: tuple[int, ...] = eqx.field(static=True, default=())

    def sample_from_draws(self, words: Array, normals: Array, scale: float | None, dtype: Any = None) -> Array:
        # exp(s X / sqrt(n)), X standard Gaussian: `exp` of `sample_algebra`'s distribution
        dtype = default_float(dtype)
        x = normals.reshape(*self.batch, self.n, self.n).astype(dtype)
        return self.exp((0.5 if scale is None else scale) / self.n**0.5 * x)

    def inverse(self, g: Array) -> Array:
        return _linalg.inv(g)

    def factors(self, g: Array, kind: Kind) -> AxisFactors:
        return AxisFactors(matrix=g if kind == "produce" else _mT(_linalg.inv(g)))

    def check(self, g: Array) -> list[tuple[Array, str]]:
        eps = jnp.finfo(g.dtype).eps
        if self.n <= _linalg.PURE_MAX_N:
            singular = jnp.any(~(_linalg.relative_pivot(g) > self.n * eps))
        else:
            s = jnp.linalg.svd(g, compute_uv=False)
            singular = jnp.any(s[..., -1] <= self.n * eps * s[..., 0])
        return [
            (jnp.any(~jnp.isfinite(g)), "contains NaN or inf"),
            (singular, "is singular (or numerically singular); a GL element must be invertible"),
        ]

    @property
    def algebra_dim(self) -> int:
        return self.n * self.n * self.batch_size()

    def sample_algebra(self, key: PRNGKeyArray, scale: float, dtype: Any = None) -> Array:
        shape = (*self.batch, self.n, self.n)
        return scale / self.n**0.5 * jax.random.normal(key, shape, default_float(dtype))

    def exp(self, xi: Array | None, dtype: Any = None) -> Array:
        if xi is None:
            return self.identity(dtype)
        return _expm(xi)

    def exp_tangent(self, xi: Array, dtype: Any = None) -> Array:
        return xi.astype(default_float(dtype))


class Orthogonal(_AbstractMatrixGroup):
    """The orthogonal group $O(n)$; elements are `(*batch, n, n)` orthogonal matrices, for
    which $g^{-T} = g$. Lie algebra: skew-symmetric matrices (an algebra element is given
    as any square matrix and its skew part is used), exponential = matrix exponential.

    `sample(key, scale=None)` draws from the Haar measure (QR of a Gaussian with the sign
    fix, reflections included); a float `scale` draws $\\exp(s K/\\sqrt{n})$ near the
    identity with $K$ a Gaussian skew matrix.

    **Arguments:**

    - `n`: the dimension of the site.
    - `batch`: leading batch shape.
    """

    n: int = eqx.field(static=True)
    batch: tuple[int, ...] = eqx.field(static=True, default=())

    def sample_from_draws(self, words: Array, normals: Array, scale: float | None, dtype: Any = None) -> Array:
        dtype = default_float(dtype)
        x = normals.reshape(*self.batch, self.n, self.n).astype(dtype)
        if scale is not None:  # exp(s K / sqrt(n)), K = (X - X^T) / sqrt(2): `sample_algebra`'s law
            return self.exp(scale / (2 * self.n) ** 0.5 * (x - _mT(x)))
        return _linalg.haar_orthogonal(x)

    def inverse(self, g: Array) -> Array:
        return _mT(g)

    def factors(self, g: Array, kind: Kind) -> AxisFactors:
        del kind  # Q^{-T} = Q
        return AxisFactors(matrix=g)

    def check(self, g: Array) -> list[tuple[Array, str]]:
        # in float32 at least (a half-precision product adds its own rounding); the
        # tolerance is a few hundred roundings of g's own dtype, capped at 1/2 (it was
        # 1e3 n eps: 31 for bfloat16 at n = 4, which accepted 3 I and the zero matrix)
        gw = _linalg.upcast_half(g)
        err = jnp.max(jnp.abs(jnp.matmul(_mT(gw), gw, precision=_HIGHEST) - jnp.eye(self.n, dtype=gw.dtype)))
        tol = min(100 * self.n * float(jnp.finfo(g.dtype).eps), 0.5)
        return [
            (jnp.any(~jnp.isfinite(g)), "contains NaN or inf"),
            (err > tol, "is not orthogonal (g^T g != I)"),
        ]

    @property
    def algebra_dim(self) -> int:
        return self.n * (self.n - 1) // 2 * self.batch_size()

    def sample_algebra(self, key: PRNGKeyArray, scale: float, dtype: Any = None) -> Array:
        x = jax.random.normal(key, (*self.batch, self.n, self.n), default_float(dtype))
        return scale / (2 * self.n) ** 0.5 * (x - _mT(x))

    def exp(self, xi: Array | None, dtype: Any = None) -> Array:
        if xi is None:
            return self.identity(dtype)
        return _expm(0.5 * (xi - _mT(xi)))

    def exp_tangent(self, xi: Array, dtype: Any = None) -> Array:
        return (0.5 * (xi - _mT(xi))).astype(default_float(dtype))
