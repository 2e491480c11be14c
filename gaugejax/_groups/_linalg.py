"""Small dense linear algebra in plain XLA ops (no LAPACK custom calls).

On XLA:CPU, batched `jnp.linalg.inv` / `solve` / `svd` lower to LAPACK custom calls that
split their batch over the intra-op thread pool and block until it is done. When XLA runs
two such calls concurrently (independent per-layer $GL$ sites of one sampled element, as
in an invariance sweep over a 6-layer, 12-head model) on a machine with two pool threads,
both threads wait for work that neither can run and the program hangs (observed with jax
0.10.2 on 2 cores). The matrix groups therefore invert small matrices by Gauss-Jordan
elimination, exponentiate by scaling and squaring of a Taylor polynomial and draw Haar
rotations by Gram-Schmidt, written in ordinary XLA ops; only matrices larger than
`PURE_MAX_N` use LAPACK.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


#: matrices up to this size are inverted and checked without LAPACK (Gauss-Jordan is
#: O(n) sequential steps: slower than LAPACK for large n)
PURE_MAX_N = 128

_HIGHEST = jax.lax.Precision.HIGHEST
_TAYLOR_ORDER = 16
#: block size of the Paterson-Stockmeyer evaluation of the Taylor polynomial
_PS_BLOCK = 4
#: matrices of 1-norm up to 0.5 * 2**_MAX_SQUARINGS (32768) are exponentiated accurately;
#: the exponential of a larger one overflows float64 unless it is skew (a rotation)
_MAX_SQUARINGS = 16


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
    """Batched matrix inverse: Gauss-Jordan with partial pivoting up to `PURE_MAX_N`,
    LAPACK above."""
    if a.shape[-1] > PURE_MAX_N:
        return jnp.linalg.inv(a)
    return _batched(_gauss_jordan, a)[0]


def relative_pivot(a: Array) -> Array:
    """Smallest Gauss-Jordan pivot relative to the largest entry, per matrix: zero (up to
    rounding) exactly when the matrix is singular."""
    return _batched(_gauss_jordan, a)[1]


def _taylor(y: Array) -> Array:
    """$\\sum_{k \\le 16} y^k / k!$ by Paterson-Stockmeyer: powers $y^2, y^3, y^4$, then
    Horner's rule in $y^4$ over blocks $\\sum_{r<4} c_{4i+r} y^r$: 7 matrix products
    instead of 16 (half the program, and the time, of the term-by-term sum)."""
    n = y.shape[-1]
    eye = jnp.eye(n, dtype=y.dtype)
    mm = lambda a, b: jnp.matmul(a, b, precision=_HIGHEST)  # noqa: E731
    pows = [eye, y]
    for _ in range(2, _PS_BLOCK + 1):
        pows.append(mm(pows[-1], y))
    coef = [1.0 / math.factorial(k) for k in range(_TAYLOR_ORDER + 1)]

    def block(i):
        terms = [jnp.asarray(coef[k], y.dtype) * pows[k - _PS_BLOCK * i]
                 for k in range(_PS_BLOCK * i, min(_PS_BLOCK * (i + 1), _TAYLOR_ORDER + 1))]
        return sum(terms[1:], terms[0])

    top = _TAYLOR_ORDER // _PS_BLOCK
    out = block(top)
    for i in range(top - 1, -1, -1):
        out = block(i) + mm(pows[_PS_BLOCK], out)
    return out


def is_half(dtype) -> bool:
    """Whether `dtype` is a half-precision float (bfloat16, float16)."""
    return jnp.finfo(dtype).bits < 32


def upcast_half(tree: PyTree) -> PyTree:
    """`tree` with its half-precision float arrays in float32 (which holds their values
    exactly): LAPACK has no half-precision routines, and solves, ranks and orthogonality
    checks lose their accuracy in it."""
    return jtu.tree_map(
        lambda x: x.astype(jnp.float32) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
        and is_half(x.dtype) else x, tree)


def _expm_one(x: Array) -> Array:
    norm = jnp.max(jnp.sum(jnp.abs(x), axis=-1))
    s = jnp.clip(jnp.ceil(jnp.log2(jnp.maximum(norm, 1e-30) / 0.5)), 0, _MAX_SQUARINGS).astype(jnp.int32)
    y = x / jnp.exp2(s.astype(x.dtype))
    out = _taylor(y)
    # a static number of (masked) squarings, so that reverse-mode differentiation works
    # (a loop with a traced trip count cannot be transposed)
    return jax.lax.fori_loop(
        0, _MAX_SQUARINGS, lambda i, m: jnp.where(i < s, jnp.matmul(m, m, precision=_HIGHEST), m), out
    )


def expm(x: Array) -> Array:
    """Batched matrix exponential in plain XLA ops: scaling and squaring of the Taylor
    polynomial of order 16 on a matrix of 1-norm <= 1/2 (truncation error
    $0.5^{17}/17! \\approx 2\\times10^{-20}$, below float64 rounding). Differentiable in
    both modes."""
    return _batched(_expm_one, x)


def _gram_schmidt(x: Array) -> Array:
    """The Q of `x = QR` with R's diagonal positive: classical Gram-Schmidt with one
    reorthogonalisation per column ("twice is enough": orthogonal to rounding for any
    numerically nonsingular `x`)."""
    n = x.shape[-1]
    cols = jnp.arange(n)

    def step(k, q):
        v = q[:, k]
        done = cols < k
        for _ in range(2):
            v = v - jnp.matmul(q, jnp.where(done, jnp.matmul(v, q, precision=_HIGHEST), 0), precision=_HIGHEST)
        return q.at[:, k].set(v / jnp.linalg.norm(v))

    return jax.lax.fori_loop(0, n, step, x)


def haar_orthogonal(x: Array) -> Array:
    """Batched $Q$ of $X = QR$ with $R$'s diagonal positive: for a Gaussian $X$ a draw
    from the Haar measure on $O(n)$ (reflections included). Gram-Schmidt up to
    `PURE_MAX_N`, LAPACK's QR with the sign fix above."""
    if x.shape[-1] > PURE_MAX_N:
        q, r = jnp.linalg.qr(x)
        d = jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))
        return q * jnp.where(d == 0, 1, d).astype(x.dtype)[..., None, :]
    return _batched(_gram_schmidt, x)
