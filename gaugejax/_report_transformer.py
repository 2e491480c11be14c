"""Transformer rows of `gaugejax report` (MATH.md S14-S17) and `--model minilm`.

Each row: the derived gauge's sites, the orbit dimension by formula
([`gaugejax.transformer_orbit_dim`][]) against the engine's `orbit_dim` and the numerical
rank of the vertical space (small models only), an invariance sweep *per gauge part*
(`heads`, `qk`, `ov`, `key_shift`, `mlp`, `stream`, and all of them at once) in float32
and float64, weight-processing errors, and negative controls that must fail.

All parts of one dtype are swept in one compiled program (a sequential `lax.map` over
(part, element) pairs; the part is a traced mask that holds the other sites at the
identity), so a row costs one compilation per dtype instead of one per part: the
report's time is compile-bound.

Used by `gaugejax/_report.py` (`transformer_cases`, `run_transformer_case`,
`run_minilm_case`, `transformer_table`, `transformer_rows_ok`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._feedforward import derive_gauge
from ._groups import SignFlip
from ._observables import attention_orbit_dim, transformer_orbit_dim
from ._processing import process_weights
from ._sweep import CONTROL_MIN_ERROR, DEFAULT_RTOL, _rel_error, check_invariance
from .nn._transformer import Transformer


#: per-part sweeps sample at most this many elements per dtype (tiny models: sequential)
MAX_SAMPLES = 256

#: site-name prefixes of the gauge parts, in display order
PARTS = ("heads", "qheads", "qk", "ov", "key_shift", "mlp", "stream")


class _Laps:
    """`lap(name)` records the seconds since the previous lap (or since creation)."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self._tick = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._tick, 3)
        self._tick = now


@dataclasses.dataclass(frozen=True)
class TransformerCase:
    """A small random [`gaugejax.nn.Transformer`][] of the report.

    `config` goes to `Transformer(vocab, d, layers, heads, d_mlp, ctx, **config)`;
    `controls` are `(name, transformer_gauge kwargs)` forcing a family the model does not
    admit (with `unsafe=True`); `process` runs [`gaugejax.process_weights`][] and then
    sweeps the residual rotation the processed model gains.
    """

    name: str
    description: str
    sizes: tuple[int, int, int, int, int, int]
    config: tuple[tuple[str, Any], ...]
    controls: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    process: bool = False

    def build(self, key: Any, dtype: Any) -> Transformer:
        return Transformer(*self.sizes, **dict(self.config), key=key, dtype=dtype)


def transformer_cases() -> list[TransformerCase]:
    """The report's small transformers (1 layer, d = 8, 2 heads: compile-bound rows)."""
    sizes = (11, 8, 1, 2, 6, 6)
    return [
        TransformerCase(
            "transformer-rms-relu",
            "pre-norm scale-free RMSNorm, ReLU MLP, untied, causal: heads x GL(d_k) x GL(d_v) x key "
            "shift x positive monomials x residual O(d)",
            sizes, (("norm", "rms"), ("norm_gain", False), ("activation", "relu"), ("unembedding", "untied")),
            controls=(("relu MLP: sign flips", (("mlp_group", SignFlip), ("unsafe", True))),),
        ),
        TransformerCase(
            "transformer-ln-gelu",
            "pre-LayerNorm with gains, GELU MLP, tied, causal: no rotation until processed "
            "(fold gains, center, LayerNorm -> RMSNorm), then O(d) exact",
            sizes, (),
            controls=(("rotation through LayerNorm", (("rotation", True), ("unsafe", True))),),
            process=True,
        ),
    ]


def _parts(gauge) -> dict[str, tuple[str, ...]]:
    names = [n for n, _ in gauge.sites]
    out = {}
    for p in PARTS:
        sites = tuple(n for n in names if n == p or (n.startswith(p) and n[len(p):].isdigit()))
        if sites:
            out[p] = sites
    out["all"] = tuple(names)
    return out


@eqx.filter_jit
def _part_sweep(fn, gauge, params, args, key, num_samples, parts, dtype, scale):
    """Errors `(len(parts), num_samples)`: `num_samples` elements restricted to each part.

    The part is a traced mask (`where(mask[site], g[site], identity[site])`), so the
    program holds one forward pass and one `act`, however many parts there are."""
    y0 = fn(params, *args)
    ident = gauge.identity(dtype)
    names = [n for n, _ in gauge.sites]
    masks = jnp.asarray([[n in sites for n in names] for sites in parts])  # (P, sites)

    def one(pk):
        mask, k = pk
        g = gauge.sample(k, scale=scale, dtype=dtype)
        gp = {n: jax.tree.map(lambda a, b, f=mask[i]: jnp.where(f, a, b), g[n], ident[n]) for i, n in enumerate(names)}
        return _rel_error(fn(gauge.act(gp, params, check=False), *args), y0)

    P = masks.shape[0]
    m = jnp.repeat(masks, num_samples, axis=0)
    return jax.lax.map(one, (m, jax.random.split(key, P * num_samples))).reshape(P, num_samples)


def sweep_parts(fn: Callable, gauge, params: Any, *args: Any, key: Any, num_samples: int,
                scale: float | None = 0.5) -> list[dict[str, Any]]:
    """Invariance sweep of each gauge part (and of all parts at once), one compiled
    program. Returns one row per part: `part`, `sites`, `dtype`, `num_samples`,
    `max_rel_error`, `median_rel_error`, `max_eps`, `rtol`, `passed`."""
    dtype = jax.tree.leaves(eqx.filter(params, eqx.is_inexact_array))[0].dtype
    parts = _parts(gauge)
    errs = np.asarray(_part_sweep(fn, gauge, params, args, key, num_samples, tuple(parts.values()), dtype, scale))
    name = jnp.dtype(dtype).name
    eps, rtol = float(jnp.finfo(dtype).eps), DEFAULT_RTOL[name]
    rows = []
    for j, (part, sites) in enumerate(parts.items()):
        e = errs[j]
        mx = float(np.max(e))
        rows.append({"part": part, "sites": list(sites), "dtype": name, "num_samples": int(num_samples),
                     "max_rel_error": mx, "median_rel_error": float(np.median(e)), "max_eps": mx / eps,
                     "rtol": rtol, "passed": bool(np.isfinite(mx) and mx <= rtol)})
    return rows


def _forward(model, tokens):
    return jax.vmap(model)(tokens)


@eqx.filter_jit
def cast_floats(tree, dtype):
    """`tree` with its floating-point arrays cast to `dtype`, in one compiled program
    (eagerly, each cast of a new shape compiles on its own)."""
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


def run_transformer_case(case: TransformerCase, *, num_samples: int = 64, seed: int = 0,
                         orbit_rank: bool = False) -> dict[str, Any]:
    """One report row for a small transformer (see the module docstring).

    `orbit_rank=True` adds the numerical rank of the vertical space (a Jacobian: one more
    compilation, ~10-40 s on 2 shared cores; tests/test_transformer.py checks it).

    **Returns:** a dict with `name`, `description`, `params`, `sites`, `orbit_dim`
    (formula), `orbit_dim_engine`, `orbit_rank`, `sweeps` (one entry per part and dtype),
    `processing` (or `None`), `controls` and `seconds`.
    """
    k_model, k_tok, k_sweep = jax.random.split(jax.random.key(seed), 3)
    lap = _Laps()

    n = min(num_samples, MAX_SAMPLES)
    model64 = case.build(k_model, jnp.float64)
    tokens = jax.random.randint(k_tok, (3, 5), 0, case.sizes[0])
    gauge = derive_gauge(model64)
    out: dict[str, Any] = {
        "name": case.name, "description": case.description,
        "params": int(sum(x.size for x in jax.tree.leaves(model64) if eqx.is_inexact_array(x))),
        "sites": [{"name": s, "group": repr(g)} for s, g in gauge.sites],
        "orbit_dim": transformer_orbit_dim(model64), "orbit_dim_engine": gauge.orbit_dim,
    }
    out["orbit_rank"] = gauge.orbit_rank(model64) if orbit_rank else None
    lap("orbit")
    sweeps = []
    for dtype in (jnp.float32, jnp.float64):
        m = cast_floats(model64, dtype)
        sweeps += sweep_parts(_forward, derive_gauge(m), m, tokens, key=k_sweep, num_samples=n)
    out["sweeps"] = sweeps
    lap("sweeps")
    out["processing"] = None
    if case.process:
        # the whole pipeline's error (per-step errors: tests/test_transformer.py; each step
        # changes the model's structure, so measuring every step costs a compilation each)
        new = process_weights(model64)  # eager: it checks values (e.g. centred writing weights)
        fwd = eqx.filter_jit(_forward)
        err = float(_rel_error(fwd(new, tokens), fwd(model64, tokens)))
        eps = float(jnp.finfo(jnp.float64).eps)
        rot = derive_gauge(new, rotation=True)
        r = check_invariance(_forward, rot, new, tokens, key=k_sweep, num_samples=max(1, n // 8),
                             scale=None, sites=["stream"], chunk_size=1)
        out["processing"] = {
            "dtype": "float64", "steps": [["process_weights", err]], "eps": eps,
            "max_rel_error": err, "passed": err <= 100 * eps,
            "rotation_after": {"max_rel_error": r.max_rel_error, "passed": r.passed, "num_samples": r.num_samples},
        }
        lap("processing")
    controls = []
    for name, kwargs in case.controls:
        bad = derive_gauge(model64, **dict(kwargs))
        part = "stream" if dict(kwargs).get("rotation") else "mlp"
        sites = [s for s, _ in bad.sites if s.startswith(part)]
        r = check_invariance(_forward, bad, model64, tokens, key=k_sweep, num_samples=max(1, n // 8),
                             sites=sites, chunk_size=1, scale=None if part == "stream" else 0.5)
        controls.append({"name": name, "max_rel_error": r.max_rel_error, "median_rel_error": r.median_rel_error,
                         "broke_as_predicted": r.median_rel_error >= CONTROL_MIN_ERROR})
    out["controls"] = controls
    lap("controls")
    out["seconds"] = lap.timings
    return out


def _golden_path() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "minilm_golden.json"


def run_minilm_case(*, num_samples: int = 8, seed: int = 0) -> dict[str, Any]:
    """The `--model minilm` row: all-MiniLM-L6-v2 ([`gaugejax.load_minilm`][], needs the
    `minilm` extra): embeddings vs the committed sentence-transformers golden file (when
    the source tree has it), float32 sweeps of every admitted gauge part, the orbit
    dimension by formula (the vertical space is too large for a numerical rank here),
    the per-head processing steps' error, and the residual rotation through LayerNorm
    (forced with `unsafe=True`) as the negative control.

    Raises `ImportError` (with the install hint) without the optional packages.
    """
    from ._minilm import MiniLM, load_minilm, tokenize

    lap = _Laps()

    model, tokenizer = load_minilm()
    tr = model.transformer
    golden = _golden_path()
    if golden.exists():
        gold = json.loads(golden.read_text())
        sentences, ref = gold["sentences"], np.asarray(gold["embeddings"])
    else:
        sentences, ref = ["A sentence encoder maps text to a unit vector.", "Gauge symmetries leave it unchanged."], None
    ids, mask = (jnp.asarray(a) for a in tokenize(tokenizer, sentences))
    lap("load")

    def fn(t, i, m):
        return MiniLM(t, model.normalize)(i, m)

    out: dict[str, Any] = {
        "name": "minilm", "description": "all-MiniLM-L6-v2 (BERT: 6 layers, d=384, 12 heads, post-LayerNorm, GELU)",
        "params": int(sum(x.size for x in jax.tree.leaves(tr) if eqx.is_inexact_array(x))),
    }
    emb = np.asarray(eqx.filter_jit(fn)(tr, ids, mask))
    out["golden"] = None if ref is None else {"max_abs_error": float(np.max(np.abs(emb - ref))), "tol": 1e-5,
                                               "passed": bool(np.max(np.abs(emb - ref)) <= 1e-5)}
    gauge = derive_gauge(tr)
    out["sites"] = [{"name": s, "group": repr(g)} for s, g in gauge.sites[:6]] + (
        [{"name": "...", "group": f"{len(gauge.sites)} sites in all"}] if len(gauge.sites) > 6 else [])
    out["orbit_dim"] = transformer_orbit_dim(tr)
    out["orbit_dim_engine"] = gauge.orbit_dim
    out["orbit_dim_attention"] = attention_orbit_dim(tr.n_layers, tr.n_heads, tr.d_k, tr.d_v)
    out["orbit_rank"] = None
    key = jax.random.key(seed)
    out["sweeps"] = sweep_parts(fn, gauge, tr, ids, mask, key=key, num_samples=num_samples)
    lap("sweeps")
    new, rep = process_weights(tr, ids, mask)
    out["processing"] = {"dtype": rep.dtype, "steps": [[s, e] for s, e in rep.steps], "eps": rep.eps,
                         "max_rel_error": rep.max_rel_error, "passed": rep.max_rel_error <= 100 * rep.eps,
                         "rotation_after": None}
    lap("processing")
    bad = derive_gauge(tr, rotation=True, unsafe=True)
    r = check_invariance(fn, bad, tr, ids, mask, key=key, num_samples=2, sites=["stream"], scale=None, chunk_size=1)
    out["controls"] = [{"name": "rotation through LayerNorm", "max_rel_error": r.max_rel_error,
                        "median_rel_error": r.median_rel_error,
                        "broke_as_predicted": r.median_rel_error >= CONTROL_MIN_ERROR}]
    lap("controls")
    out["seconds"] = lap.timings
    return out


def transformer_rows_ok(rows: list[dict[str, Any]]) -> bool:
    """Every sweep passed, every processing step stayed within 100 eps (and the rotation
    it enables held), the golden check passed, every control broke, and the orbit
    dimension by formula equals the engine's (and its numerical rank, where measured)."""
    for r in rows:
        if not all(s["passed"] for s in r["sweeps"]):
            return False
        if r["orbit_dim"] != r["orbit_dim_engine"] or r.get("orbit_rank") not in (None, r["orbit_dim"]):
            return False
        if not all(c["broke_as_predicted"] for c in r["controls"]):
            return False
        p = r.get("processing")
        if p and (not p["passed"] or (p["rotation_after"] is not None and not p["rotation_after"]["passed"])):
            return False
        if r.get("golden") and not r["golden"]["passed"]:
            return False
    return True


def transformer_table(rows: list[dict[str, Any]]):
    """A `rich.table.Table` of the transformer rows (one line per model)."""
    from rich.table import Table

    table = Table(title="gaugejax report: transformers (MATH.md S14-S17)")
    for col in ("model", "params", "orbit (formula / engine / rank)", "float32 max err per part",
                "float64 max err per part", "processing", "negative controls"):
        table.add_column(col, overflow="fold")
    ok = lambda b: "[green]ok[/green]" if b else "[red]FAIL[/red]"  # noqa: E731
    for r in rows:
        per = {}
        for s in r["sweeps"]:
            per.setdefault(s["dtype"], []).append(f"{s['part']} {s['max_rel_error']:.1e} {ok(s['passed'])}")
        rank = "-" if r["orbit_rank"] is None else str(r["orbit_rank"])
        orbit = f"{r['orbit_dim']} / {r['orbit_dim_engine']} / {rank}"
        p = r.get("processing")
        proc = "-"
        if p:
            proc = f"max {p['max_rel_error']:.1e} ({p['max_rel_error'] / p['eps']:.0f} eps, {p['dtype']}) {ok(p['passed'])}"
            if p["rotation_after"] is not None:
                proc += f"; O(d) after: {p['rotation_after']['max_rel_error']:.1e} {ok(p['rotation_after']['passed'])}"
        if r.get("golden"):
            proc = f"golden {r['golden']['max_abs_error']:.1e} {ok(r['golden']['passed'])}; " + proc
        ctrl = "; ".join(
            f"{c['name']}: {c['max_rel_error']:.1e} "
            + ("[green]broke[/green]" if c["broke_as_predicted"] else "[red]did not break[/red]")
            for c in r["controls"]) or "-"
        table.add_row(r["name"], str(r["params"]), orbit, "\n".join(per.get("float32", ["-"])),
                      "\n".join(per.get("float64", ["-"])), proc, ctrl)
    return table
