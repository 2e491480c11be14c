"""The continuum limit (MATH.md S12, S13): ResNet <-> neural ODE, the exact lattice gauge of
the ResNet through the engine, and the convergence rates as log-log slopes over
L = 8 .. 1024 (asserted within +-0.1 of the theory)."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj
from gaugejax import _continuum
from gaugejax.nn import NeuralODE, ParametricField, ResNet


F64 = jnp.float64


def _err(a, b):
    return float(jnp.max(jnp.abs(a - b)))


# --------------------------------------------------------------------------------------
# S12: ResNet -> NODE at rate 1/L
# --------------------------------------------------------------------------------------
def test_s12_rate():
    tab = _continuum.s12_table()
    assert tab["L"] == [8, 16, 32, 64, 128, 256, 512, 1024]
    assert abs(tab["slope"] + 1.0) <= 0.1, tab
    assert tab["passed"]
    assert all(b < a for a, b in zip(tab["error"], tab["error"][1:]))
    assert tab["error"][-1] < 1e-2  # it converges, not just scales


def test_s12_table_measures_the_resnet(getkey):
    """The table's fast Euler loop is the ResNet that `discretize` builds (same numbers)."""
    field = ParametricField.random(3, 4, num_nodes=5, key=getkey(), dtype=F64)
    node = NeuralODE(field, 1.0)
    x = jax.random.normal(getkey(), (3,), F64)
    for L in (8,):
        res = gj.nn.discretize(node, L)
        fast = _continuum._euler_dynamic(field, x, jnp.asarray(L), jnp.asarray(1.0, F64))
        assert _err(res.flow(x), fast) < 1e-12


def test_fit_slope_can_fail():
    """Negative control for the rate check: a second-order sequence is outside -1 +- 0.1."""
    Ls = [8, 16, 32, 64]
    assert abs(_continuum.fit_slope(Ls, [1.0 / L for L in Ls]) + 1) < 1e-12
    assert abs(_continuum.fit_slope(Ls, [1.0 / L**2 for L in Ls]) + 1) > 0.1


def test_discretize_continuum_limit_round_trip(getkey):
    res = ResNet.random(3, 4, 6, T=2.0, key=getkey(), dtype=F64)
    back = gj.nn.discretize(gj.nn.continuum_limit(res), res.depth)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(res)):
        assert _err(a, b) == 0.0
    node = gj.nn.continuum_limit(res)
    assert node.T == 2.0 and node.field.num_nodes == 7


# --------------------------------------------------------------------------------------
# S13: the exact lattice gauge (engine) and its continuum limit
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("activation", "boundary"),
    [(jax.nn.relu, "fixed"), (jnp.tanh, "absorb"),
     pytest.param(jnp.tanh, "fixed", marks=pytest.mark.slow), pytest.param(jax.nn.relu, "absorb", marks=pytest.mark.slow)],
    ids=["relu-fixed", "tanh-absorb", "tanh-fixed", "relu-absorb"],
)
def test_s13_lattice_gauge_is_exact(getkey, activation, boundary):
    k = getkey()
    res = ResNet.random(3, 5, 4, activation=activation, key=k, dtype=F64,
                        embedding=eqx.nn.Linear(2, 3, key=getkey(), dtype=F64),
                        readout=eqx.nn.Linear(3, 2, key=getkey(), dtype=F64))
    gauge = gj.derive_gauge(res, boundary=boundary)
    L, d, m = 4, 3, 5
    hidden = m if activation is jax.nn.relu else 0
    streams = L - 1 if boundary == "fixed" else L + 1
    assert gauge.orbit_dim == streams * d * d + L * hidden
    x = jax.random.normal(getkey(), (9, 2), F64)
    ref = res(x)
    keys = jax.random.split(getkey(), 4)

    def one(kk):
        moved = gauge.act(gauge.sample(kk, dtype=F64), res, check=False)
        return moved(x), moved.A[2]

    outs, A2 = jax.jit(jax.vmap(one))(keys)
    scale = 1.0 + float(jnp.max(jnp.abs(ref)))
    assert float(jnp.max(jnp.abs(outs - ref[None]))) < 1e-12 * scale
    assert float(jnp.min(jnp.max(jnp.abs(A2 - res.A[2][None]), axis=(1, 2)))) > 1e-2  # the parameters did move


def test_s13_affine_link_is_needed(getkey):
    """Negative control: transforming A_l linearly (A -> g_{l+1} A g_l^-1, no Link) breaks it."""
    res = ResNet.random(3, 4, 4, key=getkey(), dtype=F64)
    L = res.depth
    couplings = []
    for l in range(L):
        if l > 0:
            couplings += [gj.Consume(f"A[{l}]", 1, f"s{l}"), gj.Consume(f"W1[{l}]", 1, f"s{l}")]
        if l < L - 1:
            couplings += [gj.Produce(f"A[{l}]", 0, f"s{l + 1}"), gj.Produce(f"W2[{l}]", 0, f"s{l + 1}"),
                          gj.Produce(f"c[{l}]", 0, f"s{l + 1}")]
    wrong = gj.Gauge({f"s{l}": gj.GL(3) for l in range(1, L)}, couplings, res)
    x = jax.random.normal(getkey(), (5, 3), F64)
    moved = wrong.act(wrong.sample(getkey(), dtype=F64), res)
    assert _err(moved(x), res(x)) > 1e-2


def test_s13_wrong_hidden_group_breaks(getkey):
    res = ResNet.random(3, 5, 4, activation=jnp.tanh, key=getkey(), dtype=F64)
    with pytest.raises(ValueError, match="does not admit"):
        gj.resnet_gauge(res, group=gj.PositiveDiagonal)
    control = gj.resnet_gauge(res, group=gj.PositiveDiagonal, unsafe=True)
    x = jax.random.normal(getkey(), (5, 3), F64)
    moved = control.act(control.sample(getkey(), dtype=F64, sites=["k1"]), res)
    assert _err(moved(x), res(x)) > 1e-3


def test_s13_engine_matches_vectorised(getkey):
    """The table's vectorised link formula is exactly the engine's Link coupling."""
    for L in (8,):
        A = jax.random.normal(getkey(), (L, 3, 3), F64)
        path = gj.SmoothLiePath.random(3, boundary_identity=False, key=getkey(), dtype=F64)
        gs = jax.vmap(path)(jnp.arange(L + 1, dtype=F64) / L)
        a = _continuum.lattice_links(A, gs, 1.0 / L, engine=True)
        b = _continuum.lattice_links(A, gs, 1.0 / L, engine=False)
        assert _err(a, b) < 1e-12


@pytest.mark.parametrize("diagonal", [True, False], ids=["rescaling", "GL"])
def test_s13_rate(diagonal):
    tab = _continuum.s13_table(diagonal=diagonal)
    assert abs(tab["slope"] + 1.0) <= 0.1, tab
    assert tab["passed"]
    assert tab["error"][-1] < 0.05


def test_connection_transform_of_constant_path_is_conjugation(getkey):
    A = jax.random.normal(getkey(), (3, 3), F64)
    G = jax.scipy.linalg.expm(0.3 * jax.random.normal(getkey(), (3, 3), F64))
    new = gj.connection_transform(lambda t: A, lambda t: G)(jnp.asarray(0.5, F64))
    assert _err(new, G @ A @ jnp.linalg.inv(G)) < 1e-12


# --------------------------------------------------------------------------------------
# the CLI-ready tables
# --------------------------------------------------------------------------------------
def test_continuum_tables_and_report_rows(tmp_path):
    tabs = gj.continuum_tables(Ls=(8, 16, 32, 64))
    assert set(tabs) == {"S12", "S13-diagonal", "S13-GL"}
    for tab in tabs.values():
        assert len(tab["error"]) == 4 and np.isfinite(tab["slope"])
        assert abs(tab["slope"] + 1.0) < 0.2  # pre-asymptotic at these depths
    rows = gj.continuum_report_rows(tabs)
    assert [r["statement"] for r in rows] == ["S12", "S13", "S13"]
    text = _continuum.format_table(tabs["S12"])
    assert "fitted slope" in text and "1024" not in text
    paths = _continuum.plot_tables(tabs, str(tmp_path))
    assert len(paths) == 3
    with pytest.raises(ValueError, match="at least two"):
        gj.continuum_tables(Ls=(8,))
    with pytest.raises(ValueError, match="distinct"):  # a slope fitted to one depth
        gj.continuum_tables(Ls=(8, 8))
    with pytest.raises(TypeError, match="integers"):  # 8.7 was truncated to 8
        gj.continuum_tables(Ls=(8.7, 16.2))


def test_resnet_refuses_integer_blocks():
    # an integer h = T / L truncated to 0: the blocks were skipped
    A = [jnp.ones((2, 2), jnp.int32)]
    with pytest.raises(TypeError, match=r"`A\[0\]`: the blocks' parameters must be float arrays"):
        ResNet(A, [jnp.ones((3, 2))], [jnp.ones(3)], [jnp.ones((2, 3))], [jnp.ones(2)], T=0.5)


@pytest.mark.slow
def test_node_grid_gauge_is_O_h_for_the_flow():
    """The parametric-NODE grid gauge (forward-difference Links) changes the continuous
    flow map by O(h): slope -1 over grids of N = 8 .. 64 intervals."""
    path = gj.SmoothLiePath.random(3, scale=0.5, key=jax.random.key(3), dtype=F64)
    base = ParametricField.random(3, 4, num_nodes=2, key=jax.random.key(4), dtype=F64)
    x = jax.random.normal(jax.random.key(5), (3,), F64)
    errs, Ns = [], [8, 16, 32, 64]
    ctl = diffrax.PIDController(rtol=1e-10, atol=1e-10)
    for N in Ns:
        ts = jnp.linspace(0.0, 1.0, N + 1, dtype=F64)
        p = jax.vmap(base.at)(ts)
        node = NeuralODE(ParametricField(ts, p["A"], p["W1"], p["b"], p["W2"], p["c"]), 1.0,
                         stepsize_controller=ctl)
        gauge = gj.node_gauge(node)
        g = gauge.identity(F64)
        g.update({f"s{i}": path(ts[i]) for i in range(1, N)})
        moved = gauge.act(g, node)
        errs.append(_err(eqx.filter_jit(lambda n: n.flow(x))(moved), eqx.filter_jit(lambda n: n.flow(x))(node)))
    slope = _continuum.fit_slope(Ns, errs)
    assert abs(slope + 1.0) <= 0.15, (errs, slope)
