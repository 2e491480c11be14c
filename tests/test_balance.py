"""The balanced point by structured Newton (gaugejax/_rescaling.py) against the autodiff
Newton it replaces, and at widths where the autodiff Hessian does not fit in memory."""

import chex
import jax
import jax.numpy as jnp
import pytest
from helpers import fd_check, linear_readout

import gaugejax as gj
from gaugejax import _balance, _rescaling


F64 = jnp.float64


def _mlp(sizes, key):
    return gj.nn.MLP(sizes, jax.nn.relu, key=key, dtype=F64)


@pytest.mark.slow
def test_structured_newton_equals_autodiff_newton(getkey):
    model = _mlp([6, 16, 12, 3], getkey())
    gauge = gj.derive_gauge(model, group=gj.PositiveDiagonal)
    far = gauge.act(gauge.sample(getkey(), scale=1.5, dtype=F64), model)
    sites = _rescaling.rescaling_sites(gauge)
    assert _rescaling.is_structured(gauge, sites)
    xi_s = _balance._newton_structured(gauge, far, sites, 1e-12, 1e-12, 256)
    xi_a, _ = _balance._newton_generic(gauge, far, sites, 1e-12, 1e-12, 256)
    for n in sites:
        assert float(jnp.max(jnp.abs(xi_s[n] - xi_a[n]))) <= 1e-9


def test_wide_and_far_from_balanced(getkey):
    """2 x 384 hidden units with log-scales of size 3: the old Hessian took 768 JVPs of the
    action per Newton step; the structured one is a CG solve on the squared parameters."""
    model = _mlp([32, 384, 384, 10], getkey())
    gauge = gj.derive_gauge(model)  # positive monomial sites: balance uses their scales
    far = gauge.act(gauge.sample(getkey(), scale=3.0, dtype=F64), model)
    assert float(gj.balance_residual(gauge, far)) > 0.5
    balanced, g = gj.balance(gauge, far)
    assert float(gj.balance_residual(gauge, balanced)) <= 1e-10
    x = jax.random.normal(getkey(), (16, 32), F64)
    assert float(jnp.max(jnp.abs(balanced(x) - far(x)))) <= 1e-10 * float(jnp.max(jnp.abs(far(x))))
    sq = lambda m: float(sum(jnp.sum(a**2) for a in jax.tree.leaves(m)))  # noqa: E731
    assert sq(balanced) < sq(far)
    # the returned element takes the input there
    moved = gauge.act(g, far)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(balanced))) == 0.0


@pytest.mark.slow
def test_vmapped_balance(getkey):
    model = _mlp([5, 8, 7, 2], getkey())
    gauge = gj.derive_gauge(model, group=gj.PositiveDiagonal)
    gs = jax.vmap(lambda k: gauge.sample(k, scale=1.0, dtype=F64))(jax.random.split(getkey(), 4))
    batch = jax.vmap(lambda g: gauge.act(g, model))(gs)
    balanced, _ = jax.vmap(lambda p: gj.balance(gauge, p))(batch)
    res = jax.vmap(lambda p: gj.balance_residual(gauge, p))(balanced)
    assert float(jnp.max(res)) <= 1e-10
    # one orbit, one balanced point
    first = jax.tree.map(lambda a: a[0], balanced)
    for i in range(1, 4):
        other = jax.tree.map(lambda a: a[i], balanced)  # noqa: B023
        assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other))) <= 1e-8


def test_float32_inexact_newton_stays_finite(getkey):
    """In float32 the CG solve of an ill-conditioned Gram matrix can return a non-descent
    (or huge) step near the minimum, where F no longer resolves the decrease; such steps
    must be rejected (a trained digits MLP once balanced to NaN)."""
    model = gj.nn.MLP([60, 16, 16, 10], jax.nn.relu, key=getkey(), dtype=jnp.float32)
    gauge = gj.derive_gauge(model)
    for _ in range(3):
        far = gauge.act(gauge.sample(getkey(), scale=2.0, dtype=jnp.float32), model)
        balanced, _ = gj.balance(gauge, far)
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(balanced))
        assert float(gj.balance_residual(gauge, balanced)) <= 1e-5


def _with_degenerate_units(model):
    """h1[2]: incoming weights and bias zero; h2[1]: outgoing weights zero; h1[4]: both."""
    import equinox as eqx

    l0, l1, l2 = model.layers
    w0 = l0.weight.at[2].set(0.0).at[4].set(0.0)
    b0 = l0.bias.at[2].set(0.0).at[4].set(0.0)
    w1 = l1.weight.at[:, 4].set(0.0)
    w2 = l2.weight.at[:, 1].set(0.0)
    return eqx.tree_at(lambda m: (m.layers[0].weight, m.layers[0].bias, m.layers[1].weight, m.layers[2].weight),
                       model, (w0, b0, w1, w2))


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-12), (jnp.float32, 1e-5)])
def test_degenerate_units_keep_their_scale(getkey, dtype, tol):
    """A neuron with an all-zero side has no balanced point (the norm falls forever as the
    other side shrinks). It keeps its scale; the other neurons balance as usual, with
    Newton's quadratic convergence (a zero rhs entry used to stop lineax's CG at once, so
    every step fell back to the gradient), and the residual leaves it out (it read 1.0)."""
    model = _with_degenerate_units(gj.nn.MLP([5, 7, 6, 3], jax.nn.relu, key=getkey(), dtype=dtype))
    gauge = gj.derive_gauge(model)
    dead = gj.degenerate_units(gauge, model)
    assert [int(i) for i in jnp.flatnonzero(dead["h1"])] == [2, 4]
    assert [int(i) for i in jnp.flatnonzero(dead["h2"])] == [1]
    far = gauge.act(gauge.sample(getkey(), scale=1.5, dtype=dtype), model)
    x = jax.random.normal(getkey(), (16, 5), dtype)

    @jax.jit  # one program (eagerly, every operation would compile on its own)
    def run(far):
        balanced, g = gj.balance(gauge, far)
        d = gj.degenerate_units(gauge, far)  # the sampled permutation moved them
        change = lambda m: jnp.max(jnp.abs(m(x) - far(x))) / jnp.max(jnp.abs(far(x)))  # noqa: E731
        out = {
            "before": gj.balance_residual(gauge, far), "after": gj.balance_residual(gauge, balanced),
            "kept": jnp.stack([jnp.all(jnp.where(d[s], g[s].scale == 1, True)) for s in ("h1", "h2")]),
            "finite": jnp.stack([jnp.all(jnp.isfinite(g[s].scale)) for s in ("h1", "h2")]),
            "change": change(balanced),
        }
        if dtype == F64:  # quadratic convergence; the canonical form around degenerate neurons
            out["quick"] = gj.balance_residual(gauge, gj.balance(gauge, far, max_steps=8)[0])
            out["canon_change"] = change(gj.canonicalize(gauge, far)[0])
        return out

    out = run(far)
    assert float(out["before"]) > 0.1
    assert float(out["after"]) <= tol
    assert bool(jnp.all(out["kept"])) and bool(jnp.all(out["finite"]))
    assert float(out["change"]) <= 10 * tol
    if dtype == F64:
        assert float(out["quick"]) <= 1e-10
        assert float(out["canon_change"]) <= 10 * tol


def test_recurrent_neurons_off_every_boundary_cycle(getkey):
    """In a recurrent gauge a neuron can have both sides nonzero and still no balanced
    point: neurons 4 <-> 5 feed each other, fed from the input but reaching no output, so
    their common scale ran away (1e-8, with a residual of 1e-16). Neuron 3 feeds only
    itself: balanced at any scale, not degenerate, pinned. Every neuron whose edges lie on
    a cycle through the boundary still balances, including the recurrent ones."""
    n, keys = 7, jax.random.split(getkey(), 4)
    p = {"W_in": jax.random.normal(keys[0], (n, 3), F64), "b": jax.random.normal(keys[1], (n,), F64),
         "W_hh": jax.random.normal(keys[2], (n, n), F64), "W_out": jax.random.normal(keys[3], (2, n), F64)}
    for i in (3, 4, 5):
        p["W_out"] = p["W_out"].at[:, i].set(0.0)
        p["W_hh"] = p["W_hh"].at[:, i].set(0.0).at[i, :].set(0.0)
    for i in (3, 5):
        p["W_in"], p["b"] = p["W_in"].at[i].set(0.0), p["b"].at[i].set(0.0)
    p["W_hh"] = p["W_hh"].at[3, 3].set(1.0).at[4, 5].set(0.7).at[5, 4].set(0.3)
    gauge = gj.Gauge({"h": gj.PositiveDiagonal(n)}, [
        gj.Produce("W_in", 0, "h"), gj.Produce("b", 0, "h"), gj.Produce("W_hh", 0, "h"),
        gj.Consume("W_hh", 1, "h"), gj.Consume("W_out", 1, "h")], p)
    far = gauge.act(gauge.sample(getkey(), scale=1.0, dtype=F64), p)

    @jax.jit
    def run(far):
        balanced, g = gj.balance(gauge, far)
        return gj.degenerate_units(gauge, far)["h"], g["h"], gj.balance_residual(gauge, balanced)

    dead, scale, residual = run(far)
    assert [int(i) for i in jnp.flatnonzero(dead)] == [4, 5]
    assert bool(jnp.all(scale[3:6] == 1.0))
    assert float(jnp.max(jnp.abs(jnp.log(scale)))) < 5.0
    assert float(residual) <= 1e-12


def _recurrent(getkey, n, closed):
    """An RNN-like gauge whose neurons `closed` touch neither the input, the bias nor the
    output (only `W_hh`, which the caller fills in for them)."""
    keys = jax.random.split(getkey(), 4)
    p = {"W_in": jax.random.normal(keys[0], (n, 3), F64), "b": jax.random.normal(keys[1], (n,), F64),
         "W_hh": jax.random.normal(keys[2], (n, n), F64), "W_out": jax.random.normal(keys[3], (2, n), F64)}
    for i in closed:
        p["W_out"] = p["W_out"].at[:, i].set(0.0)
        p["W_hh"] = p["W_hh"].at[:, i].set(0.0).at[i, :].set(0.0)
        p["W_in"], p["b"] = p["W_in"].at[i].set(0.0), p["b"].at[i].set(0.0)
    gauge = gj.Gauge({"h": gj.PositiveDiagonal(n)}, [
        gj.Produce("W_in", 0, "h"), gj.Produce("b", 0, "h"), gj.Produce("W_hh", 0, "h"),
        gj.Consume("W_hh", 1, "h"), gj.Consume("W_out", 1, "h")], p)
    return gauge, p


def test_closed_recurrent_group_balances(getkey):
    """Neurons 4 <-> 5 feed only each other: every edge lies on a cycle, so there is a
    balanced point (|W_45| = |W_54| = sqrt(0.7 * 0.3)), and the canonical form and the gauge
    distance are invariant along the orbit (they were flagged degenerate once, kept their
    scale, and two points of one orbit got canonical forms 1.4 apart)."""
    gauge, p = _recurrent(getkey, 6, (4, 5))
    p["W_hh"] = p["W_hh"].at[4, 5].set(0.7).at[5, 4].set(0.3)
    assert not bool(jnp.any(gj.degenerate_units(gauge, p)["h"]))
    balanced, _ = gj.balance(gauge, p)
    assert float(gj.balance_residual(gauge, balanced)) <= 1e-12
    w = jnp.abs(balanced["W_hh"][jnp.array([4, 5]), jnp.array([5, 4])])
    assert jnp.allclose(w, jnp.sqrt(0.21), rtol=1e-12)
    canon, _ = gj.canonicalize(gauge, p)
    for _ in range(3):
        far = gauge.act(gauge.sample(getkey(), scale=1.0, dtype=F64), p)
        chex.assert_trees_all_close(gj.canonicalize(gauge, far)[0], canon, rtol=1e-10, atol=1e-12)
        assert float(gj.gauge_distance(gauge, p, far)) <= 1e-10


def test_closed_groups_joined_one_way_are_degenerate(getkey):
    """Two closed groups, 3 <-> 4 and 5 <-> 6, with one edge 4 -> 6 between them: that
    edge lies on no cycle (the second group's scale relative to the first runs away), so
    all four are degenerate and keep their scale; the rest balances."""
    gauge, p = _recurrent(getkey, 7, (3, 4, 5, 6))
    p["W_hh"] = p["W_hh"].at[3, 4].set(0.5).at[4, 3].set(0.4).at[5, 6].set(0.9).at[6, 5].set(0.2).at[6, 4].set(0.8)
    far = gauge.act(gauge.sample(getkey(), scale=1.0, dtype=F64), p)
    assert [int(i) for i in jnp.flatnonzero(gj.degenerate_units(gauge, far)["h"])] == [3, 4, 5, 6]
    balanced, g = gj.balance(gauge, far)
    assert bool(jnp.all(g["h"][3:] == 1.0))
    assert float(gj.balance_residual(gauge, balanced)) <= 1e-12


def _far_degenerate(getkey):
    model = _with_degenerate_units(_mlp([5, 7, 6, 3], getkey()))
    gauge = gj.derive_gauge(model)
    return gauge, gauge.act(gauge.sample(getkey(), scale=1.0, dtype=F64), model)


def test_balance_is_differentiable(getkey):
    """Reverse and forward mode through the balanced point (implicit differentiation of
    the moment map; the Newton loop itself is not differentiated), under jit, against
    central differences of a linear read-out of the balanced parameters. An equinox MLP
    without biases (None in the tree: tangents were once matched to the wrong leaves after
    it) and with a degenerate neuron."""
    import equinox as eqx

    model = eqx.nn.MLP(5, 3, 6, 2, activation=jax.nn.relu, use_bias=False, use_final_bias=False,
                       key=getkey(), dtype=F64)
    model = eqx.tree_at(lambda m: m.layers[0].weight, model, model.layers[0].weight.at[2].set(0.0))
    gauge = gj.derive_gauge(model)
    far = gauge.act(gauge.sample(getkey(), scale=1.0, dtype=F64), model)
    read = linear_readout(getkey(), far)
    fd_check(lambda p: read(gj.balance(gauge, p)[0]), far, getkey())


def test_dense_gram_solve_is_scaled_float32(getkey):
    """A neuron whose weights are 1e-4 of the others makes the Gram matrix ill-conditioned
    (1e8): the float32 factorisation of the unscaled matrix lost most digits (89% error in
    the balance's derivative system); scaled by its diagonal it keeps float32 precision."""
    import equinox as eqx

    model = _mlp([6, 16, 16, 3], getkey())
    l0, l1 = model.layers[0], model.layers[1]
    model = eqx.tree_at(lambda m: (m.layers[0].weight, m.layers[0].bias, m.layers[1].weight), model,
                        (l0.weight.at[3].multiply(1e-4), l0.bias.at[3].multiply(1e-4), l1.weight.at[:, 3].multiply(1e-4)))
    gauge = gj.derive_gauge(model)
    gram, _ = _rescaling.gram_dense(gauge, jax.tree.leaves(model), _rescaling.rescaling_sites(gauge))
    assert float(jnp.linalg.cond(gram)) > 1e7
    rhs = jax.random.normal(getkey(), (gram.shape[0],), F64)
    exact = jnp.linalg.solve(gram, rhs)
    x = _rescaling.cholesky_solve(gram.astype(jnp.float32), rhs.astype(jnp.float32))
    assert float(jnp.max(jnp.abs(x.astype(F64) - exact)) / jnp.max(jnp.abs(exact))) <= 1e-4


@pytest.mark.slow
def test_balance_norm_is_differentiable_under_vmap(getkey):
    """The orbit's minimum norm (a gauge-invariant regulariser) and its gradient, also
    vmapped."""
    gauge, far = _far_degenerate(getkey)
    sq = lambda p: sum(jnp.sum(a**2) for a in jax.tree.leaves(p))  # noqa: E731
    fd_check(lambda p: sq(gj.balance(gauge, p)[0]), far, getkey())
    grads = jax.jit(jax.vmap(jax.grad(lambda p: sq(gj.balance(gauge, p)[0]))))(
        jax.tree.map(lambda a: jnp.stack([a, 2 * a]), far))
    one = jax.grad(lambda p: sq(gj.balance(gauge, p)[0]))(far)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(one)):
        assert float(jnp.max(jnp.abs(a[0] - b))) <= 1e-10 * float(jnp.max(jnp.abs(b)))


@pytest.mark.slow
def test_balance_is_differentiable_through_links(getkey):
    """The Link-coupled path (a ResNet's streams) differentiates implicitly, with the
    autodiff Hessian at the balanced point."""
    from gaugejax._report import RESNET_GAUGE, _resnet

    model = _resnet(getkey(), F64)
    gauge = gj.derive_gauge(model, **dict(RESNET_GAUGE))
    read = linear_readout(getkey(), model)
    fd_check(lambda p: read(gj.balance(gauge, p)[0]), model, getkey())


@pytest.mark.parametrize("dtype, scale, tol", [(jnp.float32, 4.0, 1e-5), (F64, 5.0, 1e-12)])
def test_link_balance_far_from_balanced(dtype, scale, tol):
    """A ResNet's streams (Link-coupled, the autodiff-Hessian path) moved far along the
    orbit. Undamped optimistix Newton took a first float32 step of 1358 in log-scale and
    returned NaN parameters (balance_residual read them as 0.0); in float64 it stopped at
    a relative residual of 1e-8 (scale 4) to 1e-6 (scale 5), its moment map computed
    through the action from the far point (a link's diagonal cancels to eps e^|d| / h)."""
    import equinox as eqx

    from gaugejax._report import RESNET_GAUGE, _resnet

    model = eqx.filter_jit(_resnet)(jax.random.PRNGKey(0), dtype)  # eagerly, every op compiles
    gauge = gj.derive_gauge(model, **dict(RESNET_GAUGE))

    @eqx.filter_jit
    def run(model):
        far = gauge.act(gauge.sample(jax.random.PRNGKey(2), scale=scale, dtype=dtype), model)
        balanced, g = gj.balance(gauge, far)
        moved = gauge.act(g, far, check=False)
        gap = jnp.max(jnp.stack([jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))
                                 for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(balanced))]))
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves((balanced, g))]))
        return finite, gj.balance_residual(gauge, far), gj.balance_residual(gauge, balanced), gap

    finite, before, after, gap = run(model)
    assert bool(finite)
    assert float(before) > 0.5
    assert float(after) <= tol, float(after)
    # the result is the re-centred point: act(g, far) up to the action's rounding there
    assert float(gap) <= (1e-3 if dtype == jnp.float32 else 1e-8)


def test_balance_residual_shows_nan():
    """A NaN weight counted as a degenerate neuron (`total > 0` is false for NaN): the
    residual left it out (0.72 over the rest) and an all-NaN model read as balanced, 0.0."""
    import equinox as eqx

    model = gj.nn.MLP([4, 6, 5, 2], jax.nn.relu, key=jax.random.PRNGKey(0), dtype=F64)
    gauge = gj.derive_gauge(model)
    assert float(gj.balance_residual(gauge, model)) > 0.0
    for bad in (eqx.tree_at(lambda t: t.layers[1].weight, model, model.layers[1].weight.at[0, 0].set(jnp.nan)),
                jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), model)):
        assert bool(jnp.isnan(gj.balance_residual(gauge, bad)))


@pytest.mark.parametrize("dtype, tiny, tol", [(jnp.float32, 1e-8, 1e-5), (F64, 1e-22, 1e-12)])
def test_nearly_pruned_neuron_balances(dtype, tiny, tol):
    """A neuron whose incoming weights are `tiny` times the others' has relative residual
    1.0 to rounding for many Newton steps (each moves its log-scale by 0.5) while its share
    of |theta|^2 is below what F resolves: judged by that saturated residual, balance
    stopped at log-scale 2.75 of 8.75 with residual 1, and two points of one orbit got
    balanced points 2e-3 apart (gauge distance 3e-3)."""
    import equinox as eqx

    model = gj.nn.MLP([5, 7, 6, 3], jax.nn.relu, key=jax.random.PRNGKey(0), dtype=dtype)
    gauge = gj.derive_gauge(model, group=gj.PositiveDiagonal)
    l0 = model.layers[0]
    model = eqx.tree_at(lambda t: (t.layers[0].weight, t.layers[0].bias), model,
                        (l0.weight.at[2].multiply(tiny), l0.bias.at[2].multiply(tiny)))
    moved = gauge.act(gauge.sample(jax.random.PRNGKey(7), scale=0.5, dtype=dtype), model)

    @jax.jit
    def run(a, b):
        (ba, _), (bb, _) = gj.balance(gauge, a), gj.balance(gauge, b)
        gap = jnp.max(jnp.stack([jnp.max(jnp.abs(u - v)) for u, v in zip(jax.tree.leaves(ba), jax.tree.leaves(bb))]))
        return gj.balance_residual(gauge, ba), gj.balance_residual(gauge, bb), gap

    res_a, res_b, gap = run(model, moved)
    assert float(res_a) <= tol and float(res_b) <= tol, (float(res_a), float(res_b))
    assert float(gap) <= 100 * float(jnp.finfo(dtype).eps)
