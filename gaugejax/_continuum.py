"""The continuum limit, measured: MATH.md S12 and S13 as convergence tables.

- **S12** (ResNet -> neural ODE): the Euler ResNet `discretize(node, L)` (step $h = T/L$)
  approaches the flow map of the parametric neural ODE with error $\\propto 1/L$: log-log
  slope $-1$.
- **S13** (lattice gauge -> connection law): with $g_l = G(lh)$ for a smooth path $G$,
  the lattice-transformed link $A'_l = (g_{l+1}(I + hA_l)g_l^{-1} - I)/h$ (the engine's
  [`gaugejax.Link`][]) approaches $GAG^{-1} + \\dot G G^{-1}$ at $t_l$ with error $O(h)$:
  slope $-1$. Run for a positive diagonal $G$ (the feedforward rescaling) and a general
  $G \\in GL(d)$.

[`gaugejax.continuum_tables`][] returns plain dicts (for the CLI's `gaugejax continuum`,
JSON and plots); [`gaugejax.continuum_report_rows`][] condenses them to report rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._coupling import Link
from ._diffeo import SmoothLiePath, connection_transform
from ._gauge import Gauge
from ._groups import GL
from .nn._node import NeuralODE, ParametricField, vector_field


DEFAULT_LS: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024)
#: a measured slope passes when within this distance of the theory (+-0.1)
SLOPE_TOL = 0.1


def _rate_table(statement: str, description: str, Ls: Sequence[int], errors: list[float],
                config: dict[str, Any], t0: float) -> dict[str, Any]:
    """A convergence table: the errors per depth, the fitted log-log slope and its verdict
    against the theory's slope -1."""
    slope = fit_slope(Ls, errors)
    return {
        "statement": statement,
        "description": description,
        "L": [int(L) for L in Ls],
        "error": errors,
        "slope": slope,
        "expected_slope": -1.0,
        "tolerance": SLOPE_TOL,
        "passed": bool(abs(slope + 1.0) <= SLOPE_TOL),
        "config": config,
        "seconds": time.perf_counter() - t0,
    }


def fit_slope(Ls: Sequence[int], errors: Sequence[float]) -> float:
    """Least-squares slope of $\\log(\\mathrm{error})$ against $\\log L$."""
    x = np.log(np.asarray(Ls, np.float64))
    y = np.log(np.asarray(errors, np.float64))
    return float(np.polyfit(x, y, 1)[0])


@eqx.filter_jit
def _euler_dynamic(field: ParametricField, x0: jax.Array, L: jax.Array, T: jax.Array) -> jax.Array:
    """$L$ Euler steps with $L$ a traced integer (one compilation for every $L$); block
    $l$ uses the field's parameters at $t = lh$, exactly as `discretize(node, L)` does."""
    h = T / L.astype(T.dtype)

    def body(l, x):
        p = field.at(l.astype(T.dtype) * h)
        return x + h * vector_field(p, x, field.activation)

    return jax.lax.fori_loop(0, L, body, x0)


@eqx.filter_jit
def _reference_flow(node: NeuralODE, x0: jax.Array) -> jax.Array:
    return node.flow(x0)


def s12_table(
    Ls: Sequence[int] = DEFAULT_LS,
    *,
    dim: int = 3,
    width: int = 4,
    num_nodes: int = 5,
    num_states: int = 4,
    T: float = 1.0,
    seed: int = 0,
    rtol: float = 1e-12,
) -> dict[str, Any]:
    """S12: $\\max_x |\\mathrm{ResNet}_L(x) - \\Phi_{T\\leftarrow 0}(x)|$ over `num_states`
    random states, for each $L$ in `Ls`, float64. The reference flow is diffrax's Dopri8
    at `rtol = atol = rtol`.

    **Returns:** `{"statement": "S12", "L": [...], "error": [...], "slope": s,
    "expected_slope": -1.0, "passed": |s + 1| <= 0.1, ...}`.
    """
    with jax.enable_x64(True):
        t0 = time.perf_counter()
        kf, kx = jax.random.split(jax.random.key(seed))
        field = ParametricField.random(dim, width, T=T, num_nodes=num_nodes, key=kf, dtype=jnp.float64)
        node = NeuralODE(field, T, solver=diffrax.Dopri8(),
                         stepsize_controller=diffrax.PIDController(rtol=rtol, atol=rtol))
        xs = jax.random.normal(kx, (num_states, dim), jnp.float64)
        ref = _reference_flow(node, xs)
        Tarr = jnp.asarray(T, jnp.float64)
        errors = []
        for L in Ls:
            out = jax.vmap(lambda x, L=L: _euler_dynamic(field, x, jnp.asarray(L), Tarr))(xs)
            errors.append(float(jnp.max(jnp.abs(out - ref))))
        return _rate_table(
            "S12", "ResNet (Euler, h = T/L) vs the neural-ODE flow map: max abs error", Ls, errors,
            {"dim": dim, "width": width, "num_nodes": num_nodes, "T": T, "seed": seed,
             "reference": f"diffrax.Dopri8, rtol = atol = {rtol:g}", "dtype": "float64"},
            t0,
        )


def lattice_links(A: jax.Array, gs: jax.Array, h: float, *, engine: bool = True) -> jax.Array:
    """The lattice gauge transform of the links, $A'_l$ with
    $I + hA'_l = g_{l+1}(I + hA_l)g_l^{-1}$, for stacked `A` `(L, d, d)` and `gs`
    `(L + 1, d, d)`. With `engine=True` it goes through [`gaugejax.Gauge`][] with one
    [`gaugejax.Link`][] per block (sites `s0 .. sL`, $GL(d)$); `engine=False` is the same
    formula vectorised (fast, for large sweeps; the tests check both agree to 1e-12)."""
    L, d = A.shape[0], A.shape[-1]
    if gs.shape != (L + 1, d, d):
        raise ValueError(f"`gs`: expected shape ({L + 1}, {d}, {d}) (one element per depth 0..L), received {gs.shape}.")
    if engine:
        params = {"A": list(A)}
        gauge = Gauge({f"s{l}": GL(d) for l in range(L + 1)},
                      [Link(f"A/{l}", out_site=f"s{l + 1}", in_site=f"s{l}", h=h) for l in range(L)], params)
        out = gauge.act({f"s{l}": gs[l] for l in range(L + 1)}, params, check=False)
        return jnp.stack(out["A"])
    return _links_vectorised(A, gs[:-1], gs[1:], jnp.full((L,), h, A.dtype))


@jax.jit
def _links_vectorised(A: jax.Array, g_in: jax.Array, g_out: jax.Array, h: jax.Array) -> jax.Array:
    """$(g_{out}(I + hA)g_{in}^{-1} - I)/h$ blockwise (the engine's Link formula)."""
    d = A.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(d, dtype=A.dtype), A.shape)
    hh = h[:, None, None]
    hi = jax.lax.Precision.HIGHEST
    U = jnp.matmul(jnp.matmul(g_out, eye + hh * A, precision=hi), jnp.linalg.inv(g_in), precision=hi)
    return (U - eye) / hh


@eqx.filter_jit
def _on_times(field: ParametricField, path: SmoothLiePath, t: jax.Array):
    """$G$, $A$ and the continuum target $GAG^{-1} + \\dot GG^{-1}$ at every time in `t`,
    in one compilation."""
    A_of_t = lambda s: field.at(s)["A"]  # noqa: E731
    return jax.vmap(path)(t), jax.vmap(A_of_t)(t), jax.vmap(connection_transform(A_of_t, path))(t)


def s13_table(
    Ls: Sequence[int] = DEFAULT_LS,
    *,
    dim: int = 3,
    diagonal: bool = True,
    num_modes: int = 2,
    scale: float = 0.5,
    T: float = 1.0,
    seed: int = 0,
    engine: bool = False,
) -> dict[str, Any]:
    """S13: $\\max_l |A'_l - (GAG^{-1} + \\dot GG^{-1})(lh)|$ for each $L$ in `Ls`, where
    $A'_l$ is the lattice gauge transform with $g_l = G(lh)$, $G$ a
    [`gaugejax.SmoothLiePath`][] (positive diagonal if `diagonal`, else general $GL(d)$)
    and $A(t)$ the linear part of a random parametric field. $\\dot G$ by `jax.jvp`.

    **Returns:** a dict like [`gaugejax.continuum_tables`][]'s S12 entry.
    """
    with jax.enable_x64(True):
        t0 = time.perf_counter()
        kf, kg = jax.random.split(jax.random.key(seed))
        field = ParametricField.random(dim, 2, T=T, num_nodes=5, key=kf, dtype=jnp.float64)
        path = SmoothLiePath.random(dim, num_modes=num_modes, scale=scale, T=T, diagonal=diagonal,
                                    boundary_identity=False, key=kg, dtype=jnp.float64)
        grids = [jnp.arange(L + 1, dtype=jnp.float64) * (T / L) for L in Ls]
        G_all, A_all, target_all = _on_times(field, path, jnp.concatenate(grids))
        errors = []
        if engine:
            start = 0
            for L in Ls:
                gs, A, target = (x[start : start + L + 1] for x in (G_all, A_all, target_all))
                start += L + 1
                new = lattice_links(A[:-1], gs, T / L, engine=True)
                errors.append(float(jnp.max(jnp.abs(new - target[:-1]))))
        else:  # every depth's links in one vectorised call: blocks are independent
            cur = np.concatenate([np.arange(L) + sum(M + 1 for M in Ls[:i]) for i, L in enumerate(Ls)])
            hs = jnp.concatenate([jnp.full((L,), T / L, jnp.float64) for L in Ls])
            new = _links_vectorised(A_all[cur], G_all[cur], G_all[cur + 1], hs)
            err = jnp.max(jnp.abs(new - target_all[cur]), axis=(1, 2))
            bounds = np.cumsum([0, *Ls])
            errors = [float(jnp.max(err[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
        kind = "positive diagonal G (feedforward rescaling)" if diagonal else "general G in GL(d)"
        return _rate_table(
            "S13",
            f"lattice gauge (g_l = G(lh)) vs connection law G A G^-1 + dG/dt G^-1, {kind}: max abs error",
            Ls, errors,
            {"dim": dim, "diagonal": diagonal, "num_modes": num_modes, "scale": scale, "T": T,
             "seed": seed, "engine": engine, "dtype": "float64"},
            t0,
        )


def continuum_tables(
    Ls: Sequence[int] = DEFAULT_LS,
    *,
    seed: int = 0,
    dim: int = 3,
    engine: bool = False,
) -> dict[str, dict[str, Any]]:
    """The S12 and S13 convergence tables as plain dicts (JSON-ready): `{"S12": ...,
    "S13-diagonal": ..., "S13-GL": ...}`, each with `"L"`, `"error"`, `"slope"`,
    `"expected_slope"`, `"passed"` (slope within 0.1 of the theory), `"config"`,
    `"seconds"`.

    **Arguments:**

    - `Ls`: the depths (default 8, 16, ..., 1024).
    - `seed`: the random model and gauge path.
    - `dim`: the state dimension.
    - `engine`: compute the S13 lattice transform through [`gaugejax.Gauge`][] (one
      [`gaugejax.Link`][] per block; tens of seconds for the whole sweep on a loaded CPU)
      instead of the same formula vectorised (default; the tests check the two agree to
      1e-12).
    """
    given = list(Ls)
    if not all(isinstance(L, (int, np.integer)) and not isinstance(L, bool) for L in given):
        raise TypeError(f"`Ls`: depths must be integers; received {given}.")
    Ls = [int(L) for L in given]
    if len(set(Ls)) < 2 or len(set(Ls)) != len(Ls) or any(L < 1 for L in Ls):
        raise ValueError(f"`Ls`: need at least two distinct positive depths to fit a slope; received {Ls}.")
    return {
        "S12": s12_table(Ls, seed=seed, dim=dim),
        "S13-diagonal": s13_table(Ls, seed=seed, dim=dim, diagonal=True, engine=engine),
        "S13-GL": s13_table(Ls, seed=seed, dim=dim, diagonal=False, engine=engine),
    }


def format_table(table: dict[str, Any]) -> str:
    """A plain-text rendering: one line per $L$ with the error and the local slope, then
    the fitted slope against the theory."""
    lines = [f"{table['statement']}: {table['description']}", f"{'L':>6} {'error':>12} {'local slope':>12}"]
    prev = None
    for L, e in zip(table["L"], table["error"]):
        local = "" if prev is None else f"{math.log(e / prev[1]) / math.log(L / prev[0]):12.3f}"
        lines.append(f"{L:>6} {e:12.4e} {local}")
        prev = (L, e)
    verdict = "ok" if table["passed"] else "FAILED"
    lines.append(f"fitted slope {table['slope']:.3f} (theory {table['expected_slope']:.0f} +- {table['tolerance']}): {verdict}")
    return "\n".join(lines)


def plot_tables(tables: dict[str, dict[str, Any]], directory: str) -> list[str]:
    """Log-log plots (error vs $L$, with the fitted line and a slope -1 guide), one PNG per
    table, into `directory`. Returns the paths written."""
    import pathlib

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, tab in tables.items():
        Ls, errs = np.asarray(tab["L"], float), np.asarray(tab["error"], float)
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        ax.loglog(Ls, errs, "o-", label=f"measured (slope {tab['slope']:.3f})")
        ax.loglog(Ls, errs[0] * (Ls / Ls[0]) ** tab["expected_slope"], "k--", lw=0.8, label="slope -1")
        ax.set_xlabel("L (blocks)")
        ax.set_ylabel("error")
        ax.set_title(name)
        ax.legend()
        fig.tight_layout()
        p = out / f"continuum-{name}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(str(p))
    return paths


def continuum_report_rows(tables: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """Rows for `gaugejax report`: one per table, `{"check", "statement", "measured",
    "expected", "passed", "detail"}` with the fitted slope as the measurement. Computes the
    tables (`continuum_tables(**kwargs)`) when not given."""
    tables = continuum_tables(**kwargs) if tables is None else tables
    rows = []
    for name, tab in tables.items():
        rows.append({
            "check": f"continuum limit {name}",
            "statement": tab["statement"],
            "measured": round(tab["slope"], 4),
            "expected": f"{tab['expected_slope']:.0f} +- {tab['tolerance']}",
            "passed": tab["passed"],
            "detail": f"L = {tab['L'][0]}..{tab['L'][-1]}, error {tab['error'][0]:.2e} -> {tab['error'][-1]:.2e}",
        })
    return rows
