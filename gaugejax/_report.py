"""`gaugejax report`: the library checking its own claims on built-in models.

For each default model: parameter count, gauge sites and groups, orbit dimension (formula
and numerical rank of the vertical space), functional dimension (Jacobian rank) against
params - orbit, invariance sweeps in float32 and float64 (S1-S3), the balanced point of
the rescaling orbit (S4), and negative controls that must fail (S1, S2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import _activations
from ._balance import balance, balance_residual
from ._feedforward import derive_gauge
from ._functional import functional_dimension, probe_inputs
from ._groups import PositiveDiagonal, SignFlip
from ._infer import inference_report_rows
from ._report_node import run_node_case
from ._report_transformer import (
    MAX_SAMPLES as TRANSFORMER_MAX_SAMPLES,
    cast_floats,
    run_minilm_case,
    run_transformer_case,
    transformer_cases,
    transformer_table,
)
from ._sweep import CONTROL_MIN_ERROR, check_invariance
from .nn import MLP


#: The report's models are tiny, so its sweeps are compile-bound: a sequential map (chunk
#: 1) compiles in about half the time of a vmapped one (XLA:CPU spends most of it on the
#: vmapped random sampling) and still runs 2048 elements in well under 0.1 s.
SWEEP_CHUNK = 1

#: at most this many Jacobian rows (outputs x inputs) for the functional dimension
FD_MAX_ROWS = 8192

#: S4 (float64): the balanced model's moment-map residual, and its change of function
BALANCE_RESIDUAL_TOL = 1e-8
BALANCE_FUNCTION_TOL = 1e-10


def control_samples(num_samples: int) -> int:
    """Group elements per negative-control sweep of an MLP or ResNet row (a control breaks
    by O(1), so an eighth of the sweep's samples is plenty)."""
    return max(1, num_samples // 8)


def json_text(result: Any) -> str:
    """`result` as strict JSON: non-finite numbers (a functional dimension's gap of `inf`
    at full rank, a NaN error) become `null`, since `Infinity` and `NaN` are not JSON."""

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if hasattr(x, "item") and not isinstance(x, str) and np.ndim(x) == 0:  # NumPy or JAX scalars
            x = x.item()
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x

    return json.dumps(clean(result), indent=2, default=float, allow_nan=False)


def checks_of(m: dict[str, Any]) -> dict[str, bool]:
    """The verdicts of one model row besides its sweeps and controls: the orbit's numerical
    rank equals its dimension, the functional dimension is at most params - orbit (below it
    is allowed: some shapes fall short; above it contradicts the gauge), and S4 (the
    balanced point has a zero moment map and computes the same function)."""
    out = {"orbit_rank_equals_orbit_dim": m["orbit_rank"] == m["orbit_dim"],
           "functional_dim_within_bound": m["functional_dim"] <= m["params_minus_orbit"]}
    bal = m.get("balance")
    if bal:
        out["balance"] = (bal["residual_after"] <= BALANCE_RESIDUAL_TOL
                          and bal["function_rel_change"] <= BALANCE_FUNCTION_TOL)
    return out


def report_ok(result: dict[str, Any]) -> bool:
    """Whether every verdict of a report passed: every sweep, every control broke, every
    row's `checks`, the transformer rows (sweeps, processing, the orbit formula against the
    engine) and gauge inference agreeing with the declared gauges."""
    from ._report_transformer import transformer_rows_ok

    rows = [*result["models"], result["node"]]
    return (all(s["passed"] for m in rows for s in m["sweeps"])
            and all(c["broke_as_predicted"] for m in rows for c in m["controls"])
            and all(all(m["checks"].values()) for m in result["models"])
            and transformer_rows_ok(result["transformers"])
            and all(r["agrees"] for r in result["inference"]))


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """A built-in model of the report.

    `build(key, dtype)` returns the model; `in_dim` is its input dimension; `gauge_kwargs`
    go to `derive_gauge`; each control is `(name, derive_gauge kwargs)` forcing a group the
    model does not admit (with `unsafe=True`); `balance` runs the S4 check (ReLU models).
    """

    name: str
    description: str
    build: Callable[[Any, Any], Any]
    in_dim: int
    activation: Callable
    gauge_kwargs: tuple[tuple[str, Any], ...] = ()
    controls: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    balance: bool = False


def _mlp_case(name, sizes, activation, controls=(), balance=False) -> ModelCase:
    def build(key, dtype):
        return MLP(sizes, activation, key=key, dtype=dtype)

    return ModelCase(name, f"MLP {tuple(sizes)}", build, sizes[0], activation, (),
                     tuple((n, (("group", g), ("unsafe", True))) for n, g in controls), balance)


def _resnet(key, dtype):
    from .nn import ResNet
    from .nn._init import linears

    k, k_er = jax.random.split(key)
    embedding, readout = linears([(4, 3), (3, 2)], key=k_er, dtype=dtype)
    return ResNet.random(3, 4, 2, activation=jax.nn.relu, key=k, dtype=dtype, embedding=embedding, readout=readout)


#: The report's ResNet sweeps the stream with the lifted feedforward rescaling (positive
#: diagonal G, MATH.md S13); the tests sweep the full GL(d) streams, whose matrix
#: exponentials triple the compile time of this row.
RESNET_GAUGE = (("boundary", "absorb"), ("stream_group", PositiveDiagonal))


def default_cases() -> list[ModelCase]:
    return [
        _mlp_case("mlp-relu", (8, 16, 12, 4), jax.nn.relu,
                  (("relu: negative scales (sign flips)", SignFlip),), balance=True),
        _mlp_case("mlp-tanh", (8, 16, 12, 4), jnp.tanh, (("tanh: positive rescaling", PositiveDiagonal),)),
        _mlp_case("mlp-gelu", (8, 16, 12, 4), jax.nn.gelu, (("gelu: positive rescaling", PositiveDiagonal),)),
        _mlp_case("mlp-relu-expanding", (4, 24, 24, 2), jax.nn.relu, balance=True),
        ModelCase(
            "resnet-relu", "ResNet d=3, width 4, L=2, linear E (4->3) and R (3->2); lattice gauge "
            "(links U_l = I + hA_l), positive diagonal streams absorbed by E and R",
            _resnet, 4, jax.nn.relu, RESNET_GAUGE,
            (("resnet: negative scales through relu", (*RESNET_GAUGE, ("group", SignFlip), ("unsafe", True))),),
            balance=False,
        ),
    ]


def _forward(model, x):
    return model(x)


# The report's draws as compiled programs: eagerly, every `jax.random` call with a new shape
# compiles on its own (the report's eager draws and casts were about 14 s of compilation).
_probe_inputs = jax.jit(probe_inputs, static_argnums=(1, 2), static_argnames=("dtype", "max_scale"))
_normal = jax.jit(jax.random.normal, static_argnums=(1, 2))


@eqx.filter_jit
def _balance_row(diag, model, key, x):
    """S4 on a model moved far along its rescaling orbit, as one compiled program (eagerly,
    every primitive of sample, act and the summary compiles on its own: about 4 s)."""
    far = diag.act(diag.sample(key, scale=1.0, dtype=x.dtype), model)
    balanced, _ = balance(diag, far)
    sq = lambda m: sum(jnp.sum(a**2) for a in jax.tree.leaves(m) if eqx.is_inexact_array(a))  # noqa: E731
    y0, y1 = _forward(far, x), _forward(balanced, x)
    return {
        "residual_before": balance_residual(diag, far),
        "residual_after": balance_residual(diag, balanced),
        "norm2_before": sq(far), "norm2_after": sq(balanced),
        "function_rel_change": jnp.max(jnp.abs(y1 - y0)) / jnp.max(jnp.abs(y0)),
    }


def run_case(case: ModelCase, *, num_samples: int, seed: int) -> tuple[dict[str, Any], dict]:
    """One model's report row, and its sweeps' per-element errors keyed by (name, dtype)
    (for the histograms of `--plot`)."""
    errors: dict = {}
    key = jax.random.key(seed)
    k_model, k_x, k_sweep, k_fd = jax.random.split(key, 4)
    out: dict[str, Any] = {"name": case.name, "description": case.description,
                           "activation": getattr(case.activation, "__name__", str(case.activation)),
                           "family": _activations.activation_family(case.activation)}
    timings: dict[str, float] = {}
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        timings[name] = round(now - tick, 3)
        tick = now

    model64 = case.build(k_model, jnp.float64)
    gkw = dict(case.gauge_kwargs)
    gauge = derive_gauge(model64, **gkw)
    n_params = sum(x.size for x in jax.tree.leaves(model64) if eqx.is_inexact_array(x))
    out["params"] = int(n_params)
    out["sites"] = [{"name": n, "group": repr(g)} for n, g in gauge.sites]
    out["orbit_dim"] = gauge.orbit_dim
    out["orbit_rank"] = gauge.orbit_rank(model64)
    lap("orbit_rank")

    # Jacobian rows: 32 per parameter, at most FD_MAX_ROWS (the SVD's cost is rows x
    # params^2); radii spread over [1, 50] (the rank depends on the activation regions the
    # inputs visit; see probe_inputs)
    out_dim = jax.eval_shape(model64, jax.ShapeDtypeStruct((case.in_dim,), jnp.float64)).size
    n_inputs = math.ceil(min(32 * n_params, FD_MAX_ROWS) / out_dim)
    x_fd = _probe_inputs(k_fd, n_inputs, case.in_dim, dtype=jnp.float64)
    fd = functional_dimension(_forward, model64, x_fd, per_example=True)
    out["functional_dim"] = fd.rank
    out["functional_dim_gap"] = fd.gap
    out["params_minus_orbit"] = n_params - gauge.orbit_dim
    out["functional_equals_params_minus_orbit"] = fd.rank == n_params - gauge.orbit_dim
    lap("functional_dim")

    x64 = _normal(k_x, (32, case.in_dim), jnp.float64)
    sweeps = []
    for dtype in (jnp.float32, jnp.float64):
        model = cast_floats(model64, dtype)
        gauge_d = derive_gauge(model, **gkw)
        rep = check_invariance(_forward, gauge_d, model, cast_floats(x64, dtype), key=k_sweep,
                               num_samples=num_samples, chunk_size=SWEEP_CHUNK)
        errors[(case.name, rep.dtype)] = rep.errors
        sweeps.append({"dtype": rep.dtype, "num_samples": rep.num_samples,
                       "max_rel_error": rep.max_rel_error, "median_rel_error": rep.median_rel_error,
                       "max_eps": rep.max_eps, "rtol": rep.rtol, "passed": rep.passed})
    out["sweeps"] = sweeps
    lap("sweeps")

    if case.balance:
        # S4: the minimum of |theta|^2 over the rescaling orbit is balanced.
        diag = derive_gauge(model64, group=PositiveDiagonal)
        out["balance"] = {k: float(v) for k, v in _balance_row(diag, model64, k_sweep, x64).items()}
        lap("balance")

    controls = []
    for name, kwargs in case.controls:
        bad = derive_gauge(model64, **dict(kwargs))
        rep = check_invariance(_forward, bad, model64, x64, key=k_sweep,
                               num_samples=control_samples(num_samples), chunk_size=SWEEP_CHUNK)
        controls.append({"name": name, "num_samples": rep.num_samples, "max_rel_error": rep.max_rel_error,
                         "median_rel_error": rep.median_rel_error,
                         "broke_as_predicted": rep.median_rel_error >= CONTROL_MIN_ERROR})
    out["controls"] = controls
    lap("controls")
    out["checks"] = checks_of(out)
    out["seconds"] = timings
    return out, errors


def run_report(*, num_samples: int = 2048, seed: int = 0, json_path: str | None = None,
               plot_dir: str | None = None, console=None, model: str | None = None) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    # a file or pipe gets a wide table rather than rich's 80-column default
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    start = time.perf_counter()
    errors: dict = {}
    models = []
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    cases = default_cases()
    # Two models at a time, in two worker processes: most of the time is XLA compilation,
    # but tracing and lowering (a third of it) hold the GIL, so two threads wait on each
    # other. NumPy's SVDs (orbit rank, functional dimension) run on one BLAS thread in each
    # worker: multithreaded OpenBLAS in both would oversubscribe the cores (an 8192 x 400
    # SVD takes 3-5 s instead of 0.6 s on 2 shared cores).
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} models"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        t_cases = transformer_cases()
        task = bar.add_task("compiling and sweeping", total=len(cases) + len(t_cases) + 2 + (model == "minilm"))
        # "spawn": the parent's JAX runtime has threads, which a fork would not carry over
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=2, mp_context=ctx, initializer=_worker_init) as pool:
            # the longest single jobs first: the neural ODE's diffrax compilation, the transformers
            node_future = pool.submit(run_node_case, num_samples=num_samples, seed=seed)
            infer_future = pool.submit(inference_report_rows, seed=seed, certify=False)
            t_futures = [pool.submit(_transformer_job, i, num_samples, seed) for i in range(len(t_cases))]
            futures = [pool.submit(_case_job, i, num_samples, seed) for i in range(len(cases))]
            for f in futures:
                out, errs = f.result()
                models.append(out)
                errors.update(errs)
                bar.advance(task)
            node = node_future.result()
            bar.advance(task)
            inference = infer_future.result()
            bar.advance(task)
            transformers = []
            for f in t_futures:
                transformers.append(f.result())
                bar.advance(task)
        if model == "minilm":
            transformers.append(run_minilm_case(seed=seed))
            bar.advance(task)

    table = Table(title="gaugejax report: gauge symmetries of built-in models")
    for col in ("model", "params", "sites", "orbit", "functional", "= params - orbit",
                "float32 max err", "float64 max err", "S4 balance",
                f"negative controls ({control_samples(num_samples)} samples)"):
        table.add_column(col, overflow="fold")
    for m in models:
        groups = ", ".join(f"{s['name']}: {s['group']}" for s in m["sites"])
        sw = {s["dtype"]: s for s in m["sweeps"]}

        def fmt(s):
            mark = "[green]ok[/green]" if s["passed"] else "[red]FAIL[/red]"
            return f"{s['max_rel_error']:.1e} ({s['max_eps']:.0f} eps) {mark}"

        eq = m["functional_equals_params_minus_orbit"]
        checks = m["checks"]
        bal = m.get("balance")
        bal_s = (f"residual {bal['residual_before']:.1e} -> {bal['residual_after']:.1e}, "
                 f"|θ|² {bal['norm2_before']:.1f} -> {bal['norm2_after']:.1f}, "
                 f"function {bal['function_rel_change']:.0e} "
                 + ("[green]ok[/green]" if checks["balance"] else "[red]FAIL[/red]")) if bal else "-"
        if eq:
            fd_s = "[green]yes[/green]"
        elif checks["functional_dim_within_bound"]:
            fd_s = f"[yellow]no[/yellow] (below {m['params_minus_orbit']})"
        else:
            fd_s = f"[red]FAIL[/red] (above {m['params_minus_orbit']})"
        orbit_s = f"{m['orbit_dim']} (rank {m['orbit_rank']})" + (
            "" if checks["orbit_rank_equals_orbit_dim"] else " [red]FAIL[/red]")
        ctrl = "; ".join(
            f"{c['name']}: {c['max_rel_error']:.1e} "
            + ("[green]broke[/green]" if c["broke_as_predicted"] else "[red]did not break[/red]")
            for c in m["controls"]) or "-"
        table.add_row(
            m["name"], str(m["params"]), groups, orbit_s, str(m["functional_dim"]), fd_s,
            fmt(sw["float32"]), fmt(sw["float64"]), bal_s, ctrl)
    console.print(table)
    console.print(_node_table(node))
    console.print(transformer_table(transformers))
    console.print(_inference_table(inference))
    elapsed = time.perf_counter() - start
    result = {"models": models, "node": node, "transformers": transformers, "inference": inference, "num_samples": num_samples, "seed": seed,
              "devices": [str(d) for d in jax.devices()], "seconds": elapsed}
    console.print(f"[dim]{len(models) + 1 + len(transformers)} models; {num_samples} group elements per "
                  "sweep for the MLP and ResNet rows; fewer for their negative controls (see the column), "
                  f"the neural ODE (see its table) and the transformer parts (at most {TRANSFORMER_MAX_SAMPLES}; "
                  "each sweep's count is in the JSON, as num_samples); "
                  f"{elapsed:.1f} s on {jax.devices()[0].platform}[/dim]")
    if json_path:
        path = pathlib.Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json_text(result))
        console.print(f"wrote {path}")
    if plot_dir:
        _plot(errors, pathlib.Path(plot_dir))
        console.print(f"wrote {pathlib.Path(plot_dir) / 'invariance_errors.png'}")
    return result


def _worker_init() -> None:
    """A report worker process: float64 on, as the command line sets it, and one BLAS
    thread (see `run_report`)."""
    jax.config.update("jax_enable_x64", True)
    _one_blas_thread().__enter__()  # held for the worker's lifetime


def _case_job(index: int, num_samples: int, seed: int) -> tuple[dict[str, Any], dict]:
    return run_case(default_cases()[index], num_samples=num_samples, seed=seed)


def _transformer_job(index: int, num_samples: int, seed: int) -> dict[str, Any]:
    return run_transformer_case(transformer_cases()[index], num_samples=num_samples, seed=seed)


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # threadpoolctl comes with scikit-learn; without it, BLAS's default
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _node_table(node: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"{node['name']}: spacetime diffeomorphisms ({node['description']})")
    for col in ("check", "samples", "max rel err", "median rel err", "expected", "result"):
        table.add_column(col, overflow="fold")
    for s in node["sweeps"]:
        table.add_row(s["name"], str(s["num_samples"]), f"{s['max_rel_error']:.1e}", f"{s['median_rel_error']:.1e}",
                      f"< {node['tolerance']:.0e}", "[green]ok[/green]" if s["passed"] else "[red]FAIL[/red]")
    for c in node["controls"]:
        table.add_row(c["name"], str(c["num_samples"]), f"{c['max_rel_error']:.1e}", f"{c['median_rel_error']:.1e}",
                      f"median >= {CONTROL_MIN_ERROR:.0e}",
                      "[green]broke[/green]" if c["broke_as_predicted"] else "[red]did not break[/red]")
    table.caption = f"parameter-space gauge (connection law on the grid): orbit dimension {node['orbit_dim']}"
    return table


def _inference_table(rows: list[dict[str, Any]]):
    from rich.table import Table

    table = Table(title="gauge inference from the traced program vs the declared gauge")
    for col in ("model", "inferred = declared", "sites", "difference"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["model"], "[green]yes[/green]" if r["agrees"] else "[red]no[/red]", str(r["sites"]),
                      "-" if r["agrees"] else r["difference"])
    table.caption = ("inference only (at most about a second per model); `gaugejax infer` and the tests certify each "
                     "inferred gauge with a sweep")
    return table


#: the histograms' bins, in machine epsilons
HIST_BINS = np.logspace(-3, 4, 50)


def _hist_values(e: np.ndarray, eps: float) -> tuple[np.ndarray, int]:
    """Errors in units of `eps`, clipped into the end bins (a broken symmetry's errors,
    above 1e4 eps, and NaNs, drawn in the top bin, are the ones that matter), and how many
    were not finite."""
    e = np.asarray(e, np.float64)
    shown = np.clip(np.where(np.isfinite(e), e, np.inf) / eps, HIST_BINS[0], HIST_BINS[-1])
    return shown, int(np.sum(~np.isfinite(e)))


def _plot(errors: dict, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    names = sorted({k[0] for k in errors})
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for dtype, color in (("float32", "tab:blue"), ("float64", "tab:orange")):
            e = errors.get((name, dtype))
            if e is None:
                continue
            shown, bad = _hist_values(e, float(np.finfo(dtype).eps))
            ax.hist(shown, bins=HIST_BINS, color=color, alpha=0.7,
                    label=dtype + (f" ({bad} not finite)" if bad else ""))
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("relative output error / machine eps")
        ax.legend()
    axes[0][0].set_ylabel("group elements")
    fig.tight_layout()
    fig.savefig(out / "invariance_errors.png", dpi=120)
    plt.close(fig)
