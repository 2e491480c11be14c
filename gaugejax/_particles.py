"""Tokens as particles (MATH.md S18): attention as an interacting-particle ODE.

$\\dot x_i = \\sum_j \\mathrm{softmax}_j(x_i^T B x_j)\\, V x_j + C x_i$. A time-dependent linear
change of frame $x \\mapsto G(t) x$ maps it to the same kind of system with
$B' = G^{-T} B G^{-1}$, $V' = G V G^{-1}$, $C' = G C G^{-1} + \\dot G G^{-1}$; when
$G(0) = G(T) = I$ the $N$-particle flow map $x(0) \\mapsto x(T)$ is unchanged. This is the
attention layer's version of S9: $C$ is a connection along depth, $B$ and $V$ transform as
tensors. A residual stack $x \\leftarrow x + h\\,f(x, lh)$ with $h = T/L$ converges to the flow
at rate $1/L$.
"""

from __future__ import annotations

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._puregl import expm


_HIGHEST = jax.lax.Precision.HIGHEST


def particle_velocity(
    B: Float[Array, "d d"], V: Float[Array, "d d"], C: Float[Array, "d d"], x: Float[Array, "n d"]
) -> Float[Array, "n d"]:
    """$\\dot x_i = \\sum_j \\mathrm{softmax}_j(x_i^T B x_j) V x_j + C x_i$ for all particles."""
    scores = jnp.einsum("id,de,je->ij", x, B, x, precision=_HIGHEST)
    a = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("ij,ed,jd->ie", a, V, x, precision=_HIGHEST) + jnp.matmul(x, C.T, precision=_HIGHEST)


class LieLoop(eqx.Module):
    """$G(t) = \\exp(s(t) K)$ with $s(t) = \\sin(\\pi t / T)$ (so $G(0) = G(T) = I$), or with
    $s(t) = t/T$ when `closed=False` (then $G(T) = e^K \\neq I$: a negative control)."""

    K: Float[Array, "d d"]
    T: float = eqx.field(static=True)
    closed: bool = eqx.field(static=True, default=True)

    def _s(self, t):
        return jnp.sin(jnp.pi * t / self.T) if self.closed else t / self.T

    def _ds(self, t):
        return jnp.pi / self.T * jnp.cos(jnp.pi * t / self.T) if self.closed else jnp.ones_like(t) / self.T

    def __call__(self, t) -> Array:
        return expm(self._s(t) * self.K)

    def derivative(self, t) -> Array:
        """$\\dot G = \\dot s\\, K G$ (K commutes with $\\exp(sK)$)."""
        return self._ds(t) * jnp.matmul(self.K, self(t), precision=_HIGHEST)


def gauge_transform(
    B: Array, V: Array, C: Array, G: LieLoop
) -> Callable[[Array], tuple[Array, Array, Array]]:
    """`t -> (B'(t), V'(t), C'(t))`: $G^{-T} B G^{-1}$, $G V G^{-1}$, $G C G^{-1} + \\dot G G^{-1}$."""

    def at(t):
        g, gi = G(t), expm(-G._s(t) * G.K)  # exp(sK)^{-1} = exp(-sK)
        gd = G.derivative(t)
        mm = lambda a, b: jnp.matmul(a, b, precision=_HIGHEST)  # noqa: E731
        return mm(gi.T, mm(B, gi)), mm(g, mm(V, gi)), mm(g, mm(C, gi)) + mm(gd, gi)

    return at


def particle_flow(
    coeffs: Callable[[Array], tuple[Array, Array, Array]],
    x0: Float[Array, "n d"],
    T: float,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> Float[Array, "n d"]:
    """The flow map $x(0) \\mapsto x(T)$ of the particle ODE whose coefficients at time $t$ are
    `coeffs(t) = (B, V, C)` (diffrax, Tsit5, adaptive steps)."""

    def f(t, x, args):
        return particle_velocity(*coeffs(t), x)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(f), diffrax.Tsit5(), 0.0, T, T / 100, x0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, dtmin=None),
        max_steps=100_000,
    )
    return sol.ys[-1]


def residual_stack(
    coeffs: Callable[[Array], tuple[Array, Array, Array]], x0: Float[Array, "n d"], T: float, L: int
) -> Float[Array, "n d"]:
    """A transformer-like residual stack $x \\leftarrow x + h\\,f(x, lh)$, $h = T/L$, $L$ layers
    (forward Euler): it converges to `particle_flow` at rate $1/L$."""
    h = jnp.asarray(T, x0.dtype) / jnp.asarray(L, x0.dtype)  # L may be traced: one compilation

    def step(l, x):
        t = jnp.asarray(l, x.dtype) * h
        return x + h * particle_velocity(*coeffs(t), x)

    return jax.lax.fori_loop(0, L, step, x0)
