"""Smoke tests of the digits experiments (benchmarks/digits_*.py): each
script's core function on a tiny configuration, its output structure and one property."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import _digits as D  # noqa: E402
import digits_adam  # noqa: E402
import digits_lmc  # noqa: E402
import digits_teleport  # noqa: E402


@pytest.fixture(autouse=True)
def _standard_promotion():
    """optax mixes int32 step counts with float parameters (see test_optim.py)."""
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="module")
def data():
    with jax.numpy_dtype_promotion("standard"):
        return D.load(jnp.float32)


@pytest.mark.slow
def test_lmc_alignment_lowers_the_barrier(data):
    r = digits_lmc.run_pair(data, width=12, depth=1, seed=0, steps=120, num=5)
    json.dumps(r)  # JSON-serialisable
    for m in digits_lmc.METHODS:
        assert set(r[m]) == {"barrier_ce", "barrier_error", "mid_error"}
        assert len(r["curves"][m]["ce"]) == 5
    # aligning is a gauge move: b's function is unchanged, and it brings b closer to a
    assert r["align_relative_function_change"] < 1e-4
    assert r["param_distance"]["aligned"] < r["param_distance"]["naive"]
    # two independently trained 12-unit nets are not linearly connected; aligned they are closer
    assert r["naive"]["barrier_ce"] > 0.05
    assert r["aligned"]["barrier_ce"] < r["naive"]["barrier_ce"]
    summ = digits_lmc.summarize([r])
    assert set(summ["12"]) >= set(digits_lmc.METHODS)


@pytest.mark.slow
def test_teleport_keeps_loss_and_raises_gradient(data):
    r = digits_teleport.run_one(data, "adam", "transport", seed=0, steps=20, schedule={0, 10}, ascent_steps=5,
                                ascent_lr=0.2, hidden=(6, 6), record_every=10)
    json.dumps(r)
    assert [t["step"] for t in r["teleports"]] == [0, 10]
    assert r["steps"] == [0, 10, 20] and len(r["train_ce"]) == 3 and len(r["seconds"]) == 3
    for t in r["teleports"]:
        assert t["rel_loss_change"] < 1e-5  # an exact gauge move, float32 rounding only
        assert t["grad_sq_after"] > t["grad_sq_before"]  # the ascent did something
    summ = digits_teleport.summarize([r], [10, 20])
    assert summ["adam/transport"]["teleports"] == 2


def test_hessian_zero_modes_of_a_linear_net():
    data64 = D.load(jnp.float64)
    # the Newton phase needs up to 10 steps (run_hessian's default) from some initialisations:
    # with 5, one reached |grad| 2e-4 only; with 10 it reaches 1e-15
    out = digits_adam.run_hessian(data64, hidden=(2, 2), adam_steps=100, lbfgs_steps=300, newton_steps=10,
                                  cases=["linear/mse"], log=lambda *a: None)
    r = out["linear/mse"]
    json.dumps(out)
    assert r["grad_norm"] < 1e-9
    # GL(2) x GL(2) (orbit_dim 8) plus the hidden-bias translations of the identity activation
    # (2 + 2), which the feedforward gauge does not include
    assert r["orbit_dim"] == 8
    assert r["count_below_gap"] == r["orbit_dim"] + 4
    assert r["gap_ratio"] > 1e6
    assert r["vertical_in_null_space"] > 1 - 1e-8
