"""Invariance sweeps: the report, chunking, raising, per-site results and sharding."""

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj


def _setup(dtype=jnp.float64, activation=jax.nn.relu, group=None, unsafe=False):
    model = gj.nn.MLP((4, 6, 5, 2), activation, key=jax.random.key(1), dtype=dtype)
    gauge = gj.derive_gauge(model, group=group, unsafe=unsafe)
    x = jax.random.normal(jax.random.key(2), (8, 4), dtype)
    return model, gauge, x


def fn(m, x):
    return m(x)


def test_report_fields():
    model, gauge, x = _setup()
    rep = gj.check_invariance(fn, gauge, model, x, key=jax.random.key(0), num_samples=100)
    assert rep.num_samples == 100 and rep.errors.shape == (100,)
    assert rep.dtype == "float64" and rep.eps == float(jnp.finfo(jnp.float64).eps)
    assert rep.max_rel_error == float(np.max(rep.errors))
    assert rep.max_eps == pytest.approx(rep.max_rel_error / rep.eps)
    assert rep.passed and "ok" in str(rep)


def test_pytree_outputs_each_relative_to_their_own_scale():
    # a broken gauge (GL on ReLU) must fail even next to a large output leaf
    model, gauge, x = _setup(group=gj.GL, unsafe=True)
    big = lambda m, x: {"logits": m(x), "loss": jnp.asarray(1e6, x.dtype)}
    rep = gj.check_invariance(big, gauge, model, x, key=jax.random.key(0), num_samples=8)
    alone = gj.check_invariance(fn, gauge, model, x, key=jax.random.key(0), num_samples=8)
    assert not rep.passed
    np.testing.assert_array_equal(rep.errors, alone.errors)


def test_chunking_does_not_change_results():
    model, gauge, x = _setup()
    a = gj.check_invariance(fn, gauge, model, x, key=jax.random.key(0), num_samples=50, chunk_size=7)
    b = gj.check_invariance(fn, gauge, model, x, key=jax.random.key(0), num_samples=50, chunk_size=50)
    c = gj.check_invariance(fn, gauge, model, x, key=jax.random.key(0), num_samples=50, blocks=3)
    np.testing.assert_allclose(a.errors, b.errors, rtol=0, atol=1e-15)
    np.testing.assert_allclose(a.errors, c.errors, rtol=0, atol=1e-15)


def test_many_samples_memory_bounded():
    model, gauge, x = _setup(jnp.float32)
    rep = gj.check_invariance(fn, gauge, model, x, key=jax.random.key(0), num_samples=100_000, chunk_size=512)
    assert rep.num_samples == 100_000 and rep.passed


def test_chunk_size_adapts_to_model_size():
    small = gj.nn.MLP((32, 64, 64, 10), key=jax.random.key(0), dtype=jnp.float32)
    big = gj.nn.MLP((1024, 1024, 1024, 1024), key=jax.random.key(0), dtype=jnp.float32)
    cpu = jax.devices("cpu")[0]
    assert gj.choose_chunk_size(small, 256, device=cpu) == 256
    assert gj.choose_chunk_size(big, 256, device=cpu) == 1
    # on an accelerator the budget is 1 GiB, or 1/16 of the device's memory if less
    big_bytes = sum(x.nbytes for x in jax.tree.leaves(big))
    gpu = SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": 2**36})
    assert gj.choose_chunk_size(big, 256, device=gpu) == 2**30 // big_bytes
    small_gpu = SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": 2**30})
    assert gj.choose_chunk_size(big, 256, device=small_gpu) == 2**26 // big_bytes
    silent = SimpleNamespace(platform="tpu", memory_stats=lambda: None)
    assert gj.choose_chunk_size(big, 256, device=silent) == 2**30 // big_bytes
    assert gj.choose_chunk_size(big, 256, budget=3 * big_bytes, device=gpu) == 3


def test_sweep_traced_at_highest_matmul_precision():
    """Accelerators round float32 matmuls (TF32, bfloat16 passes) unless told otherwise: the
    sweep is traced under `jax.default_matmul_precision("highest")` unless `precision=None`."""
    model, gauge, x = _setup()
    seen = []

    def fn(m, x):
        seen.append(jax.config.jax_default_matmul_precision)
        return m(x)

    gj.check_invariance(fn, gauge, model, x, key=jax.random.key(0), num_samples=4)
    assert seen and set(seen) == {"highest"}
    seen.clear()
    with jax.default_matmul_precision("bfloat16"):
        gj.check_invariance(fn, gauge, model, x, key=jax.random.key(0), num_samples=4, precision=None)
    assert seen and set(seen) == {"bfloat16"}


def test_raise_and_per_site():
    model, gauge, x = _setup(activation=jax.nn.gelu, group=gj.PositiveDiagonal, unsafe=True)
    with pytest.raises(gj.InvarianceError, match="not invariant"):
        gj.check_invariance(fn, gauge, model, x, key=jax.random.key(0), num_samples=16, raise_on_failure=True)
    rep = gj.check_invariance(fn, gauge, model, x, key=jax.random.key(0), num_samples=16, per_site=True)
    assert set(rep.per_site) == {"h1", "h2"}
    assert all(not r.passed for r in rep.per_site.values())
    # scale=0 would sample the identity alone, and pass: refused
    with pytest.raises(ValueError, match="`scale` must be None or a finite number > 0"):
        gj.check_invariance(fn, gauge, model, x, key=jax.random.key(0), num_samples=4, scale=0.0)


def test_float32_tolerance_default():
    model, gauge, x = _setup(jnp.float32)
    rep = gj.check_invariance(fn, gauge, model, x, key=jax.random.key(0), num_samples=64)
    assert rep.rtol == 1e-5 and rep.passed


SHARDED = textwrap.dedent(
    """
    import os, json, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)
    import gaugejax as gj
    assert len(jax.devices()) == 4
    model = gj.nn.MLP((4, 6, 5, 2), jax.nn.gelu, key=jax.random.key(1), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(2), (8, 4), jnp.float64)
    out = {}
    for name, gauge in [("exact", gj.derive_gauge(model)),
                        ("control", gj.derive_gauge(model, group=gj.PositiveDiagonal, unsafe=True))]:
        multi = gj.check_invariance(lambda m, x: m(x), gauge, model, x, key=jax.random.key(0), num_samples=37)
        single = gj.check_invariance(lambda m, x: m(x), gauge, model, x, key=jax.random.key(0), num_samples=37,
                                     devices=jax.devices()[:1])
        out[name] = {"devices": multi.devices, "multi": multi.errors.tolist(), "single": single.errors.tolist()}
    # one device other than the default: the sweep runs there (it ran on the default one)
    import gaugejax._sweep as S
    block, seen = S._sweep_block, []
    S._sweep_block = lambda *a, **k: seen.append(block(*a, **k)[0].devices()) or block(*a, **k)
    gj.check_invariance(lambda m, x: m(x), gauge, model, x, key=jax.random.key(0), num_samples=4,
                        devices=jax.devices()[3])
    out["one_device"] = sorted(d.id for d in seen[0])
    print(json.dumps(out))
    """
)


def test_sharded_sweep_equals_single_device():
    # four forced host devices: on a machine with an accelerator, the CPU backend by name
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for name in ("exact", "control"):
        assert out[name]["devices"] == 4
        # same keys, so the same group elements: per-sample errors agree (the control's
        # are O(1), so this compares real numbers, not rounding noise)
        np.testing.assert_allclose(out[name]["multi"], out[name]["single"], rtol=1e-10, atol=1e-15)
    assert min(out["control"]["multi"]) > 1e-3
    assert out["one_device"] == [3]


def test_sweeps_that_would_sample_only_the_identity_are_refused():
    """`sites=[]`, `scale=0` and a gauge without sites each sampled the identity alone and
    reported "ok" on a model that is not invariant (here ReLU under GL, forced)."""
    m = gj.nn.MLP([3, 5, 2], jax.nn.relu, key=jax.random.key(0), dtype=jnp.float64)
    broken = gj.derive_gauge(m, group=gj.GL, unsafe=True)
    x = jax.random.normal(jax.random.key(1), (8, 3), jnp.float64)
    f = lambda p, x: p(x)  # noqa: E731
    assert not gj.check_invariance(f, broken, m, x, key=jax.random.key(2), num_samples=8).passed
    for kwargs, match in (({"sites": []}, "`sites` is empty"), ({"scale": 0.0}, "`scale` must be None or a finite"),
                          ({"scale": float("nan")}, "`scale` must be"), ({"devices": []}, "`devices` is empty")):
        with pytest.raises(ValueError, match=match):
            gj.check_invariance(f, broken, m, x, key=jax.random.key(2), num_samples=8, **kwargs)
    with pytest.raises(ValueError, match="the gauge has no sites"):
        gj.check_invariance(f, gj.Gauge({}, [], m), m, x, key=jax.random.key(2), num_samples=8)
    with pytest.raises(ValueError, match="`devices` must be distinct"):
        gj.check_invariance(f, broken, m, x, key=jax.random.key(2), num_samples=8, devices=jax.devices() * 2)
    # an fn that closes over the model instead of reading its parameters passes anything:
    # a continuous gauge with every error exactly 0 warns
    with pytest.warns(UserWarning, match="does `fn` read its first argument"):
        assert gj.check_invariance(lambda p, x: m(x), broken, m, x, key=jax.random.key(2), num_samples=8).passed
    with pytest.raises(TypeError, match=r"output\[1\] is a Python float, not an array"):
        gj.check_invariance(lambda p, x: (p(x), 1.0), broken, m, x, key=jax.random.key(2), num_samples=8)
    # complex outputs are judged at their real part's precision (complex128 as float64)
    cp = {"W": jnp.ones((3, 2), jnp.complex128)}
    c = gj.check_invariance(lambda p: jnp.sum(p["W"], 0), gj.Gauge({"h": gj.Permutation(3)}, [gj.Produce("W", 0, "h")], cp),
                            cp, key=jax.random.key(2), num_samples=8)
    assert c.passed and c.rtol == 1e-10
    ints = {"W": jnp.ones((2, 2), jnp.int32)}
    with pytest.raises(ValueError, match="no floating-point leaves"):
        gj.check_invariance(lambda p: p["W"], gj.Gauge({"h": gj.Permutation(2)}, [gj.Produce("W", 0, "h")], ints),
                            ints, key=jax.random.key(2), num_samples=8)


def test_bfloat16_default_tolerance_passes_a_dense_symmetry():
    """A bfloat16 linear MLP under its GL gauge errs by about 4 machine epsilons (3e-2):
    the default tolerance was 2.6 epsilons and failed it; a broken symmetry still fails."""
    m = gj.nn.MLP([8, 16, 12, 4], gj.identity, key=jax.random.key(0), dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (64, 8)).astype(jnp.bfloat16)
    f = lambda p, x: p(x)  # noqa: E731
    assert gj.check_invariance(f, gj.derive_gauge(m), m, x, key=jax.random.key(2), num_samples=128).passed
    r = gj.nn.MLP([8, 16, 12, 4], jax.nn.gelu, key=jax.random.key(0), dtype=jnp.bfloat16)
    control = gj.derive_gauge(r, group=gj.PositiveMonomial, unsafe=True)
    assert not gj.check_invariance(f, control, r, x, key=jax.random.key(2), num_samples=32, scale=1.0).passed
