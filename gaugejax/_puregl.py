"""$GL(n)$ without LAPACK custom calls: a workaround for a CPU deadlock.

On XLA:CPU, batched `jnp.linalg.inv` / `solve` / `svd` lower to LAPACK custom calls that
split their batch over the intra-op thread pool (`jax::ParallelBatchMap`) and block
until it is done. When XLA runs two such calls concurrently (independent per-layer $GL$
sites in one sampled element, as in an invariance sweep over a 6-layer, 12-head model)
on a machine with two pool threads, both threads wait for work that neither can run: the
program hangs (observed with jax 0.10.2 on 2 cores; gdb shows both `tf_XLAEigen` workers
in `BlockingCounter::Wait` under `lapack_sgetrf_ffi`).

[`PureGL`] is [`gaugejax.GL`][] with its inverse (Gauss-Jordan with partial pivoting),
exponential (scaling and squaring of a Taylor polynomial) and validity check written in
plain XLA ops, so none of them is a custom call. It is the same group with the same
elements; the engine fix belongs in `gaugejax/_groups/linear.py` (see the integration
note of issue 4).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ._groups import GL
from ._groups.base import AxisFactors, Kind


_HIGHEST = jax.lax.Precision.HIGHEST
_TAYLOR_ORDER = 18


def _gauss_jordan(a: Array) -> tuple[Array, Array]:
    """Inverse of one `(n, n)` matrix and its smallest relative pivot."""
    n = a.shape[-1]
    aug = jnp.concatenate([a, jnp.eye(n, dtype=a.dtype)], axis=-1)
    scale = jnp.max(jnp.abs(a))
    rows = jnp.arange(n)

    def step(k, carry):
        aug, piv = carry
        col = jnp.where(rows >= k, jnp.abs(aug[:, k]), -1)
        p = jnp.argmax(col)
        rk, rp = aug[k], aug[p]
        aug = aug.at[k].set(rp).at[p].set(rk)
        pivot = aug[k, k]
        aug = aug.at[k].set(aug[k] / pivot)
        factors = jnp.where(rows == k, 0, aug[:, k])
        aug = aug - factors[:, None] * aug[k][None, :]
        return aug, jnp.fmin(piv, jnp.abs(pivot))

    aug, piv = jax.lax.fori_loop(0, n, step, (aug, jnp.asarray(jnp.inf, a.dtype)))
    return aug[:, n:], piv / jnp.where(scale > 0, scale, 1)


def _batched(fn, x: Array):
    flat = x.reshape(-1, *x.shape[-2:])
    out = jax.vmap(fn)(flat)
    return jax.tree_util.tree_map(lambda o: o.reshape(*x.shape[:-2], *o.shape[1:]), out)


def inv(a: Array) -> Array:
    """Batched matrix inverse in plain XLA ops (Gauss-Jordan, partial pivoting)."""
    return _batched(_gauss_jordan, a)[0]


def _expm_one(x: Array) -> Array:
    n = x.shape[-1]
    norm = jnp.max(jnp.sum(jnp.abs(x), axis=-1))
    s = jnp.maximum(0, jnp.ceil(jnp.log2(jnp.maximum(norm, 1e-30) / 0.5))).astype(jnp.int32)
    y = x / jnp.exp2(s.astype(x.dtype))
    eye = jnp.eye(n, dtype=x.dtype)
    out, term = eye, eye
    for k in range(1, _TAYLOR_ORDER + 1):
        term = jnp.matmul(term, y, precision=_HIGHEST) / jnp.asarray(k, x.dtype)
        out = out + term
    return jax.lax.fori_loop(0, s, lambda _, m: jnp.matmul(m, m, precision=_HIGHEST), out)


def expm(x: Array) -> Array:
    """Batched matrix exponential in plain XLA ops (scaling and squaring, Taylor order 18
    on a matrix of 1-norm <= 1/2: below float64 rounding)."""
    return _batched(_expm_one, x)


def _mT(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


class PureGL(GL):
    """[`gaugejax.GL`][] whose inverse, exponential and check use no LAPACK custom call
    (see the module docstring for why)."""

    def inverse(self, g: Array) -> Array:
        return inv(g)

    def factors(self, g: Array, kind: Kind) -> AxisFactors:
        return AxisFactors(matrix=g if kind == "produce" else _mT(inv(g)))

    def exp(self, xi: Array | None, dtype: Any = None) -> Array:
        if xi is None:
            return self.identity(dtype)
        return expm(xi)

    def check(self, g: Array) -> list[tuple[Array, str]]:
        _, piv = _batched(_gauss_jordan, g)
        eps = jnp.finfo(g.dtype).eps
        return [
            (jnp.any(~jnp.isfinite(g)), "contains NaN or inf"),
            (jnp.any(~(piv > self.n * eps)), "is singular (or numerically singular); a GL element must be invertible"),
        ]

    def __repr__(self) -> str:
        return f"GL({self.n}" + (f", batch={self.batch})" if self.batch else ")")
