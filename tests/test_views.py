"""Couplings through reshaped views of leaves (per-head groups inside a whole axis)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj


def _params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "Wq": jax.random.normal(k1, (6, 4), jnp.float64),  # (H * d_k, in) with H = 2, d_k = 3
        "bq": jax.random.normal(k2, (6,), jnp.float64),
        "Wo": jax.random.normal(k3, (5, 6), jnp.float64),  # (out, H * d_k)
    }


def _gauge(params):
    return gj.Gauge(
        {"heads": gj.Permutation(2), "blk": gj.GL(3, batch=(2,))},
        [
            gj.Produce("['Wq']", 0, "heads", view=(2, 3, 4)),
            gj.Produce("['Wq']", 1, "blk", (0,), view=(2, 3, 4)),
            gj.Produce("['bq']", 0, "heads", view=(2, 3)),
            gj.Produce("['bq']", 1, "blk", (0,), view=(2, 3)),
            gj.Consume("['Wo']", 1, "heads", view=(5, 2, 3)),
            gj.Consume("['Wo']", 2, "blk", (1,), view=(5, 2, 3)),
        ],
        params,
    )


def test_view_action_is_the_blockwise_action(getkey):
    params = _params(getkey())
    gauge = _gauge(params)
    g = gauge.sample(getkey(), scale=None)
    out = gauge.act(g, params)
    perm, blocks = np.asarray(g["heads"]), np.asarray(g["blk"])
    Wq = np.asarray(params["Wq"]).reshape(2, 3, 4)
    bq = np.asarray(params["bq"]).reshape(2, 3)
    Wo = np.asarray(params["Wo"]).reshape(5, 2, 3)
    # blocks first (per head), then the heads permutation (the semidirect product)
    want_q = np.einsum("hij,hjk->hik", blocks, Wq)[perm]
    want_b = np.einsum("hij,hj->hi", blocks, bq)[perm]
    inv = np.linalg.inv(blocks)
    want_o = np.einsum("ohj,hji->ohi", Wo, inv)[:, perm]
    np.testing.assert_allclose(np.asarray(out["Wq"]), want_q.reshape(6, 4), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(out["bq"]), want_b.reshape(6), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(out["Wo"]), want_o.reshape(5, 6), rtol=1e-12, atol=1e-12)
    # the model x -> Wo (Wq x + bq) is invariant (a linear network through the split axis)
    x = jax.random.normal(getkey(), (7, 4), jnp.float64)

    def fn(p, x):
        return (x @ p["Wq"].T + p["bq"][None, :]) @ p["Wo"].T

    rep = gj.check_invariance(fn, gauge, params, x, key=getkey(), num_samples=32)
    assert rep.passed and rep.max_rel_error < 1e-12


def test_view_group_laws(getkey):
    params = _params(getkey())
    gauge = _gauge(params)
    g, h = gauge.sample(getkey(), scale=None), gauge.sample(getkey(), scale=None)
    lhs = gauge.act(g, gauge.act(h, params))
    rhs = gauge.act(gauge.compose(g, h), params)
    for k in params:
        np.testing.assert_allclose(np.asarray(lhs[k]), np.asarray(rhs[k]), rtol=1e-10, atol=1e-10)
    back = gauge.act(gauge.inverse(g), gauge.act(g, params))
    for k in params:
        np.testing.assert_allclose(np.asarray(back[k]), np.asarray(params[k]), rtol=1e-10, atol=1e-10)
    assert gauge.orbit_dim == 2 * 9


def test_view_bad_input(getkey):
    params = _params(getkey())
    with pytest.raises(ValueError, match=r"view \(4, 2, 4\) is not a refinement"):
        gj.Gauge({"s": gj.Permutation(2)}, [gj.Produce("['Wq']", 1, "s", view=(4, 2, 4))], params)
    with pytest.raises(ValueError, match="every linear coupling of a leaf uses one view"):
        gj.Gauge({"a": gj.Permutation(2), "b": gj.Permutation(4)},
                 [gj.Produce("['Wq']", 0, "a", view=(2, 3, 4)), gj.Consume("['Wq']", 1, "b")], params)
    with pytest.raises(ValueError, match="expected 3, received 2"):
        gj.Gauge({"s": gj.GL(3)}, [gj.Produce("['Wq']", 0, "s", view=(2, 3, 4))], params)


def test_repair_without_view_support_says_so(getkey):
    params = _params(getkey())
    gauge = _gauge(params)
    with pytest.raises(NotImplementedError, match=r"repair does not support couplings through a reshaped view.*Wq"):
        gj.repair(gauge, params, params, params, lambda p: {})


def _mha_orbit(getkey):
    from helpers import _eqx_attention

    mha, gauge, fn, x = _eqx_attention(getkey(), jnp.float64)
    far = gauge.act(gauge.sample(getkey(), scale=1.0, dtype=jnp.float64), mha)
    return mha, gauge, fn, x, far


def _diff(a, b):
    import equinox as eqx

    arrays = lambda m: jax.tree.leaves(eqx.filter(m, eqx.is_array))  # noqa: E731
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(arrays(a), arrays(b)))


def test_canonical_form_through_views(getkey):
    """`equinox.nn.MultiheadAttention` (per-head GL blocks and head permutations inside
    whole axes, a translated key bias): the canonical form is computed on the leaves
    reshaped to their views and comes back in the leaves' own shapes. The module's float
    and bool fields (its Dropout) stay Python values (the GL balancing loop once turned
    them into arrays, and the module then failed to run)."""
    mha, gauge, fn, x, far = _mha_orbit(getkey)
    canon, g = gj.canonicalize(gauge, far)
    canon0, _ = gj.canonicalize(gauge, mha)
    assert [type(v) for v in jax.tree.leaves(canon)][-2:] == [float, bool]
    assert _diff(canon, gauge.act(g, far)) <= 1e-12
    assert float(jnp.max(jnp.abs(fn(canon, x) - fn(mha, x)))) <= 1e-12
    assert _diff(canon, canon0) <= 1e-10  # one point per orbit
    assert _diff(canon, far) > 0.1  # negative control: the orbit was moved


@pytest.mark.slow
def test_alignment_through_views(getkey):
    mha, gauge, _, _, far = _mha_orbit(getkey)
    aligned, _ = gj.align(gauge, mha, far)
    assert _diff(aligned, mha) <= 1e-10
    assert float(gj.gauge_distance(gauge, mha, far, relative=True)) <= 1e-10


def test_balance_through_views_equals_balance_on_whole_axes(getkey):
    """Per-head positive scalings declared through views balance exactly as the same
    neurons declared on the whole axis."""
    params = _params(getkey())
    viewed = gj.Gauge({"s": gj.PositiveDiagonal(3, batch=(2,))}, [
        gj.Produce("['Wq']", 1, "s", (0,), view=(2, 3, 4)), gj.Produce("['bq']", 1, "s", (0,), view=(2, 3)),
        gj.Consume("['Wo']", 2, "s", (1,), view=(5, 2, 3))], params)
    whole = gj.Gauge({"s": gj.PositiveDiagonal(6)}, [
        gj.Produce("['Wq']", 0, "s"), gj.Produce("['bq']", 0, "s"), gj.Consume("['Wo']", 1, "s")], params)
    far = whole.act(whole.sample(getkey(), scale=1.0, dtype=jnp.float64), params)
    a, ga = gj.balance(viewed, far)
    b, gb = gj.balance(whole, far)
    assert float(gj.balance_residual(viewed, far)) > 0.1
    assert float(gj.balance_residual(viewed, a)) <= 1e-12
    assert bool(jnp.all(gj.degenerate_units(viewed, far)["s"] == jnp.zeros((2, 3), bool)))
    for k in params:
        assert a[k].shape == params[k].shape
        np.testing.assert_allclose(a[k], b[k], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ga["s"].reshape(6), gb["s"], rtol=1e-10)


def test_mha_gauge_switches_for_per_head_masks_and_rotary(getkey):
    """equinox's attention accepts a per-head mask and a `process_heads` (rotary here); the
    full gauge is no symmetry of either call (a head swap changes a per-head-masked layer
    by O(1), a per-head GL a rotary one), and the switches leave exactly the parts that
    are."""
    import equinox as eqx

    mha = eqx.nn.MultiheadAttention(2, 8, qk_size=4, vo_size=4, use_key_bias=True, key=getkey(),
                                    dtype=jnp.float64)
    rope = eqx.nn.RotaryPositionalEmbedding(4, dtype=jnp.float64)
    rot = jax.vmap(rope, in_axes=1, out_axes=1)
    x = jax.random.normal(getkey(), (5, 8), jnp.float64)
    mask = jnp.stack([jnp.tril(jnp.ones((5, 5), bool)), jnp.ones((5, 5), bool)])
    calls = {
        "mask": (lambda m, x: m(x, x, x, mask=mask), {"heads": False}),
        "rotary": (lambda m, x: m(x, x, x, process_heads=lambda q, k, v: (rot(q), rot(k), v)),
                   {"qk": False, "key_shift": False}),
    }
    for name, (fn, switches) in calls.items():
        full, kept = gj.multihead_attention_gauge(mha), gj.multihead_attention_gauge(mha, **switches)
        assert sorted(kept.site_groups) == sorted(set(full.site_groups) - set(switches)), name
        broken = gj.check_invariance(fn, full, mha, x, key=getkey(), num_samples=8, scale=1.0)
        assert not broken.passed and broken.max_rel_error > 1e-2, name
        assert gj.check_invariance(fn, kept, mha, x, key=getkey(), num_samples=8, scale=1.0).passed, name
    with pytest.raises(TypeError, match="`heads` must be a bool"):
        gj.multihead_attention_gauge(mha, heads=None)
