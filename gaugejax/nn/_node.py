"""Neural ODEs on diffrax: $F = R \\circ \\Phi_{T \\leftarrow 0} \\circ E$ with $\\dot x = v(x, t)$.

Two pieces: [`gaugejax.nn.ParametricField`][], the vector field
$v(x, t) = A(t) x + W_2(t)\\,\\sigma(W_1(t) x + b(t)) + c(t)$ with its parameters on a time
grid (piecewise-linear in $t$), and [`gaugejax.nn.NeuralODE`][], the model (embedding,
readout, interval $[0, T]$, solver, step-size controller). The vector field may be any
equinox Module called as `f(t, x)`.

Per-node parameters are stored as *tuples of arrays* (`A[i]` is the $(d, d)$ matrix at
grid node $i$), not as one stacked array: the gauge engine's [`gaugejax.Link`][] coupling
acts on a 2-D leaf, and each node carries its own stream site (see
[`gaugejax.node_gauge`][]). The call stacks them once per evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._init import build


_HI = jax.lax.Precision.HIGHEST


def _mv(m: Array, x: Array) -> Array:
    """`m @ x` along the last axis of `x` (any leading batch dims)."""
    return jnp.matmul(x, jnp.swapaxes(m, -1, -2), precision=_HI)


def is_concrete(*xs: Any) -> bool:
    """True when every argument has a value now (not a tracer under `jit`/`vmap`/`grad`)."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(xs))


def float_dtype(like: Any) -> Any:
    """The dtype of the float arrays of `like` (a field), or the default float when they
    have none or several."""
    dts = {a.dtype for a in jax.tree_util.tree_leaves(like) if eqx.is_inexact_array(a)}
    return dts.pop() if len(dts) == 1 else jnp.result_type(float)


def float_state(x: Any, dtype: Any) -> Array:
    """`x` as an array in the model's float `dtype` or finer: an integer or boolean state
    becomes a float one of `dtype` (the solve's times take the state's dtype, and a
    diffeomorphism's matrices would be cast to it: an integer state would truncate them),
    a float state is promoted to `jnp.promote_types(x.dtype, dtype)` (a float32 input to a
    float64 model is solved in float64, as a float64 input to a float32 model already was:
    a solve or scan whose state is coarser than its parameters fails inside diffrax/JAX)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return x.astype(dtype)
    with jax.numpy_dtype_promotion("standard"):  # the rule for floats, whatever the config
        target = jnp.promote_types(x.dtype, dtype)
    return x if x.dtype == target else x.astype(target)


def time_tol(dtype: Any, T: float) -> float:
    """How far a time in `dtype` may stray past an end of $[0, T]$ by rounding alone: a few
    units in the last place of `T` (a float32 grid's last node misses `T = 0.1` by one)."""
    dtype = np.dtype(dtype)
    eps = np.finfo(dtype if np.issubdtype(dtype, np.floating) else np.float64).eps
    return 8 * float(eps) * max(1.0, abs(T))


def check_times(ts: Any, T: Any, what: str) -> None:
    """Eagerly refuse times outside $[0, T]$ (skipped for traced values)."""
    if not is_concrete(ts, T):
        return
    arr = np.atleast_1d(np.asarray(ts))
    Tf = float(T)
    tol = time_tol(arr.dtype, Tf)
    arr = arr.astype(np.float64)
    bad = arr[(arr < -tol) | (arr > Tf + tol)]
    if bad.size:
        raise ValueError(
            f"`{what}`: times must lie in the model's interval [0, T] = [0, {Tf:g}]; received "
            f"{bad[:5].tolist()}{' ...' if bad.size > 5 else ''}."
        )


def _interp_weights(ts: Array, t: Array) -> tuple[Array, Array]:
    """Index `i` and weight `w` with `t = (1 - w) ts[i] + w ts[i+1]` (clipped at the ends)."""
    n = ts.shape[0]
    i = jnp.clip(jnp.searchsorted(ts, t, side="right") - 1, 0, n - 2)
    w = (t - ts[i]) / (ts[i + 1] - ts[i])
    return i, w


def interpolate(ts: Array, values: Array, t: Array) -> Array:
    """Piecewise-linear interpolation of `values` (`(N+1, ...)`, one per grid node `ts`) at
    time `t`; constant when the grid has a single node."""
    if ts.shape[0] == 1:
        return values[0]
    i, w = _interp_weights(ts, t)
    w = w.astype(values.dtype)
    return (1 - w) * values[i] + w * values[i + 1]


def random_blocks(key: PRNGKeyArray, n: int, dim: int, width: int, scale: float, dtype: Any) -> tuple[Array, ...]:
    """`n` stacked random blocks `(A, W1, b, W2, c)`, entries
    $\\sim N(0, \\mathrm{scale}^2 / \\mathrm{fan\\_in})$ (biases $N(0, \\mathrm{scale}^2)$)."""
    s = float(scale)
    return build(key, dtype, lambda draw: (
        draw((n, dim, dim), s / np.sqrt(dim)), draw((n, width, dim), s / np.sqrt(dim)), draw((n, width), s),
        draw((n, dim, width), s / np.sqrt(width)), draw((n, dim), s)))


def check_save_times(ts: Any, T: Any, what: str = "ts") -> Array:
    """`ts` (a scalar counts as one time) as a 1-D array of save times, checked to be
    non-decreasing and inside $[0, T]$ (the values only when they are concrete)."""
    ts = jnp.atleast_1d(jnp.asarray(ts))
    if ts.ndim != 1:
        raise ValueError(f"`{what}`: expected a scalar or a 1-D array of times, received shape {ts.shape}.")
    if is_concrete(ts):
        tn = np.asarray(ts)
        if tn.size > 1 and not np.all(np.diff(tn) >= 0):
            i = int(np.argmax(np.diff(tn) < 0))
            raise ValueError(
                f"`{what}`: times must be non-decreasing (the solve runs forward from 0 to T); received "
                f"{what}[{i}] = {tn[i]:g} > {what}[{i + 1}] = {tn[i + 1]:g}."
            )
    check_times(ts, T, what)
    return ts


def check_grid(ts: Any, what: str = "ts") -> Array:
    """`ts` as an array, checked to be a time grid on $[0, T]$: 1-D, starting at 0, strictly
    increasing (when its values are known; under tracing only the shape is checked)."""
    ts = jnp.asarray(ts)
    if ts.ndim != 1 or ts.shape[0] < 1:
        raise ValueError(f"`{what}` must be a 1-D grid of at least one time, got shape {ts.shape}.")
    if is_concrete(ts):
        tn = np.asarray(ts)
        if abs(tn[0]) > 1e-12:
            raise ValueError(f"`{what}` must start at t = 0 (the interval is [0, T]); received {what}[0] = {tn[0]:g}.")
        if tn.size > 1 and not np.all(np.diff(tn) > 0):
            raise ValueError(f"`{what}` must be strictly increasing; received {tn.tolist()}.")
    return ts


class ParametricField(eqx.Module):
    """The vector field $v(x, t) = A(t)\\,x + W_2(t)\\,\\sigma(W_1(t)\\,x + b(t)) + c(t)$.

    The parameters live on a time grid $0 = t_0 < t_1 < \\dots < t_N = T$ and are
    **interpolated piecewise-linearly in $t$**: for $t \\in [t_i, t_{i+1}]$,
    $A(t) = (1 - w) A_i + w A_{i+1}$ with $w = (t - t_i) / (t_{i+1} - t_i)$, and likewise for
    $W_1, b, W_2, c$. (A grid with one node is a constant field.) The field is therefore
    continuous and piecewise smooth in $t$; adaptive solvers handle the kinks at the nodes,
    and a fixed-step Euler solver (a ResNet, see [`gaugejax.nn.discretize`][]) converges at
    first order.

    Called as `field(t, x)` with `x` of shape `(..., dim)`.

    **Arguments:**

    - `ts`: the grid, shape `(N + 1,)`, strictly increasing, starting at 0 (an integer grid
      is cast to the parameters' float dtype).
    - `A`, `W1`, `b`, `W2`, `c`: per-node parameters, each a sequence of `N + 1` arrays of
      shapes `(dim, dim)`, `(width, dim)`, `(width,)`, `(dim, width)`, `(dim,)` (or one
      stacked array with a leading node axis).
    - `activation`: the elementwise $\\sigma$ (its family decides the hidden sites' group).
    """

    ts: Float[Array, " nodes"]
    A: tuple[Array, ...]
    W1: tuple[Array, ...]
    b: tuple[Array, ...]
    W2: tuple[Array, ...]
    c: tuple[Array, ...]
    activation: Callable = eqx.field(static=True)

    def __init__(self, ts, A, W1, b, W2, c, activation: Callable = jnp.tanh):
        ts = check_grid(ts)
        n = ts.shape[0]

        def tup(name, x, ndim):
            xs = tuple(jnp.asarray(a) for a in x)
            if len(xs) != n:
                raise ValueError(f"`{name}`: expected {n} per-node arrays (one per time in `ts`), received {len(xs)}.")
            for i, a in enumerate(xs):
                if a.ndim != ndim:
                    raise ValueError(f"`{name}[{i}]`: expected a {ndim}-D array, received shape {a.shape}.")
            return xs

        A, W1, b, W2, c = tup("A", A, 2), tup("W1", W1, 2), tup("b", b, 1), tup("W2", W2, 2), tup("c", c, 1)
        if not jnp.issubdtype(ts.dtype, jnp.inexact):
            # an integer grid would make `at` cast t to integers (truncating it)
            ts = ts.astype(float_dtype((A, W1, b, W2, c)))
        d, m = A[0].shape[0], W1[0].shape[0]
        want = {"A": (d, d), "W1": (m, d), "b": (m,), "W2": (d, m), "c": (d,)}
        for name, xs in zip(want, (A, W1, b, W2, c)):
            for i, a in enumerate(xs):
                if a.shape != want[name]:
                    raise ValueError(
                        f"`{name}[{i}]`: expected shape {want[name]} (dim={d}, width={m}), received {a.shape}."
                    )
        self.ts, self.A, self.W1, self.b, self.W2, self.c = ts, A, W1, b, W2, c
        self.activation = activation

    @classmethod
    def random(
        cls,
        dim: int,
        width: int,
        *,
        T: float = 1.0,
        num_nodes: int = 5,
        activation: Callable = jnp.tanh,
        scale: float = 1.0,
        key: PRNGKeyArray,
        dtype: Any = None,
    ) -> ParametricField:
        """A random field on the uniform grid of `num_nodes` nodes over $[0, T]$; entries
        $\\sim N(0, \\mathrm{scale}^2 / \\mathrm{fan\\_in})$."""
        dtype = dtype or jnp.zeros(()).dtype
        n = int(num_nodes)
        A, W1, b, W2, c = random_blocks(key, n, dim, width, scale, dtype)
        ts = jnp.linspace(0.0, T, n, dtype=dtype) if n > 1 else jnp.zeros((1,), dtype)
        return cls(ts, A, W1, b, W2, c, activation)

    @property
    def dim(self) -> int:
        """The state dimension $d$."""
        return self.A[0].shape[0]

    @property
    def width(self) -> int:
        """The hidden width of $W_1$."""
        return self.W1[0].shape[0]

    @property
    def num_nodes(self) -> int:
        return self.ts.shape[0]

    def stacked(self) -> dict[str, Array]:
        """The parameters stacked along a leading node axis."""
        return {k: jnp.stack(getattr(self, k)) for k in ("A", "W1", "b", "W2", "c")}

    def at(self, t: Any) -> dict[str, Array]:
        """The interpolated parameters $(A, W_1, b, W_2, c)(t)$ as a dict."""
        ts = jax.lax.stop_gradient(self.ts)
        t = jnp.asarray(t, ts.dtype)
        return {k: interpolate(ts, v, t) for k, v in self.stacked().items()}

    def __call__(self, t: Any, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        p = self.at(t)
        return vector_field(p, x, self.activation)


def vector_field(p: dict[str, Array], x: Array, activation: Callable) -> Array:
    """$A x + W_2 \\sigma(W_1 x + b) + c$ for one set of parameters `p`."""
    hidden = activation(_mv(p["W1"], x) + jnp.broadcast_to(p["b"], (*x.shape[:-1], p["b"].shape[-1])))
    out = _mv(p["A"], x) + _mv(p["W2"], hidden)
    return out + jnp.broadcast_to(p["c"], out.shape)


def _apply(fn: Callable | None, x: Array) -> Array:
    """`fn(x)` on the last axis of `x`, vmapped over any leading axes (equinox layers take
    one vector)."""
    if fn is None:
        return x
    if x.ndim <= 1:
        return fn(x)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    out = jax.vmap(fn)(flat)
    return out.reshape(*lead, *out.shape[1:])


def check_readout(readout: Callable | None, dim: int, dtype: Any) -> None:
    """Refuse a readout that cannot take a state of dimension `dim` (a raw shape error from
    inside it otherwise), naming `readout`."""
    if readout is None:
        return
    try:
        jax.eval_shape(readout, jax.ShapeDtypeStruct((dim,), dtype))
    except (TypeError, ValueError) as e:
        raise ValueError(f"`readout`: cannot be applied to a state of dimension {dim}: {e}") from e


def check_input(fn: Callable | None, x: Array, what: str) -> None:
    """Refuse an input `x` that `fn` (applied to its last axis) cannot take, naming `what`,
    the dimension `fn` expects where it says (`in_features`, as `equinox.nn.Linear`) and
    the received shape (a raw shape error from inside it otherwise)."""
    if fn is None:
        return
    try:
        jax.eval_shape(fn, jax.ShapeDtypeStruct(x.shape[-1:], x.dtype))
    except (TypeError, ValueError) as e:
        n = getattr(fn, "in_features", None)
        if isinstance(n, int) and x.shape[-1:] != (n,):
            problem = f"expected an input of dimension {n} on the last axis, received shape {x.shape}"
        else:
            problem = f"cannot be applied to an input of shape {x.shape} and dtype {x.dtype}"
        raise ValueError(f"`{what}`: {problem}: {e}") from e


def _field_term(t: Array, y: Array, field: Callable) -> Array:
    """The diffrax vector field: the model's field arrives through `args` (not a closure),
    so that every adjoint, `diffrax.BacksolveAdjoint` included, differentiates it."""
    return field(t, y)


def _out_dim(fn: Callable | None, in_dim: int, dtype: Any) -> int:
    if fn is None:
        return in_dim
    return jax.eval_shape(fn, jax.ShapeDtypeStruct((in_dim,), dtype)).shape[-1]


class NeuralODE(eqx.Module):
    """A neural ODE $F = R \\circ \\Phi_{T \\leftarrow 0} \\circ E$, with the flow
    $\\Phi$ of $\\dot x = v(x, t)$ on $[0, T]$ solved by diffrax.

    Gradients flow through the solve with the chosen diffrax adjoint (default
    `diffrax.RecursiveCheckpointAdjoint`, i.e. discretise-then-optimise).

    **Arguments:**

    - `field`: the vector field, any callable Module `field(t, x) -> dx/dt` with `x` of shape
      `(dim,)`; e.g. a [`gaugejax.nn.ParametricField`][].
    - `T`: the end time (the interval is $[0, T]$).
    - `embedding`: $E$, a callable (e.g. `equinox.nn.Linear(in, dim)`) or `None` (identity).
    - `readout`: $R$, a callable or `None` (identity).
    - `solver`: a diffrax solver (default `diffrax.Tsit5()`).
    - `stepsize_controller`: a diffrax controller (default
      `diffrax.PIDController(rtol=1e-6, atol=1e-6)`).
    - `dt0`: the initial step (`None`: chosen by the controller; required for constant steps).
    - `max_steps`: diffrax's step budget.
    - `adjoint`: the diffrax adjoint used for gradients.
    - `dim`: the state dimension; inferred from a `ParametricField`, else required.
    """

    field: Callable
    embedding: Callable | None
    readout: Callable | None
    T: float | Array
    solver: diffrax.AbstractSolver
    stepsize_controller: diffrax.AbstractStepSizeController
    adjoint: diffrax.AbstractAdjoint
    dt0: float | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    dim: int = eqx.field(static=True)

    def __init__(
        self,
        field: Callable,
        T: float | Array = 1.0,
        *,
        embedding: Callable | None = None,
        readout: Callable | None = None,
        solver: diffrax.AbstractSolver | None = None,
        stepsize_controller: diffrax.AbstractStepSizeController | None = None,
        dt0: float | None = None,
        max_steps: int = 16384,
        adjoint: diffrax.AbstractAdjoint | None = None,
        dim: int | None = None,
    ):
        if not callable(field):
            raise TypeError(f"`field` must be a callable field(t, x), got {type(field).__name__}.")
        if dim is None:
            dim = getattr(field, "dim", None)
        if dim is None:
            raise ValueError("`dim`: could not infer the state dimension from `field`; pass dim=...")
        if is_concrete(T) and not float(T) > 0:
            raise ValueError(f"`T` must be positive (the interval is [0, T]); received {float(T)!r}.")
        if isinstance(field, ParametricField) and is_concrete(field.ts, T) and field.num_nodes > 1:
            if abs(float(field.ts[-1]) - float(T)) > time_tol(field.ts.dtype, float(T)):
                raise ValueError(
                    f"`field.ts` must end at T = {float(T):g} (the grid covers [0, T]); received "
                    f"ts[-1] = {float(field.ts[-1]):g}."
                )
        self.field = field
        self.T = T
        self.embedding = embedding
        self.readout = readout
        self.solver = diffrax.Tsit5() if solver is None else solver
        self.stepsize_controller = (
            diffrax.PIDController(rtol=1e-6, atol=1e-6) if stepsize_controller is None else stepsize_controller
        )
        self.adjoint = diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint
        self.dt0 = dt0
        self.max_steps = int(max_steps)
        self.dim = int(dim)

    def _check_state(self, x: Array, what: str) -> None:
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"`{what}`: expected a state of dimension {self.dim} on the last axis, received shape {x.shape}.")
        out = jax.eval_shape(self.field, jax.ShapeDtypeStruct((), x.dtype), jax.ShapeDtypeStruct((self.dim,), x.dtype))
        if out.shape != (self.dim,):
            raise ValueError(
                f"`field`: returned shape {out.shape} for a state of shape ({self.dim},); a vector field "
                f"must return the state's shape ({self.dim},)."
            )

    def solve(self, x0: Float[Array, " dim"], *, ts: Any = None) -> diffrax.Solution:
        """The diffrax solution from `x0` at time 0 to time `T` (saved at `ts` if given,
        else at `T`; `ts` is a time or a 1-D non-decreasing array of times in $[0, T]$).
        `sol.stats["num_steps"]` and the solver's evaluations per step give the number of
        vector-field evaluations (see `num_evaluations`)."""
        x0 = float_state(x0, float_dtype(self.field))
        self._check_state(x0, "x0")
        if x0.ndim != 1:
            raise ValueError(f"`x0`: solve takes one state of shape ({self.dim},); vmap for batches, received {x0.shape}.")
        if ts is not None:
            ts = check_save_times(ts, self.T, "ts")
        saveat = diffrax.SaveAt(ts=ts.astype(x0.dtype)) if ts is not None else diffrax.SaveAt(t1=True)
        return diffrax.diffeqsolve(
            diffrax.ODETerm(_field_term),
            self.solver,
            jnp.zeros((), x0.dtype),
            jnp.asarray(self.T, x0.dtype),
            self.dt0,
            x0,
            args=self.field,
            saveat=saveat,
            stepsize_controller=self.stepsize_controller,
            adjoint=self.adjoint,
            max_steps=self.max_steps,
        )

    def flow(self, x0: Float[Array, "*batch dim"], *, ts: Any = None) -> Array:
        """$\\Phi_{T \\leftarrow 0}(x_0)$ (or the states at the times `ts`, shape
        `(*batch, len(ts), dim)`; a single time counts as one); any leading batch axes are
        vmapped."""
        x0 = float_state(x0, float_dtype(self.field))
        self._check_state(x0, "x0")
        if ts is not None:
            ts = check_save_times(ts, self.T, "ts")

        def one(x):
            ys = self.solve(x, ts=ts).ys
            return ys if ts is not None else ys[-1]

        if x0.ndim == 1:
            return one(x0)
        return jax.vmap(one)(x0.reshape(-1, self.dim)).reshape(*x0.shape[:-1], *((len(ts),) if ts is not None else ()), self.dim)

    def embed(self, x: Array) -> Array:
        """$E(x)$ (any leading batch axes are vmapped): `x` is checked against what the
        embedding takes, its output against the state dimension."""
        x = jnp.asarray(x)
        check_input(self.embedding, x, "embedding")
        z = _apply(self.embedding, x)
        if z.shape[-1:] != (self.dim,):
            raise ValueError(
                f"`embedding`: maps the input to dimension {z.shape[-1:]}, but the state dimension is {self.dim}."
            )
        return z

    def __call__(self, x: Float[Array, "*batch in"]) -> Array:
        """$R(\\Phi_{T \\leftarrow 0}(E(x)))$; leading batch axes are vmapped."""
        z = self.flow(self.embed(x))
        check_readout(self.readout, self.dim, z.dtype)
        return _apply(self.readout, z)

    def num_evaluations(self, x0: Float[Array, " dim"]) -> Array:
        """Vector-field evaluations of the steps of one solve from `x0`: diffrax's
        `num_steps` (accepted and rejected) times the explicit stages per step of the
        solver. Exact for explicit Runge-Kutta solvers without FSAL (Euler, Heun,
        Midpoint, Ralston); an FSAL solver (Tsit5, Dopri5, Bosh3, ...) reuses its last stage
        as the next step's first, counted once per step, so its one evaluation at the
        initial state is not counted (the count is one short). Evaluations made outside
        the steps (a step-size controller choosing `dt0`) are not counted either.

        Implicit solvers (`diffrax.AbstractImplicitSolver`: Kvaerno, implicit Euler, ...)
        are refused with a `ValueError`: their Newton iterations and Jacobians make an
        unknown number of evaluations per stage (Kvaerno5 made more than twice the
        stage count), so a stage count would understate them."""
        if isinstance(self.solver, diffrax.AbstractImplicitSolver):
            raise ValueError(
                f"num_evaluations counts the explicit stages of each step; the implicit solver "
                f"{type(self.solver).__name__} also evaluates the field in its Newton iterations and "
                "Jacobians, which it cannot count. Use an explicit solver (e.g. diffrax.Tsit5) or count "
                "evaluations with a callback in the field."
            )
        sol = self.solve(x0)
        stages = _stages(self.solver)
        return sol.stats["num_steps"] * stages


def _stages(solver: Any) -> int:
    tableau = getattr(solver, "tableau", None)
    if tableau is None:
        return {"Euler": 1, "Heun": 2, "Midpoint": 2, "Ralston": 2}.get(type(solver).__name__, 1)
    n = len(tableau.c) + 1
    return n - 1 if getattr(tableau, "fsal", False) else n
