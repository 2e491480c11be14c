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
