"""`gaugejax report` and `gaugejax continuum` run end to end and write the documented JSON."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow  # the CI install command runs `gaugejax report` itself
def test_report_json_and_plot(tmp_path):
    out = tmp_path / "report.json"
    res = subprocess.run(
        [sys.executable, "-m", "gaugejax", "report", "--samples", "64", "--json", str(out), "--plot", str(tmp_path / "plots")],
        capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    names = [m["name"] for m in data["models"]]
    assert {"mlp-relu", "mlp-tanh", "mlp-gelu", "resnet-relu"} <= set(names)
    for m in data["models"]:
        for k in ("name", "params", "orbit_dim", "functional_dim", "sweeps", "controls"):
            assert k in m
        assert {s["dtype"] for s in m["sweeps"]} == {"float32", "float64"}
        assert all(s["passed"] for s in m["sweeps"])
        assert all(c["broke_as_predicted"] for c in m["controls"])
        assert all(m["checks"].values()), m["checks"]
        for s in m["sweeps"]:
            assert set(s) >= {"dtype", "num_samples", "max_rel_error"}
    node = data["node"]
    assert node["name"] == "node-parametric" and node["orbit_dim"] > 0
    assert all(s["passed"] for s in node["sweeps"]) and len(node["sweeps"]) == 2
    assert all(c["broke_as_predicted"] for c in node["controls"])
    assert "spacetime diffeomorphisms" in res.stdout
    from gaugejax._report_transformer import transformer_rows_ok

    assert {t["name"] for t in data["transformers"]} >= {"transformer-rms-relu"}
    assert transformer_rows_ok(data["transformers"])
    relu = data["models"][names.index("mlp-relu")]
    assert relu["functional_equals_params_minus_orbit"]
    assert relu["balance"]["residual_after"] <= 1e-8
    assert (tmp_path / "plots" / "invariance_errors.png").exists()
    assert "gaugejax report" in res.stdout


def test_bad_samples_argument():
    res = subprocess.run([sys.executable, "-m", "gaugejax", "report", "--samples", "0"], capture_output=True, text=True)
    assert res.returncode != 0 and "--samples must be positive" in res.stderr


def test_continuum_tables(tmp_path):
    out = tmp_path / "continuum.json"
    res = subprocess.run(
        [sys.executable, "-m", "gaugejax", "continuum", "--max-depth", "64", "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    data = json.loads(out.read_text())
    assert set(data) == {"S12", "S13-diagonal", "S13-GL"}
    for table in data.values():
        assert table["L"] == [8, 16, 32, 64]
        assert len(table["error"]) == 4 and abs(table["slope"] - table["expected_slope"]) <= 0.15
    assert res.returncode == (0 if all(t["passed"] for t in data.values()) else 1)
    assert "fitted slope" in res.stdout


def test_continuum_bad_depth():
    res = subprocess.run([sys.executable, "-m", "gaugejax", "continuum", "--max-depth", "8"], capture_output=True, text=True)
    assert res.returncode != 0 and "--max-depth must be at least 16" in res.stderr


def test_fast_compile_flag_respects_the_users_xla_flags(monkeypatch):
    from gaugejax import _cli

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    _cli._fast_compile()
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {_cli.FAST_COMPILE_FLAG}"
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=2")
    _cli._fast_compile()
    assert os.environ["XLA_FLAGS"] == "--xla_backend_optimization_level=2"
    monkeypatch.delenv("XLA_FLAGS")
    _cli._fast_compile()
    assert os.environ["XLA_FLAGS"] == _cli.FAST_COMPILE_FLAG


def test_continuum_with_full_xla_optimisation(tmp_path):
    """`--xla-optimize` runs the job with XLA's default flags (the same tables)."""
    out = tmp_path / "continuum.json"
    res = subprocess.run(
        [sys.executable, "-m", "gaugejax", "continuum", "--max-depth", "16", "--xla-optimize", "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert res.returncode in (0, 1), res.stderr  # 1: a two-point slope outside the band
    assert json.loads(out.read_text())["S12"]["L"] == [8, 16]


def _result(**row):
    m = {"name": "m", "params": 10, "orbit_dim": 4, "orbit_rank": 4, "functional_dim": 6,
         "params_minus_orbit": 6, "sweeps": [{"passed": True}], "controls": [{"broke_as_predicted": True}],
         "balance": {"residual_after": 1e-15, "function_rel_change": 1e-16}}
    m.update(row)
    from gaugejax._report import checks_of

    m["checks"] = checks_of(m)
    return {"models": [m], "node": {"sweeps": [], "controls": []}, "inference": [{"agrees": True}],
            "transformers": [{"sweeps": [], "controls": [], "orbit_dim": 4, "orbit_dim_engine": 4}]}


def test_report_verdicts_cover_every_check():
    """The exit code follows every verdict the report prints: the orbit's numerical rank,
    the functional dimension above its bound (below it is allowed), S4, and the
    transformer orbit formula against the engine (each exited 0 before)."""
    from gaugejax._report import report_ok

    assert report_ok(_result())
    assert report_ok(_result(functional_dim=5))  # below params - orbit: some shapes fall short
    assert not report_ok(_result(orbit_rank=3))
    assert not report_ok(_result(functional_dim=7))
    assert not report_ok(_result(balance={"residual_after": 0.9, "function_rel_change": 1e-16}))
    assert not report_ok(_result(balance={"residual_after": 1e-15, "function_rel_change": 0.7}))
    bad = _result()
    bad["transformers"][0]["orbit_dim_engine"] = 3
    assert not report_ok(bad)


def test_json_is_strict_and_histograms_keep_every_error():
    """`Infinity` / `NaN` are not JSON (a full-rank Jacobian's gap is inf): written as null.
    The histograms clip errors into their end bins instead of dropping the broken ones."""
    import jax.numpy as jnp
    import numpy as np

    from gaugejax._report import HIST_BINS, _hist_values, json_text

    text = json_text({"gap": float("inf"), "e": [np.float64("nan"), 1.0], "n": np.int64(3), "j": jnp.asarray(jnp.inf)})
    assert json.loads(text) == {"gap": None, "e": [None, 1.0], "n": 3, "j": None}
    shown, bad = _hist_values(np.array([1e-20, 1e-10, 1.0, np.nan, np.inf]), 1e-10)
    assert bad == 2 and shown.size == 5
    assert np.all((shown >= HIST_BINS[0]) & (shown <= HIST_BINS[-1]))
    assert np.sum(shown == HIST_BINS[-1]) == 3  # the broken one and both non-finite


def test_bad_output_paths_fail_before_the_run(tmp_path):
    """An unusable --json or --plot path is a usage error (exit 2) at once, not a traceback
    (exit 1, like a failed check) after the whole run."""
    afile = tmp_path / "afile"
    afile.write_text("")
    for args in (["report", "--json", str(afile / "r.json")], ["report", "--plot", str(afile)],
                 ["report", "--json", str(tmp_path)], ["continuum", "--plot", str(afile)]):
        res = subprocess.run([sys.executable, "-m", "gaugejax", *args], capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, (args, res.stderr)
        assert "is a file" in res.stderr or "is a directory" in res.stderr
        assert f"usage: gaugejax {args[0]}" in res.stderr
