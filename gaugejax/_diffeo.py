"""Spacetime diffeomorphisms acting on neural ODEs (function space).

A foliation-preserving diffeomorphism $(x, t) \\mapsto (\\phi(x, t), \\tau(t))$ maps the
vector field $v$ to (MATH.md, "Neural ODEs")

$$v'(x', t') = \\frac{dt}{dt'}\\Big[\\partial_x\\phi(x, t)\\,v(x, t) + \\partial_t\\phi(x, t)\\Big],
\\qquad x = \\phi_t^{-1}(x'),\\ t = \\tau^{-1}(t'),$$

trajectories to $x'(\\tau(t)) = \\phi(x(t), t)$, the interval $[0, T]$ to $[0, \\tau(T)]$,
the embedding to $E' = \\phi_0 \\circ E$ and the readout to $R' = R \\circ \\phi_T^{-1}$: the
model $R \\circ \\Phi_{T\\leftarrow 0} \\circ E$ is unchanged. The bracket is one `jax.jvp` of
$\\phi$ in the direction $(v, 1)$; $dt/dt' = 1/\\tau'(t)$ is one `jax.jvp` of $\\tau$.

Inverses: $\\phi_t^{-1}$ and $\\tau^{-1}$ are used when given (closed forms for the
built-ins [`gaugejax.LinearDiffeo`][] (a linear solve) and
[`gaugejax.TimeScale`][]); otherwise they are found with **optimistix** (a Newton root
find of $\\phi(y, t) = x'$ started at $y = x'$, resp. of $\\tau(s) = t'$ started at
$s = t' \\,T / \\tau(T)$), differentiable by the implicit function theorem. A Newton solve
that fails, or lands where $\\det \\partial_x\\phi_t$ is zero or has the opposite sign
to $\\det \\partial_x\\phi_0$ ($\\phi$ folds: not invertible there), raises an error at
run time. Its tolerance is a few of the dtype's epsilons.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jaxtyping import Array, PRNGKeyArray

from ._groups import _linalg
from .nn._node import NeuralODE, check_grid, float_dtype, float_state, is_concrete, time_tol


_HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------
# time reparametrisations
# ----------------------------------------------------------------------------------------
def _newton_tol(like: Array, floor: float) -> float:
    """A Newton tolerance for `like`'s dtype: `floor` (float64), or 16 epsilons where that
    is coarser (float32: `floor` would be below the rounding of the residual itself)."""
    return max(floor, 16 * float(jnp.finfo(jnp.result_type(like)).eps))


class AbstractTimeReparam(eqx.Module):
    """A monotone map $\\tau: [0, T] \\to [0, \\tau(T)]$ with $\\tau(0) = 0$."""

    def tau(self, t: Array) -> Array:
        raise NotImplementedError

    def tau_inverse(self, s: Array, T: Array) -> Array:
        """$\\tau^{-1}(s)$; by default a Newton solve (optimistix)."""
        t_end = self.tau(T)
        y0 = s * T / t_end

        # the residual relative to 1 + |s|: tau(t) rounds to a few ulps of s, which an
        # absolute tolerance would not reach for large s (Newton's steps are unchanged)
        scale = 1 + jnp.abs(s)

        def fn(t, _):
            return (self.tau(t) - s) / scale

        tol = _newton_tol(y0, 1e-13)
        sol = optx.root_find(fn, optx.Newton(rtol=tol, atol=tol), y0, max_steps=64, throw=False)
        return eqx.error_if(
            sol.value, sol.result != optx.RESULTS.successful,
            "tau_inverse: Newton's solve of tau(t) = s did not converge in 64 steps (is tau "
            "monotone on [0, T], and s in [0, tau(T)]?).",
        )

    def rate(self, t: Array) -> Array:
        """$\\tau'(t)$, by `jax.jvp`."""
        return jax.jvp(self.tau, (t,), (jnp.ones_like(t),))[1]


class IdentityTime(AbstractTimeReparam):
    """$\\tau(t) = t$."""

    def tau(self, t):
        return t

    def tau_inverse(self, s, T):
        return s

    def rate(self, t):
        return jnp.ones_like(t)


class TimeScale(AbstractTimeReparam):
    """$\\tau(t) = t / c$: with $dt/dt' = c$ the field becomes $c\\,v$ on $[0, T/c]$ (for an
    autonomous field, $(v, T) \\sim (c v, T / c)$, MATH.md S8).

    **Arguments:** `c`: a positive scalar.
    """

    c: Array

    def __init__(self, c):
        c = jnp.asarray(c)
        if is_concrete(c) and not float(c) > 0:
            raise ValueError(f"`c` must be positive (tau(t) = t / c must increase); received {float(c)!r}.")
        self.c = c

    def tau(self, t):
        return t / self.c.astype(jnp.result_type(t))

    def tau_inverse(self, s, T):
        return s * self.c.astype(jnp.result_type(s))


class SineWarp(AbstractTimeReparam):
    """$\\tau(t) = t + a\\,\\frac{T}{2\\pi}\\sin(2\\pi t / T)$: a map of $[0, T]$ onto itself,
    monotone iff $|a| < 1$ ($\\tau' = 1 + a\\cos(2\\pi t/T)$). Its inverse is a Newton solve.

    **Arguments:** `a`: the warp amplitude; `T`: the interval's end.
    """

    a: Array
    T: float = eqx.field(static=True)

    def __init__(self, a, T: float = 1.0):
        self.a = jnp.asarray(a)
        self.T = float(T)

    def tau(self, t):
        a = self.a.astype(jnp.result_type(t))
        return t + a * self.T / (2 * np.pi) * jnp.sin(2 * np.pi * t / self.T)


class TimeReparam(AbstractTimeReparam):
    """A user time map: `tau(t)` and optionally `tau_inverse(s)` (else a Newton solve).
    Both callables are static: pass an equinox Module if it holds arrays you vary."""

    fn: Callable
    inverse_fn: Callable | None

    def __init__(self, tau: Callable, tau_inverse: Callable | None = None):
        self.fn = tau
        self.inverse_fn = tau_inverse

    def tau(self, t):
        return self.fn(t)

    def tau_inverse(self, s, T):
        if self.inverse_fn is None:
            return super().tau_inverse(s, T)
        return self.inverse_fn(s)


# ----------------------------------------------------------------------------------------
# paths of matrices G(t)
# ----------------------------------------------------------------------------------------
def _expm(x: Array) -> Array:
    """$\\exp X$: the code base's one general matrix exponential
    (`gaugejax._groups._linalg.expm`, plain XLA ops, norm-adaptive scaling and squaring,
    differentiable in both modes). The hot path of a transformed field uses
    `_expm_rate_inverse` instead."""
    return _linalg.expm(x)


# Static schemes of `_expm_rate_inverse`, by dtype size: (squarings s, chunks q) for the Taylor
# polynomial of degree m = 4q - 1 of exp(X / 2^s), evaluated by Paterson-Stockmeyer in powers
# up to 4. Its relative backward error is about r^m / (m + 1)! with r = |X|_1 / 2^s, so for
# |X|_1 <= 8 (r <= 1):
#   float64: s = 3, m = 19: 1 / 20!      = 4e-19 (2e-13 at |X|_1 = 16)
#   float32: s = 3, m = 11: 1 / 12!      = 2e-9  (float32 rounding: 6e-8)
# Measured against scipy (G, dG/dt and G^{-1}, max relative entry error, 3 x 3 and 8 x 8):
# float64 <= 5e-14 for |X|_1 <= 8 and <= 2e-12 at 16; float32 <= 2e-6 up to 16 (s = 2, m = 15
# gives 6e-7 but ran ~1.7x slower on XLA:CPU; s = 4: 3e-6, as each squaring doubles the
# rounding error). Beyond |X|_1 ~ 20 it degrades (3 x 3 at 30: 1e-10 resp. 2e-3), like the
# fixed scheme it replaces (6 squarings, degree 12). The paths of this module are near the
# identity (|X|_1 of order 1); far from it, use `path(t)` (norm-adaptive) with `jax.jvp`.
_RATE_SCHEME = {8: (3, 5), 4: (3, 3), 2: (2, 3)}


def _pair_mul(a: Array, b: Array) -> Array:
    """Product of pairs $(A_1, B_1)(A_2, B_2) = (A_1 A_2, A_1 B_2 + B_1 A_2)$, each stored as
    an `(n, 2n)` array $[A \\mid B]$: the top block row of the product of the block
    matrices $\\begin{pmatrix} A & B \\\\ 0 & A \\end{pmatrix}$ (one matmul). $B$ carries
    the derivative: $(A, \\dot A)(C, \\dot C) = (AC, (AC)^{\\cdot})$."""
    n = a.shape[-2]
    a2 = b[..., :n]
    right = jnp.concatenate([b, jnp.concatenate([jnp.zeros_like(a2), a2], axis=-1)], axis=-2)
    return jnp.matmul(a, right, precision=_HI)


def _norm1(m: Array) -> float:
    """The largest matrix 1-norm (column sum) of `m`, a matrix or a stack of matrices."""
    return float(np.max(np.sum(np.abs(np.asarray(m, np.float64)), axis=-2), initial=0.0))


def _extra_squarings(bound: float | None) -> int:
    """Squarings beyond `_RATE_SCHEME`'s for a path with $\\|X(t)\\|_1 \\le$ `bound`: enough
    to bring it back to 8. `None` (a traced path, bound unknown): 0, and the scheme's
    accuracy then holds for $\\|X\\|_1 \\le 16$ (documented on the paths)."""
    return int(math.ceil(math.log2(bound / 8))) if bound is not None and bound > 8 else 0


def _expm_rate_inverse(x: Array, xdot: Array, extra_squarings: int = 0) -> tuple[Array, Array, Array]:
    """$(e^X,\\ \\frac{d}{dt} e^{X(t)},\\ e^{-X})$ for $X$ with derivative $\\dot X$, in one pass.

    The pair $(e^X, \\dot{(e^X)})$ is the top block row of
    $\\exp\\begin{pmatrix} X & \\dot X \\\\ 0 & X\\end{pmatrix}$ (the Frechet derivative of
    the exponential in the direction $\\dot X$); $e^{-X}$ (the inverse of $G$, no linear
    solve) reuses the same powers of $X$ with alternating signs. Scaling and squaring with
    a fixed scheme (`_RATE_SCHEME`: accurate to rounding for $\\|X\\|_1 \\le 8$, ~1e-12 at 16), the Taylor
    polynomial evaluated by Paterson-Stockmeyer: for float32 8 matmuls of shape
    $(n, 2n) \\times (2n, 2n)$ and 5 of $(n, n)$ (float64: 10 and 7), against 54
    $(n, n)$ matmuls and a LAPACK solve for `jax.jvp` of a degree-12 Taylor exponential
    with 6 squarings plus `solve`. Branch-free, so differentiable in both modes and cheap
    under `vmap`.
    """
    n = x.shape[-1]
    s, q = _RATE_SCHEME.get(jnp.dtype(x.dtype).itemsize, (3, 5))
    s += extra_squarings
    scale = jnp.asarray(2.0**-s, x.dtype)
    y = x * scale
    p1 = jnp.concatenate([y, xdot.astype(x.dtype) * scale], axis=-1)
    eye = jnp.eye(n, dtype=x.dtype)
    p0 = jnp.concatenate([eye, jnp.zeros_like(eye)], axis=-1)
    p2 = _pair_mul(p1, p1)
    p3 = _pair_mul(p2, p1)
    p4 = _pair_mul(p2, p2)
    pows = (p0, p1, p2, p3)
    y4 = p4[..., :n]
    coef = [1.0 / float(np.prod(np.arange(1, j + 1, dtype=np.float64))) for j in range(4 * q)]

    def chunk(i: int, sign: float, which: slice) -> Array:
        return sum(jnp.asarray(coef[4 * i + r] * sign**r, x.dtype) * pows[r][..., which] for r in range(4))

    full, left = slice(None), slice(0, n)
    pair = chunk(q - 1, 1.0, full)
    inv = chunk(q - 1, -1.0, left)
    for i in reversed(range(q - 1)):
        pair = _pair_mul(pair, p4) + chunk(i, 1.0, full)
        inv = jnp.matmul(inv, y4, precision=_HI) + chunk(i, -1.0, left)
    for _ in range(s):
        pair = _pair_mul(pair, pair)
        inv = jnp.matmul(inv, inv, precision=_HI)
    return pair[..., :n], pair[..., n:], inv


class SmoothLiePath(eqx.Module):
    """$G(t) = \\exp X(t)$ with the smooth Lie-algebra path
    $X(t) = (1 - t/T)\\,X_0 + (t/T)\\,X_T + \\sum_{k=1}^{K} \\sin(k\\pi t/T)\\,C_k$.

    With $X_0 = X_T = 0$ (the default) $G(0) = G(T) = I$. Diagonal $C_k$ give positive
    diagonal $G(t)$: the continuum limit of the feedforward rescaling.

    **Arguments:**

    - `coeffs`: `(K, d, d)` (general) or `(K, d)` (diagonal) coefficients $C_k$.
    - `T`: the interval's end.
    - `start`, `end`: $X_0$, $X_T$ (default zero), same shape as one coefficient.

    A transformed field evaluates $(G, \\dot G, G^{-1})$ in one pass of a fixed-cost
    exponential, accurate to rounding for $\\|X(t)\\|_1 \\le 8$. When the coefficients are
    concrete the path adds squarings for larger norms (`extra_squarings`, from the bound
    $\\max(\\|X_0\\|_1, \\|X_T\\|_1) + \\sum_k \\|C_k\\|_1$); a path built under tracing
    (e.g. inside a `vmap` over coefficients) keeps the base scheme, accurate for
    $\\|X(t)\\|_1 \\le 16$.
    """

    coeffs: Array
    start: Array
    end: Array
    T: float = eqx.field(static=True)
    diagonal: bool = eqx.field(static=True)
    extra_squarings: int = eqx.field(static=True)

    def __init__(self, coeffs, T: float = 1.0, start=None, end=None):
        coeffs = jnp.asarray(coeffs)
        if coeffs.ndim not in (2, 3):
            raise ValueError(f"`coeffs`: expected shape (K, d, d) or (K, d), received {coeffs.shape}.")
        self.diagonal = coeffs.ndim == 2
        z = jnp.zeros(coeffs.shape[1:], coeffs.dtype)
        self.coeffs = coeffs
        self.start = z if start is None else jnp.asarray(start, coeffs.dtype)
        self.end = z if end is None else jnp.asarray(end, coeffs.dtype)
        for name, v in (("start", self.start), ("end", self.end)):
            if v.shape != z.shape:
                raise ValueError(f"`{name}`: expected shape {z.shape} (one coefficient), received {v.shape}.")
        self.T = float(T)
        # |X(t)|_1 <= max(|X_0|_1, |X_T|_1) + sum_k |C_k|_1
        known = all(is_concrete(a) for a in (self.coeffs, self.start, self.end)) and not self.diagonal
        self.extra_squarings = _extra_squarings(
            max(_norm1(self.start), _norm1(self.end)) + sum(_norm1(c) for c in np.asarray(self.coeffs))
            if known else None)

    @classmethod
    def random(cls, dim: int, *, num_modes: int = 2, scale: float = 0.3, T: float = 1.0,
               diagonal: bool = False, boundary_identity: bool = True, key: PRNGKeyArray,
               dtype: Any = None) -> SmoothLiePath:
        """A path with Gaussian coefficients of size `scale` (per $\\sqrt d$ for general
        matrices).

        **Arguments:**

        - `dim`: $d$, the dimension of the matrices $G(t)$.
        - `num_modes`: $K$, the number of sine modes $C_k$.
        - `scale`: the standard deviation of every entry of $C_k$ (and of $X_0$, $X_T$),
          divided by $\\sqrt d$ for general matrices.
        - `T`: the interval's end.
        - `diagonal`: draw diagonal coefficients (shape `(K, d)`), so that $G(t)$ is a positive
          diagonal matrix; otherwise general `(K, d, d)` ones, $G(t) \\in GL^+(d)$.
        - `boundary_identity`: keep $X_0 = X_T = 0$, so $G(0) = G(T) = I$ (the boundary
          condition of a gauge symmetry of the flow map); `False` also draws random
          $X_0$ and $X_T$ of the same size.
        - `key`: a JAX PRNG key.
        - `dtype`: the float dtype of the coefficients (default JAX's default float).
        """
        dtype = dtype or jnp.zeros(()).dtype
        shape = (dim,) if diagonal else (dim, dim)
        k1, k2, k3 = jax.random.split(key, 3)
        norm = 1.0 if diagonal else float(np.sqrt(dim))  # a Python float keeps `dtype`
        coeffs = scale * jax.random.normal(k1, (num_modes, *shape), dtype) / norm
        if boundary_identity:
            return cls(coeffs, T)
        start = scale * jax.random.normal(k2, shape, dtype) / norm
        end = scale * jax.random.normal(k3, shape, dtype) / norm
        return cls(coeffs, T, start, end)

    @property
    def dim(self) -> int:
        return self.coeffs.shape[-1]

    def algebra(self, t: Array) -> Array:
        t = jnp.asarray(t, self.coeffs.dtype)
        u = t / self.T
        k = jnp.arange(1, self.coeffs.shape[0] + 1, dtype=self.coeffs.dtype)
        s = jnp.sin(k * np.pi * u)
        out = (1 - u) * self.start + u * self.end
        # an unrolled sum (elementwise, fused) rather than a reduction over the mode axis,
        # which XLA:CPU runs ~25x slower under vmap
        for i in range(self.coeffs.shape[0]):
            out = out + s[i] * self.coeffs[i]
        return out

    def __call__(self, t: Array) -> Array:
        x = self.algebra(t)
        return jnp.diag(jnp.exp(x)) if self.diagonal else _expm(x)

    def _value_rate_inverse(self, t: Array) -> tuple[Array, Array, Array]:
        """$(G, \\dot G, G^{-1})$ at `t` in one pass (see `_expm_rate_inverse`)."""
        t = jnp.asarray(t, self.coeffs.dtype)
        x, xdot = jax.jvp(self.algebra, (t,), (jnp.ones_like(t),))
        if self.diagonal:
            e = jnp.exp(x)
            return jnp.diag(e), jnp.diag(xdot * e), jnp.diag(jnp.exp(-x))
        return _expm_rate_inverse(x, xdot, self.extra_squarings)


class PiecewiseLinearLiePath(eqx.Module):
    """$G(t) = \\exp X(t)$ with $X$ piecewise-linear between values `X[i]` at grid times
    `ts[i]` ($G(0) = \\exp X_0$, $G(T) = \\exp X_N$; zero end values give the identity).
    $\\dot G$ jumps at the nodes, so prefer [`gaugejax.SmoothLiePath`][] where a rate is
    measured.

    **Arguments:** `ts`: `(N + 1,)` strictly increasing times from 0 (checked; an integer
    grid is cast to `X`'s float dtype); as a gauge of a model on $[0, T]$ it must end at
    $T$ (checked by [`gaugejax.validate_diffeo`][]: beyond `ts[-1]` $X$ would be
    extrapolated linearly). `X`: `(N + 1, d, d)`. Large norms: as
    [`gaugejax.SmoothLiePath`][], with the bound $\\max_i \\|X_i\\|_1$.
    """

    ts: Array
    X: Array
    extra_squarings: int = eqx.field(static=True)

    def __init__(self, ts, X):
        self.ts, self.X = check_grid(ts), jnp.asarray(X)
        if not jnp.issubdtype(self.ts.dtype, jnp.inexact):  # an integer grid: float times
            self.ts = self.ts.astype(float_dtype(self.X))
        if self.X.ndim != 3 or self.X.shape[0] != self.ts.shape[0] or self.X.shape[1] != self.X.shape[2]:
            raise ValueError(f"`X`: expected shape (len(ts), d, d) = ({self.ts.shape[0]}, d, d), received {self.X.shape}.")
        # X(t) is a convex combination of two nodes: |X(t)|_1 <= max_i |X_i|_1
        self.extra_squarings = _extra_squarings(_norm1(self.X) if is_concrete(self.X) else None)

    @property
    def dim(self) -> int:
        return self.X.shape[-1]

    def algebra(self, t: Array) -> Array:
        """$X(t)$, the piecewise-linear interpolant of `X` at `t`."""
        from .nn._node import interpolate

        return interpolate(jax.lax.stop_gradient(self.ts), self.X, jnp.asarray(t, self.X.dtype))

    def __call__(self, t):
        return _expm(self.algebra(t))

    def _value_rate_inverse(self, t: Array) -> tuple[Array, Array, Array]:
        """$(G, \\dot G, G^{-1})$ at `t` in one pass (see `_expm_rate_inverse`)."""
        t = jnp.asarray(t, self.X.dtype)
        x, xdot = jax.jvp(self.algebra, (t,), (jnp.ones_like(t),))
        return _expm_rate_inverse(x, xdot, self.extra_squarings)


# ----------------------------------------------------------------------------------------
# diffeomorphisms
# ----------------------------------------------------------------------------------------
class AbstractDiffeo(eqx.Module):
    """A foliation-preserving diffeomorphism $(x, t) \\mapsto (\\phi(x, t), \\tau(t))$ of
    $\\mathbb{R}^d \\times [0, T]$. Subclasses define `phi` (and, when they can, `phi_inverse`);
    `time` is the time reparametrisation (default identity)."""

    time: AbstractTimeReparam

    def phi(self, x: Array, t: Array) -> Array:
        raise NotImplementedError

    def phi_inverse(self, y: Array, t: Array) -> Array:
        """$\\phi_t^{-1}(y)$: a Newton solve of $\\phi(x, t) = y$ from $x = y$ (optimistix,
        to a tolerance of a few of the dtype's epsilons), checked to converge and to land
        where $\\det\\partial_x\\phi_t$ has the sign of $\\det\\partial_x\\phi_0$ (a
        continuous family of diffeomorphisms keeps its orientation; a fold flips it, an
        orientation-reversing $\\phi$ does not)."""

        # entrywise relative to 1 + |y| (a diagonal rescaling: Newton's steps are unchanged),
        # so the tolerance does not fall below the rounding of phi for large states
        scale = 1 + jnp.abs(y)

        def fn(x, _):
            return (self.phi(x, t) - y) / scale

        tol = _newton_tol(y, 1e-12)
        sol = optx.root_find(fn, optx.Newton(rtol=tol, atol=tol), y, max_steps=64, throw=False)
        x = sol.value
        det = jnp.linalg.det(jax.jacfwd(lambda z: self.phi(z, t))(x))
        # the orientation phi has everywhere if it is a diffeomorphism: a continuous family
        # keeps the sign of det from t = 0 on (a fold flips it where phi_t is not one-to-one).
        # Taken at x = 0, t = 0: independent of (y, t), so a solve can hoist it out of its loop
        phi_0 = lambda z: self.phi(z, jnp.zeros_like(t))  # noqa: E731
        det0 = jnp.linalg.det(jax.jacfwd(phi_0)(jnp.zeros_like(y)))
        x = eqx.error_if(
            x, sol.result != optx.RESULTS.successful,
            "phi is not invertible where it is used: Newton's solve of phi(x, t) = y did not "
            "converge in 64 steps (no preimage near y, or phi folds there).",
        )
        return eqx.error_if(
            x, ~(det * jnp.sign(det0) > 0),
            "phi is not invertible where it is used: det(d phi / dx) at the solution of "
            "phi(x, t) = y is zero or has the opposite sign to det(d phi_0 / dx) (phi folds).",
        )

    def velocity(self, x: Array, t: Array, v: Array) -> Array:
        """$\\partial_x\\phi(x, t)\\,v + \\partial_t\\phi(x, t)$ (one `jax.jvp`)."""
        return jax.jvp(self.phi, (x, t), (v, jnp.ones_like(t)))[1]

    def pushforward(self, field: Callable, x_new: Array, t: Array) -> Array:
        """$\\partial_x\\phi\\,v + \\partial_t\\phi$ at $x = \\phi_t^{-1}(x')$: the bracket of the
        law, before the factor $dt/dt'$."""
        x = self.phi_inverse(x_new, t)
        return self.velocity(x, t, field(t, x))


class Diffeo(AbstractDiffeo):
    """A user diffeomorphism from callables.

    **Arguments:**

    - `phi`: `phi(x, t) -> x'` for one state `x` of shape `(d,)`.
    - `phi_inverse`: `phi_inverse(x', t) -> x`, or `None`: then it is found with optimistix
      (Newton), and a non-invertible $\\phi$ raises at run time.
    - `time`: a time reparametrisation (default identity).

    The callables are static fields: put arrays you vary inside an equinox Module.
    """

    fn: Callable
    inverse_fn: Callable | None

    def __init__(self, phi: Callable, phi_inverse: Callable | None = None, time: AbstractTimeReparam | None = None):
        if not callable(phi):
            raise TypeError(f"`phi` must be callable phi(x, t); received {type(phi).__name__}.")
        self.fn, self.inverse_fn = phi, phi_inverse
        self.time = IdentityTime() if time is None else time

    def phi(self, x, t):
        return self.fn(x, t)

    def phi_inverse(self, y, t):
        if self.inverse_fn is None:
            return super().phi_inverse(y, t)
        return self.inverse_fn(y, t)


class LinearDiffeo(AbstractDiffeo):
    """$\\phi(x, t) = G(t)\\,x$ for a smooth path of invertible matrices $G(t)$, so that
    $v' = G\\,v(G^{-1}x', t) + \\dot G G^{-1} x'$ (MATH.md S5). $\\dot G$ comes from `jax.jvp`
    of the path; $\\phi_t^{-1}$ is a linear solve.

    **Arguments:**

    - `path`: a callable `t -> (d, d)` matrix, e.g. [`gaugejax.SmoothLiePath`][] or
      [`gaugejax.PiecewiseLinearLiePath`][].
    - `time`: a time reparametrisation (default identity).
    """

    path: Callable

    def __init__(self, path: Callable, time: AbstractTimeReparam | None = None):
        self.path = path
        self.time = IdentityTime() if time is None else time

    # States may carry leading batch axes (..., d): one G(t) serves the whole batch.
    def phi(self, x, t):
        return _mv(self.path(t).astype(x.dtype), x)

    def phi_inverse(self, y, t):
        return _solve(self.path(t).astype(y.dtype), y)

    def velocity(self, x, t, v):
        G, Gdot, _ = _value_rate_inverse(self.path, t)
        return _mv(G.astype(x.dtype), v) + _mv(Gdot.astype(x.dtype), x)

    def pushforward(self, field, x_new, t):
        # one pass gives G, dG/dt and (for the Lie paths) G^{-1} = exp(-X): no linear solve
        G, Gdot, Ginv = _value_rate_inverse(self.path, t)
        G, Gdot = G.astype(x_new.dtype), Gdot.astype(x_new.dtype)
        x = _solve(G, x_new) if Ginv is None else _mv(Ginv.astype(x_new.dtype), x_new)
        return _mv(G, field(t, x)) + _mv(Gdot, x)


def _value_rate_inverse(path: Callable, t: Array) -> tuple[Array, Array, Array | None]:
    """$(G(t), \\dot G(t), G(t)^{-1})$: in one pass for the built-in Lie paths
    ([`gaugejax.SmoothLiePath`][], [`gaugejax.PiecewiseLinearLiePath`][]); for any other
    callable $G, \\dot G$ by `jax.jvp` and `None` for the inverse (then a linear solve)."""
    # only where G(t) is the built-in exp(X(t)): a subclass that redefines `__call__` is generic
    if isinstance(path, (SmoothLiePath, PiecewiseLinearLiePath)) and type(path).__call__ in _LIE_CALLS:
        return path._value_rate_inverse(t)
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.inexact):  # a derivative in t needs a float time
        t = t.astype(jnp.result_type(float))
    G, Gdot = jax.jvp(path, (t,), (jnp.ones_like(t),))
    return G, Gdot, None


_LIE_CALLS = (SmoothLiePath.__call__, PiecewiseLinearLiePath.__call__)


def _mv(m: Array, x: Array) -> Array:
    """`m @ x` on the last axis of `x`."""
    return jnp.matmul(x, m.T, precision=_HI)


def _solve(m: Array, y: Array) -> Array:
    """`m^{-1} y` on the last axis of `y` (one factorisation for any batch)."""
    if y.ndim == 1:
        return jnp.linalg.solve(m, y)
    flat = y.reshape(-1, y.shape[-1])
    return jnp.linalg.solve(m, flat.T).T.reshape(y.shape)


class NearIdentityDiffeo(AbstractDiffeo):
    """$\\phi(x, t) = x + s(t)\\,\\psi(x)$ with $s(t) = \\epsilon\\sin(\\pi t / T)$ (so
    $\\phi_0 = \\phi_T = \\mathrm{id}$) and $\\psi$ any Module $\\mathbb{R}^d \\to
    \\mathbb{R}^d$, e.g. a small MLP. Invertible when $|\\epsilon|\\,\\mathrm{Lip}(\\psi) < 1$;
    the inverse is a Newton solve (optimistix), checked at run time.

    **Arguments:** `psi`: the Module; `eps`: the amplitude; `T`: the interval's end;
    `time`: a time reparametrisation (default identity).
    """

    psi: Callable
    eps: Array
    T: float = eqx.field(static=True)

    def __init__(self, psi: Callable, eps=0.1, T: float = 1.0, time: AbstractTimeReparam | None = None):
        self.psi, self.eps, self.T = psi, jnp.asarray(eps), float(T)
        self.time = IdentityTime() if time is None else time

    @classmethod
    def random(cls, dim: int, *, width: int = 8, eps: float = 0.1, T: float = 1.0, key: PRNGKeyArray,
               dtype: Any = None) -> NearIdentityDiffeo:
        """With $\\psi$ an `equinox.nn.MLP(dim, dim, width, depth=1, tanh)`."""
        psi = eqx.nn.MLP(dim, dim, width, 1, activation=jnp.tanh, key=key, dtype=dtype)
        return cls(psi, jnp.asarray(eps, dtype or jnp.zeros(()).dtype), T)

    def s(self, t):
        return self.eps.astype(jnp.result_type(t)) * jnp.sin(np.pi * t / self.T)

    def phi(self, x, t):
        return x + self.s(t).astype(x.dtype) * self.psi(x)


# ----------------------------------------------------------------------------------------
# the action on fields and models
# ----------------------------------------------------------------------------------------
class TransformedField(eqx.Module):
    """$v'(x', t') = \\frac{dt}{dt'}[\\partial_x\\phi\\,v + \\partial_t\\phi]$ at
    $x = \\phi_t^{-1}(x')$, $t = \\tau^{-1}(t')$ (see the module docstring)."""

    field: Callable
    diffeo: AbstractDiffeo
    T: Any  # the original interval's end (for tau's inverse)

    def __call__(self, t_new, x_new):
        T = jnp.asarray(self.T, jnp.result_type(t_new))
        t = self.diffeo.time.tau_inverse(t_new, T)
        dt_dtnew = 1.0 / self.diffeo.time.rate(t)
        return dt_dtnew.astype(x_new.dtype) * self.diffeo.pushforward(self.field, x_new, t)


class _PhiAt(eqx.Module):
    """$\\phi_t$ (or its inverse) applied to states of dimension `dim`, as the embedding's
    last step or the readout's first; `what` names that end in errors."""

    diffeo: AbstractDiffeo
    t: Any
    inverse: bool = eqx.field(static=True)
    dim: int = eqx.field(static=True)
    what: str = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)  # an integer input's float dtype, as the model's field has

    def __call__(self, x):
        x = float_state(x, self.dtype)
        if x.shape[-1:] != (self.dim,):
            raise ValueError(
                f"`{self.what}`: maps the input to dimension {x.shape[-1:]}, but the state dimension is {self.dim}."
            )
        t = jnp.asarray(self.t, x.dtype)
        return self.diffeo.phi_inverse(x, t) if self.inverse else self.diffeo.phi(x, t)


class Chain(eqx.Module):
    """`second(first(x))`: how a transformed embedding / readout is stored."""

    first: Callable | None
    second: Callable | None

    def __call__(self, x):
        if self.first is not None:
            x = self.first(x)
        return x if self.second is None else self.second(x)


def _probe_states(dim: int, dtype: Any, n: int = 8) -> Array:
    return jax.random.normal(jax.random.key(0), (n, dim), dtype)


def _coarsest_float(dtype: Any, *trees: Any) -> Any:
    """The coarsest float dtype (largest epsilon) among `dtype` and the inexact array leaves
    of `trees` (e.g. a float32 path acting on a float64 model: its values are only float32
    accurate)."""
    dts = [np.dtype(dtype)] if jnp.issubdtype(dtype, jnp.inexact) else []
    dts += [np.dtype(a.dtype) for a in jax.tree_util.tree_leaves(trees) if eqx.is_inexact_array(a)]
    if not dts:
        return np.dtype(jnp.result_type(float))
    return max(dts, key=lambda d: float(jnp.finfo(d).eps))


def _boundary_errors(diffeo: AbstractDiffeo, dim: int, T: Any, dtype: Any) -> tuple[Array, Array, float]:
    """max |phi_t(x) - x| / (1 + |x|) over probe states at t = 0 and t = T, and the
    tolerance (the round-off of sin(pi) etc.), from the coarsest float dtype of the model
    (`dtype`) and the diffeomorphism's arrays."""
    xs = _probe_states(dim, dtype)
    scale = 1.0 + jnp.max(jnp.abs(xs))
    errs = [jnp.max(jnp.abs(jax.vmap(lambda x: diffeo.phi(x, t) - x)(xs))) / scale
            for t in (jnp.zeros((), dtype), jnp.asarray(T, dtype))]
    return errs[0], errs[1], max(1e-8, 100 * float(jnp.finfo(_coarsest_float(dtype, diffeo)).eps))


def _boundary_message(boundary: str, name: str, err: Any) -> str:
    which = "E (embedding)" if name == "phi_0" else "R (readout)"
    return (
        f"boundary={boundary!r}: {name} is not the identity (max |{name}(x) - x| / (1 + |x|) {err} on "
        f"probe states), so keeping {which} untransformed changes the model. Use boundary='transform' "
        f"(E' = phi_0 o E, R' = R o phi_T^-1) or a diffeomorphism with {name} = id."
    )


class _BoundaryCheck(eqx.Module):
    """The identity on the embedding's output, checking at run time that phi_0 and phi_T
    are the identity, for a diffeomorphism known only under tracing: `boundary="fixed"`
    raises (an equinox run-time error), `boundary="warn"` warns (from a host callback)."""

    diffeo: AbstractDiffeo
    T: Any
    dim: int = eqx.field(static=True)
    boundary: str = eqx.field(static=True, default="fixed")

    def __call__(self, x):
        e0, eT, tol = _boundary_errors(self.diffeo, self.dim, self.T, x.dtype)
        if self.boundary == "warn":
            jax.debug.callback(_warn_boundary, e0, eT, tol)
            return x
        x = eqx.error_if(x, e0 > tol, _boundary_message("fixed", "phi_0", f"> {tol:.0e}"))
        return eqx.error_if(x, eT > tol, _boundary_message("fixed", "phi_T", f"> {tol:.0e}"))


def _warn_boundary(e0: Any, eT: Any, tol: float) -> None:
    for name, err in (("phi_0", e0), ("phi_T", eT)):
        err = float(np.max(np.asarray(err)))  # the largest over a vmapped batch
        if err > tol:
            warnings.warn(_boundary_message("warn", name, f"= {err:.3g}"), stacklevel=2)


def validate_diffeo(diffeo: AbstractDiffeo, dim: int, T: Any, dtype: Any = jnp.float64, *, num_times: int = 257) -> None:
    """Eager checks of a diffeomorphism on $[0, T]$ (skipped under tracing): $\\tau(0) = 0$
    and $\\tau' > 0$ (monotone), $\\phi$ maps `(dim,)` to `(dim,)`, an own `T` of the
    diffeomorphism, its time map or its path (and the last time of a
    [`gaugejax.PiecewiseLinearLiePath`][]'s grid) agrees with the model's `T` to a few
    units in the last place of the coarsest float dtype involved, and for
    [`gaugejax.LinearDiffeo`][] $G(t)$ is `(dim, dim)` and well conditioned. Raises
    `ValueError` naming what is wrong.

    $\\tau' > 0$ and the conditioning of $G$ are checked on a grid of `num_times` times
    only: a $G$ singular, or a $\\tau$ decreasing, strictly between two grid times is not
    seen here. A non-monotone $\\tau$ that passes is caught at run time only where
    $\\tau^{-1}$ is a Newton solve and that solve fails to converge; Newton may instead
    land on one of several preimages, and the transformed model is then silently wrong.
    A closed-form `tau_inverse` is not checked at all."""
    if not isinstance(diffeo, AbstractDiffeo):
        raise TypeError(f"`diffeo`: expected a gaugejax diffeomorphism (AbstractDiffeo), received {type(diffeo).__name__}.")
    if isinstance(diffeo, LinearDiffeo):
        gshape = jax.eval_shape(diffeo.path, jax.ShapeDtypeStruct((), dtype)).shape
        if gshape != (dim, dim):
            raise ValueError(f"`diffeo.path`: G(t) has shape {gshape}, expected ({dim}, {dim}) for a state of dimension {dim}.")
    try:
        out = jax.eval_shape(diffeo.phi, jax.ShapeDtypeStruct((dim,), dtype), jax.ShapeDtypeStruct((), dtype))
    except (TypeError, ValueError) as err:
        raise ValueError(f"`diffeo`: phi fails on a state of shape ({dim},) (state-dimension mismatch?): {err}") from err
    if out.shape != (dim,):
        raise ValueError(f"`diffeo`: phi maps a state of shape ({dim},) to shape {out.shape}; expected ({dim},) (state-dimension mismatch).")
    path = getattr(diffeo, "path", None)
    if is_concrete(T):
        # T (e.g. tau(T) of an earlier transformation) is rounded to the model's dtype
        tol = time_tol(_coarsest_float(dtype, T, path), float(T))
        for what, obj in (("diffeo", diffeo), ("diffeo.time", diffeo.time), ("diffeo.path", path)):
            own = getattr(obj, "T", None)
            if isinstance(own, (int, float)) and abs(float(own) - float(T)) > tol:
                raise ValueError(
                    f"`{what}.T` = {float(own)!r} but the model's interval is [0, {float(T)!r}]; they must agree "
                    f"(to {tol:.1e})."
                )
        if isinstance(path, PiecewiseLinearLiePath) and path.ts.shape[0] > 1 and is_concrete(path.ts):
            end = float(path.ts[-1])
            if abs(end - float(T)) > tol:
                raise ValueError(
                    f"`diffeo.path.ts`: the grid must end at the model's T = {float(T)!r} (beyond its last time "
                    f"X(t) is extrapolated, so G(T) is not exp X_N); received ts[-1] = {end!r}."
                )
    if not is_concrete(diffeo, T):
        return
    ts = jnp.linspace(0.0, float(T), num_times, dtype=dtype)
    tau0 = float(diffeo.time.tau(jnp.zeros((), dtype)))
    if abs(tau0) > 1e-12:
        raise ValueError(f"`diffeo.time`: tau(0) must be 0 (the new interval starts at 0); received tau(0) = {tau0:g}.")
    rates = np.asarray(jax.vmap(diffeo.time.rate)(ts))
    if not np.all(rates > 0):
        i = int(np.argmin(rates))
        raise ValueError(
            f"`diffeo.time`: tau must be strictly increasing on [0, T]; tau'(t) = {rates[i]:.3g} <= 0 at "
            f"t = {float(ts[i]):.4g} (non-monotone time reparametrisation)."
        )
    if isinstance(diffeo, LinearDiffeo):
        Gs = jax.vmap(diffeo.path)(ts)
        if Gs.shape[1:] != (dim, dim):
            raise ValueError(f"`diffeo.path`: G(t) has shape {Gs.shape[1:]}, expected ({dim}, {dim}) for a state of dimension {dim}.")
        sv = np.linalg.svd(np.asarray(Gs, np.float64), compute_uv=False)
        cond = sv[:, 0] / np.maximum(sv[:, -1], 1e-300)
        eps = float(jnp.finfo(dtype).eps)
        if not np.all(np.isfinite(cond)) or np.max(cond) > 1.0 / (1e3 * eps):
            i = int(np.argmax(np.where(np.isfinite(cond), cond, np.inf)))
            raise ValueError(
                f"`diffeo.path`: G(t) is singular (or numerically so) at t = {float(ts[i]):.4g}: condition number "
                f"{cond[i]:.3g}, smallest singular value {sv[i, -1]:.3g}; a gauge transformation must be invertible "
                "for every t in [0, T]."
            )


def _retimed_ts(ts: Array, time: AbstractTimeReparam) -> Array:
    """Times $t_i$ mapped to $\\tau(t_i)$ (an integer array as float times)."""
    ts = jnp.asarray(ts)
    if not jnp.issubdtype(ts.dtype, jnp.inexact):
        ts = ts.astype(jnp.result_type(float))
    return jax.vmap(time.tau)(ts)


def _retimed_controller(controller: Any, time: AbstractTimeReparam, ratio: Any, T_new: Any) -> Any:
    """`controller` in the new time (see `_retimed`); wrappers are retimed recursively."""
    if isinstance(controller, diffrax.ClipStepSizeController):
        for name in ("step_ts", "jump_ts"):
            ts = getattr(controller, name)
            if ts is not None:
                controller = eqx.tree_at(lambda c, name=name: getattr(c, name), controller, _retimed_ts(ts, time))
        inner = _retimed_controller(controller.controller, time, ratio, T_new)
        return eqx.tree_at(lambda c: c.controller, controller, inner)
    if isinstance(controller, diffrax.StepTo):
        ts = _retimed_ts(controller.ts, time)
        # diffrax needs ts[0] == t0 and ts[-1] == t1 exactly: tau(0) = 0 and tau(T) = T'
        # up to rounding, so the ends are set to those values
        ts = ts.at[0].set(jnp.zeros((), ts.dtype)).at[-1].set(jnp.asarray(T_new, ts.dtype))
        return diffrax.StepTo(ts=ts)
    for name in ("dtmin", "dtmax"):  # PIDController (and any controller with these bounds)
        value = getattr(controller, name, None)
        if value is not None:
            controller = eqx.tree_at(lambda c, name=name: getattr(c, name), controller, value * ratio)
    return controller


def _retimed(controller: Any, dt0: Any, time: AbstractTimeReparam, T: Any, T_new: Any) -> tuple[Any, Any]:
    """The step-size controller and `dt0` in the new time $t' = \\tau(t)$: a
    `diffrax.ClipStepSizeController`'s `step_ts` / `jump_ts` (original times, e.g. the
    kinks of a piecewise-linear field) and a `diffrax.StepTo`'s `ts` become $\\tau(t_i)$
    (its ends exactly $0$ and $\\tau(T)$), and `dt0` and a `diffrax.PIDController`'s
    `dtmin` / `dtmax` are scaled by $\\tau(T) / T$, so that a fixed-step solve takes as
    many steps as before and the step bounds cover the same fraction of the interval.
    `dt0` is a static field: under tracing ($\\tau(T)$ unknown) it is kept; the others
    are arrays and are retimed under tracing too. A user controller of another type is
    kept as it is."""
    if isinstance(time, IdentityTime):
        return controller, dt0
    known = isinstance(T_new, float) and is_concrete(T)
    ratio = T_new / float(T) if known else jnp.asarray(T_new) / jnp.asarray(T, jnp.result_type(T_new))
    controller = _retimed_controller(controller, time, ratio, T_new)
    if dt0 is not None and known:
        dt0 = dt0 * ratio
    return controller, dt0


def transform_node(node: NeuralODE, diffeo: AbstractDiffeo, *, boundary: str = "transform") -> NeuralODE:
    """Act with a spacetime diffeomorphism on a neural ODE (MATH.md, "Neural ODEs").

    The field becomes [`gaugejax.TransformedField`][]
    $v' = \\frac{dt}{dt'}[\\partial_x\\phi\\,v + \\partial_t\\phi]\\circ(\\phi_t^{-1}, \\tau^{-1})$
    and the interval $[0, \\tau(T)]$. The model $R\\circ\\Phi\\circ E$ is unchanged when

    - `boundary="transform"` (default): $E' = \\phi_0 \\circ E$, $R' = R \\circ \\phi_T^{-1}$;
    - `boundary="fixed"`: $E$, $R$ are kept, which is a symmetry only if
      $\\phi_0 = \\phi_T = \\mathrm{id}$; this is checked on probe states and a
      `ValueError` is raised otherwise (for a diffeomorphism known only under tracing, e.g.
      inside `jit`, an `equinox` run-time error when the model is called);
    - `boundary="warn"`: as `"fixed"`, but a violated boundary condition only warns (under
      tracing, from a host callback each time the model is called);
    - `boundary="unchecked"`: $E$, $R$ kept with no check (for negative controls, S7).

    The diffeomorphism is validated first (see [`gaugejax.validate_diffeo`][]): monotone $\\tau$,
    invertible $G(t)$, matching dimensions.

    **Arguments:**

    - `node`: a [`gaugejax.nn.NeuralODE`][] (any field).
    - `diffeo`: a [`gaugejax.LinearDiffeo`][], [`gaugejax.NearIdentityDiffeo`][],
      [`gaugejax.Diffeo`][] (user callables) or any `AbstractDiffeo`.
    - `boundary`: see above.

    **Returns:** the transformed [`gaugejax.nn.NeuralODE`][]: the same solver and controller,
    in the new time (a `diffrax.ClipStepSizeController`'s `step_ts` / `jump_ts` and a
    `diffrax.StepTo`'s `ts` mapped by $\\tau$, a `diffrax.PIDController`'s `dtmin` /
    `dtmax` scaled by $\\tau(T)/T$, and `dt0` too when $\\tau(T)$ is known).
    """
    if not isinstance(node, NeuralODE):
        raise TypeError(f"`node`: expected a gaugejax.nn.NeuralODE, received {type(node).__name__}.")
    if boundary not in ("transform", "fixed", "warn", "unchecked"):
        raise ValueError(f"`boundary` must be 'transform', 'fixed', 'warn' or 'unchecked'; received {boundary!r}.")
    dtype = node.field.ts.dtype if hasattr(node.field, "ts") else jnp.zeros(()).dtype
    validate_diffeo(diffeo, node.dim, node.T, dtype)
    T = node.T
    T_new = diffeo.time.tau(jnp.asarray(T, dtype))
    if is_concrete(T_new):
        T_new = float(T_new)
    embedding, readout = node.embedding, node.readout
    if boundary == "transform":
        state = float_dtype(node.field)
        embedding = Chain(node.embedding, _PhiAt(diffeo, 0.0, False, node.dim, "embedding", state))
        readout = Chain(_PhiAt(diffeo, T, True, node.dim, "readout", state), node.readout)
    elif boundary in ("fixed", "warn") and is_concrete(diffeo, T):
        e0, eT, tol = _boundary_errors(diffeo, node.dim, T, dtype)
        for name, err in (("phi_0", float(e0)), ("phi_T", float(eT))):
            if err > tol:
                msg = _boundary_message(boundary, name, f"= {err:.3g}")
                if boundary == "fixed":
                    raise ValueError(msg)
                warnings.warn(msg, stacklevel=2)
    elif boundary in ("fixed", "warn"):  # traced (jit, vmap, grad): checked when the model runs
        embedding = Chain(node.embedding, _BoundaryCheck(diffeo, T, node.dim, boundary))
    field = TransformedField(node.field, diffeo, T)
    controller, dt0 = _retimed(node.stepsize_controller, node.dt0, diffeo.time, T, T_new)
    return NeuralODE(
        field, T_new, embedding=embedding, readout=readout, solver=node.solver,
        stepsize_controller=controller, dt0=dt0, max_steps=node.max_steps,
        adjoint=node.adjoint, dim=node.dim,
    )


def connection_transform(A: Callable, path: Callable) -> Callable:
    """The gauge transformation of a connection, pointwise in $t$:
    $A'(t) = G A G^{-1} + \\dot G G^{-1}$ (MATH.md S9), $\\dot G$ by `jax.jvp`.

    **Arguments:** `A`: `t -> (d, d)`; `path`: `t -> G(t)` invertible.

    **Returns:** the callable `t -> A'(t)`.
    """

    def A_new(t):
        G, Gdot, Ginv = _value_rate_inverse(path, t)
        if Ginv is None:
            Ginv = jnp.linalg.inv(G)
        return jnp.matmul(jnp.matmul(G, A(t), precision=_HI), Ginv, precision=_HI) + jnp.matmul(Gdot, Ginv, precision=_HI)

    return A_new
