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
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._groups._linalg import inv
from .nn._node import float_state


_HIGHEST = jax.lax.Precision.HIGHEST


def particle_velocity(
    B: Float[Array, "d d"], V: Float[Array, "d d"], C: Float[Array, "d d"], x: Float[Array, "n d"]
) -> Float[Array, "n d"]:
    """The particle ODE's velocity field: $\\dot x_i = \\sum_j \\mathrm{softmax}_j(x_i^T B x_j)\\,
    V x_j + C x_i$ for all $n$ particles at once (one attention head with $W_{QK} = B$,
    $W_{OV} = V$, plus a linear skip term $C$).

    **Arguments:** `B`, `V`, `C`: `(d, d)`; `x`: `(n, d)`. **Returns:** `(n, d)`.
    """
    scores = jnp.einsum("id,de,je->ij", x, B, x, precision=_HIGHEST)
    a = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("ij,ed,jd->ie", a, V, x, precision=_HIGHEST) + jnp.matmul(x, C.T, precision=_HIGHEST)


def particle_gauge_transform(
    B: Float[Array, "d d"] | Callable, V: Float[Array, "d d"] | Callable, C: Float[Array, "d d"] | Callable,
    path: Callable[[Array], Array],
) -> Callable[[Array], tuple[Array, Array, Array]]:
    """The coefficients of the particle ODE in the moving frame $x' = G(t)\\,x$ (MATH.md S18).

    $B' = G^{-T} B G^{-1}$ and $V' = G V G^{-1}$ transform as tensors (the per-head
    $GL$ of S14/S15), $C' = G C G^{-1} + \\dot G G^{-1}$ as a connection (S9). When
    $G(0) = G(T) = I$ the flow map $x(0) \\mapsto x(T)$ of [`gaugejax.particle_flow`][] is
    unchanged.

    **Arguments:**

    - `B`, `V`, `C`: `(d, d)` coefficients, or callables `t -> (d, d)`.
    - `path`: `t -> G(t)`, a `(d, d)` invertible matrix, e.g. [`gaugejax.SmoothLiePath`][]
      (whose default boundary values give $G(0) = G(T) = I$). $\\dot G$ is one `jax.jvp`
      of the path; $G^{-1}$ a LAPACK-free Gauss-Jordan inverse.

    **Returns:** `t -> (B'(t), V'(t), C'(t))`, the `coeffs` argument of
    [`gaugejax.particle_flow`][] and [`gaugejax.particle_residual_stack`][].
    """
    for name, c in (("B", B), ("V", V), ("C", C)):
        if not callable(c) and (jnp.ndim(c) != 2 or jnp.shape(c)[0] != jnp.shape(c)[1]):
            raise ValueError(f"`{name}`: expected a square (d, d) matrix or a callable, received shape {jnp.shape(c)}.")
    at_t = lambda c, t: c(t) if callable(c) else c  # noqa: E731

    def at(t):
        t = jnp.asarray(t)
        if not jnp.issubdtype(t.dtype, jnp.inexact):  # an integer time: jvp needs a float one
            t = t.astype(jnp.result_type(float))
        g, gd = jax.jvp(path, (t,), (jnp.ones_like(t),))
        gi = inv(g)
        mm = lambda a, b: jnp.matmul(a, b, precision=_HIGHEST)  # noqa: E731
        b, v, c = at_t(B, t), at_t(V, t), at_t(C, t)
        if g.shape != b.shape:
            raise ValueError(f"`path`: G(t) has shape {g.shape} but the coefficients are {b.shape}.")
        return mm(gi.T, mm(b, gi)), mm(g, mm(v, gi)), mm(g, mm(c, gi)) + mm(gd, gi)

    return at


def _particles(x0: Any, coeffs: Callable, what: str) -> Array:
    """`x0` as float `(n, d)` particles with the coefficients' `d` (an integer array becomes
    the coefficients' float dtype, float32 particles with float64 coefficients float64),
    else a `ValueError` naming `x0`."""
    B = jax.eval_shape(lambda: coeffs(jnp.zeros((), jnp.result_type(float)))[0])
    x0 = float_state(x0, B.dtype if jnp.issubdtype(B.dtype, jnp.inexact) else jnp.result_type(float))
    if x0.ndim != 2 or x0.shape[1] != B.shape[-1]:
        raise ValueError(
            f"{what}: `x0` must be (n, d) particles with d = {B.shape[-1]} (the coefficients' size); "
            f"received shape {x0.shape}."
        )
    return x0


def _final_time(T: Any, what: str) -> None:
    """A `ValueError` naming `T` when it is concrete and not finite (diffrax takes no step to
    a NaN end time and returns `x0`)."""
    if isinstance(T, jax.core.Tracer):
        return
    try:
        finite = bool(np.all(np.isfinite(np.asarray(T, dtype=float))))
    except (TypeError, ValueError):
        raise ValueError(f"{what}: `T` must be a finite number, got {T!r}.") from None
    if not finite:
        raise ValueError(f"{what}: `T` must be a finite number, got {T!r}.")


def _num_layers(L: Any) -> Any:
    """`L` as a Python `int` (or a traced integer), else a `ValueError` naming `L`: a bool or
    a float (even an integral one, which `fori_loop` refuses beside its integer lower bound)
    is no number of layers."""
    msg = f"particle_residual_stack: `L` must be a positive integer number of layers; received {L!r}."
    dtype = getattr(L, "dtype", None)
    integral = (isinstance(L, (int, np.integer)) or (dtype is not None and jnp.ndim(L) == 0
                                                      and jnp.issubdtype(dtype, jnp.integer)))
    if isinstance(L, bool) or not integral:
        raise ValueError(msg)
    if isinstance(L, jax.core.Tracer):
        return L
    if int(L) < 1:
        raise ValueError(msg)
    return int(L)


def particle_coefficients(B: Array, V: Array, C: Array) -> Callable[[Array], tuple[Array, Array, Array]]:
    """`t -> (B, V, C)`: time-independent coefficients for [`gaugejax.particle_flow`][]."""
    return lambda t: (B, V, C)


def particle_flow(
    coeffs: Callable[[Array], tuple[Array, Array, Array]],
    x0: Float[Array, "n d"],
    T: float,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> Float[Array, "n d"]:
    """The flow map $x(0) \\mapsto x(T)$ of the particle ODE
    $\\dot x_i = \\sum_j \\mathrm{softmax}_j(x_i^T B x_j)\\, V x_j + C x_i$ (MATH.md S18), solved with
    diffrax (Tsit5, adaptive PID steps).

    **Arguments:**

    - `coeffs`: `t -> (B, V, C)` (see [`gaugejax.particle_coefficients`][],
      [`gaugejax.particle_gauge_transform`][]).
    - `x0`: `(n, d)` initial particles (tokens).
    - `T`: the final time, a finite number (NaN or inf is a `ValueError`). `T = 0`
      returns `x0`; a negative `T` solves backward in time, from 0 down to `T` (with
      time-independent coefficients, the inverse of the flow to `-T`).
    - `rtol`, `atol`: the step-size controller's tolerances.

    **Returns:** `(n, d)`, the particles at time `T`.
    """

    x0 = _particles(x0, coeffs, "particle_flow")
    _final_time(T, "particle_flow")

    def f(t, x, args):
        return particle_velocity(*coeffs(t), x)

    # the times in the particles' dtype (Python floats would make a float32 solve float64)
    t1 = jnp.asarray(T, x0.dtype)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(f), diffrax.Tsit5(), jnp.zeros((), x0.dtype), t1, t1 / 100, x0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, dtmin=None),
        max_steps=100_000,
    )
    return sol.ys[-1]


def particle_residual_stack(
    coeffs: Callable[[Array], tuple[Array, Array, Array]], x0: Float[Array, "n d"], T: float, L: int
) -> Float[Array, "n d"]:
    """A transformer-like residual stack of $L$ attention layers,
    $x \\leftarrow x + h\\,f(x, lh)$ with $h = T/L$ (forward Euler on the particle ODE):
    it converges to [`gaugejax.particle_flow`][] at rate $1/L$ (fitted log-log slope
    $-1.01$ over $L = 16 \\ldots 128$ in `tests/test_particles.py`).

    **Arguments:** `coeffs`: `t -> (B, V, C)`; `x0`: `(n, d)`; `T`: depth as time (a
    finite number); `L`: the number of layers, a positive integer (not a bool or a float;
    may be a traced integer).

    **Returns:** `(n, d)`, the particles after $L$ layers.
    """
    x0 = _particles(x0, coeffs, "particle_residual_stack")
    _final_time(T, "particle_residual_stack")
    L = _num_layers(L)
    h = jnp.asarray(T, x0.dtype) / jnp.asarray(L, x0.dtype)  # L may be traced: one compilation

    def step(l, x):
        t = jnp.asarray(l, x.dtype) * h
        return x + h * particle_velocity(*coeffs(t), x)

    return jax.lax.fori_loop(0, L, step, x0)
