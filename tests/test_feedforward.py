"""MATH.md S1-S4 and the functional dimension, on feedforward networks."""

import math
from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj


def _model(sizes, activation, key, dtype=jnp.float64):
    return gj.nn.MLP(sizes, activation, key=key, dtype=dtype)


def _fn(m, x):
    return m(x)


SIZES = (6, 12, 10, 3)


@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-12), (jnp.float32, 1e-5)])
@pytest.mark.parametrize("activation", [jax.nn.relu, jax.nn.leaky_relu])
def test_s1_rescaling_relu(activation, dtype, tol, getkey):
    model = _model(SIZES, activation, getkey(), dtype)
    gauge = gj.derive_gauge(model, group=gj.PositiveDiagonal)
    x = jax.random.normal(getkey(), (32, SIZES[0]), dtype)
    rep = gj.check_invariance(_fn, gauge, model, x, key=getkey(), num_samples=256, scale=0.5)
    assert rep.max_rel_error <= tol, rep


def test_s1_negative_scale_breaks_relu(getkey):
    model = _model(SIZES, jax.nn.relu, getkey())
    bad = gj.derive_gauge(model, group=gj.SignFlip, unsafe=True)
    x = jax.random.normal(getkey(), (32, SIZES[0]), jnp.float64)
    rep = gj.check_invariance(_fn, bad, model, x, key=getkey(), num_samples=64)
    assert not rep.passed and rep.median_rel_error > 1e-2


def test_s2_gelu_rescaling_breaks_tanh_signs_hold(getkey):
    x = jax.random.normal(getkey(), (32, SIZES[0]), jnp.float64)
    gelu = _model(SIZES, jax.nn.gelu, getkey())
    bad = gj.derive_gauge(gelu, group=gj.PositiveDiagonal, unsafe=True)
    rep = gj.check_invariance(_fn, bad, gelu, x, key=getkey(), num_samples=64)
    assert rep.median_rel_error > 1e-2
    tanh = _model(SIZES, jnp.tanh, getkey())
    signs = gj.derive_gauge(tanh, group=gj.SignFlip)
    assert gj.check_invariance(_fn, signs, tanh, x, key=getkey(), num_samples=64).max_rel_error <= 1e-12


@pytest.mark.parametrize("activation", [jax.nn.relu, jnp.tanh, jax.nn.gelu, jax.nn.sigmoid, jax.nn.silu, jnp.sin])
def test_s3_permutations_for_every_elementwise_activation(activation, getkey):
    model = _model(SIZES, activation, getkey())
    gauge = gj.derive_gauge(model, group=gj.Permutation)
    x = jax.random.normal(getkey(), (16, SIZES[0]), jnp.float64)
    assert gj.check_invariance(_fn, gauge, model, x, key=getkey(), num_samples=32).max_rel_error <= 1e-12


def test_unknown_activation_gets_permutations_and_can_be_registered(getkey):
    def my_act(z):
        return jnp.where(z > 0, 2.0 * z, 0.5 * z)

    model = _model(SIZES, my_act, getkey())
    assert isinstance(gj.derive_gauge(model).site_groups["h1"], gj.Permutation)
    with pytest.raises(ValueError, match="does not admit"):
        gj.derive_gauge(model, group=gj.PositiveDiagonal)
    gj.register_activation(my_act, "positive_homogeneous")
    gauge = gj.derive_gauge(model)
    assert isinstance(gauge.site_groups["h1"], gj.PositiveMonomial)
    x = jax.random.normal(getkey(), (16, SIZES[0]), jnp.float64)
    assert gj.check_invariance(_fn, gauge, model, x, key=getkey(), num_samples=32).passed


def test_s4_balanced_point(getkey):
    model = _model(SIZES, jax.nn.relu, getkey())
    gauge = gj.derive_gauge(model, group=gj.PositiveDiagonal)
    far = gauge.act(gauge.sample(getkey(), scale=1.5, dtype=jnp.float64), model)
    balanced, g = gj.balance(gauge, far)
    assert float(gj.balance_residual(gauge, far)) > 0.1
    assert float(gj.balance_residual(gauge, balanced)) <= 1e-8
    # explicit form of the moment map: |W_l[i,:]|^2 + b_l[i]^2 = |W_{l+1}[:, i]|^2
    for l in range(2):
        w, b, w_next = balanced.layers[l].weight, balanced.layers[l].bias, balanced.layers[l + 1].weight
        incoming = jnp.sum(w**2, axis=1) + b**2
        outgoing = jnp.sum(w_next**2, axis=0)
        assert jnp.allclose(incoming, outgoing, rtol=1e-8)
    # same function, smaller norm than any other orbit point we try, same result from
    # anywhere on the orbit
    x = jax.random.normal(getkey(), (16, SIZES[0]), jnp.float64)
    assert jnp.allclose(balanced(x), far(x), rtol=1e-10, atol=1e-12)
    sq = lambda m: sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(m))
    for _ in range(5):
        other = gauge.act(gauge.sample(getkey(), scale=0.3, dtype=jnp.float64), balanced)
        assert sq(other) >= sq(balanced)
    again, _ = gj.balance(gauge, gauge.act(gauge.sample(getkey(), scale=1.0, dtype=jnp.float64), far))
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(balanced))) <= 1e-7


def test_s4_norm_is_convex_in_log_scales(getkey):
    model = _model(SIZES, jax.nn.relu, getkey())
    gauge = gj.derive_gauge(model, group=gj.PositiveDiagonal)
    flat, unravel = jax.flatten_util.ravel_pytree(gauge.algebra_zeros(jnp.float64))

    def norm(v):
        m = gauge.act(gauge.exp(unravel(v)), model)
        return sum(jnp.sum(a**2) for a in jax.tree.leaves(m))

    for _ in range(3):
        v = 0.7 * jax.random.normal(getkey(), flat.shape, jnp.float64)
        eig = jnp.linalg.eigvalsh(jax.hessian(norm)(v))
        assert float(eig[0]) >= -1e-9 * float(eig[-1])


def test_moment_map_equals_formula(getkey):
    model = _model(SIZES, jax.nn.relu, getkey())
    gauge = gj.derive_gauge(model)
    mu = gj.moment_map(gauge, model)
    w, b, w_next = model.layers[0].weight, model.layers[0].bias, model.layers[1].weight
    assert jnp.allclose(mu["h1"], jnp.sum(w**2, 1) + b**2 - jnp.sum(w_next**2, 0), rtol=1e-12)


def _spread_inputs(key, sizes, n_params):
    # the Jacobian rank is a property of the activation regions the inputs visit
    return gj.probe_inputs(key, math.ceil(32 * n_params / sizes[-1]), sizes[0], dtype=jnp.float64)


@pytest.mark.parametrize("sizes", [(10, 8, 6, 4), (8, 16, 12, 4), (3, 5, 1)])
def test_functional_dimension_reaches_params_minus_orbit(sizes):
    model = _model(sizes, jax.nn.relu, jax.random.key(0))
    gauge = gj.derive_gauge(model)
    n_params = sum(a.size for a in jax.tree.leaves(model))
    fd = gj.functional_dimension(_fn, model, _spread_inputs(jax.random.key(3), sizes, n_params))
    assert fd.num_params == n_params
    assert fd.rank == n_params - gauge.orbit_dim
    assert fd.gap > 1e3


def test_functional_dimension_per_example_is_the_same_jacobian():
    """Assembled from the inputs' own Jacobians, the matrix is the batched one: the same
    singular values and rank."""
    sizes = (6, 10, 8, 3)
    model = _model(sizes, jax.nn.relu, jax.random.key(0))
    n_params = sum(a.size for a in jax.tree.leaves(model))
    x = _spread_inputs(jax.random.key(3), sizes, n_params)
    batched = gj.functional_dimension(_fn, model, x)
    single = gj.functional_dimension(lambda m, xi: m(xi), model, x, per_example=True)
    assert (single.rank, single.num_outputs) == (batched.rank, batched.num_outputs)
    np.testing.assert_allclose(single.singular_values, batched.singular_values,
                               rtol=1e-10, atol=1e-12 * batched.singular_values[0])


@pytest.mark.parametrize("sizes", [(4, 8, 6, 2), (5, 5, 5, 5, 1), (2, 12, 2), (6, 6, 4, 2)])
def test_functional_dimension_is_an_upper_bound(sizes):
    # other shapes (expanding, deep and narrow) may fall below params - orbit: the bound
    # must hold, equality need not (the report shows which)
    model = _model(sizes, jax.nn.relu, jax.random.key(0))
    gauge = gj.derive_gauge(model)
    n_params = sum(a.size for a in jax.tree.leaves(model))
    fd = gj.functional_dimension(_fn, model, _spread_inputs(jax.random.key(3), sizes, n_params))
    assert fd.rank <= n_params - gauge.orbit_dim


def test_eqx_mlp_and_gaugejax_mlp_agree(getkey):
    key = getkey()
    e = eqx.nn.MLP(4, 2, 6, 2, key=key, dtype=jnp.float64)
    g1 = gj.derive_gauge(e)
    assert [repr(g) for _, g in g1.sites] == ["PositiveMonomial(6)", "PositiveMonomial(6)"]
    x = jax.random.normal(getkey(), (8, 4), jnp.float64)
    rep = gj.check_invariance(lambda m, x: jax.vmap(m)(x), g1, e, x, key=getkey(), num_samples=32)
    assert rep.max_rel_error <= 1e-12


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_mlp_keeps_the_dtype_asked_for(dtype):
    # NumPy promotes a Python float times a bfloat16 array to float32
    m = gj.nn.MLP([3, 4, 2], jax.nn.relu, key=jax.random.key(0), dtype=dtype)
    traced = jax.jit(lambda k: gj.nn.MLP([3, 4, 2], jax.nn.relu, key=k, dtype=dtype))(jax.random.key(0))
    for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(traced)):
        assert a.dtype == b.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_functional_dimension_in_float16():
    # NumPy's SVD has no float16: the Jacobian is decomposed in float32, the threshold
    # stays float16's
    m = gj.nn.MLP([3, 4, 2], jax.nn.relu, key=jax.random.key(0), dtype=jnp.float16)
    x = jax.random.normal(jax.random.key(1), (40, 3), jnp.float16)
    fd = gj.functional_dimension(lambda p, x: p(x), m, x, per_example=True)
    assert 0 < fd.rank <= 26 - 4  # params - orbit
    assert fd.tol == pytest.approx(max(80, 26) * float(jnp.finfo(jnp.float16).eps) * float(fd.singular_values[0]))


def test_partial_activations_keep_a_family_only_where_it_holds():
    """A functools.partial kept its function's family whatever it bound: per-unit
    leaky-ReLU slopes (a PReLU) got positive monomials and a registered odd function with
    a bound shift got signed permutations, and both failed their sweeps by O(1)."""
    import functools

    from gaugejax._activations import activation_family

    def shifted_tanh(z, shift=0.0):
        return jnp.tanh(z - shift)

    gj.register_activation(shifted_tanh, "odd")
    assert activation_family(functools.partial(jax.nn.leaky_relu, negative_slope=0.2)) == "positive_homogeneous"
    assert activation_family(functools.partial(jax.nn.gelu, approximate=False)) == "elementwise"
    assert activation_family(functools.partial(shifted_tanh, shift=0.7)) == "elementwise"
    assert activation_family(shifted_tanh) == "odd"
    # erf is odd (inference reads it so from its program; the registry agrees)
    assert activation_family(jax.scipy.special.erf) == activation_family(jax.lax.erf) == "odd"
    prelu = functools.partial(jax.nn.leaky_relu, negative_slope=jnp.linspace(-1.0, 0.5, 6))
    params = [(jnp.ones((6, 4)), jnp.ones(6)), (jnp.ones((3, 6)), jnp.ones(3))]
    with pytest.raises(ValueError, match="binds an array as argument 'negative_slope'"):
        gj.feedforward_gauge(params, prelu)


def test_flax_layers_without_an_index_are_refused():
    """{"hidden_0", "hidden_1", "output"} was ordered hidden_0, output, hidden_1 (a name
    without an index counted as 0), and the gauge built on the wrong chain."""
    layer = lambda a, b: {"kernel": jnp.ones((a, b)), "bias": jnp.ones(b)}  # noqa: E731
    params = {"params": {"hidden_0": layer(4, 6), "hidden_1": layer(6, 6), "output": layer(6, 6)}}
    with pytest.raises(ValueError, match=r"cannot tell the order of the layers .*'output'.*pass `weights=`"):
        gj.feedforward_gauge(params, jax.nn.relu)
    params = {"params": {"Dense_10": layer(6, 6), "Dense_2": layer(4, 6), "Dense_11": layer(6, 3)}}
    gauge = gj.feedforward_gauge(params, jax.nn.relu)
    assert [c.leaf for c in gauge.couplings if isinstance(c, gj.Produce) and "kernel" in c.leaf][0] == "['params']['Dense_2']['kernel']"


def _invariant(fn, gauge, params, n_in, key):
    x = jax.random.normal(key, (8, n_in), jnp.float64)
    return gj.check_invariance(fn, gauge, params, x, key=key, num_samples=8).max_rel_error <= 1e-12


def _normals(key, *shapes):
    return [jax.random.normal(k, s, jnp.float64) for k, s in zip(jax.random.split(key, len(shapes)), shapes)]


def test_named_weights_find_the_bias_beside_them(getkey):
    """With `weights=` and no `biases=`, the biases were dropped ([None] * L): the hidden
    biases never transformed and the gauge was not a symmetry (relative error O(1))."""
    w0, b0, w1, b1 = _normals(getkey(), (6, 4), (6,), (3, 6), (3,))
    params = {"l0": {"W": w0, "b": b0}, "l1": {"W": w1, "b": b1}}

    def fn(p, x):
        return jax.nn.relu(x @ p["l0"]["W"].T + p["l0"]["b"][None]) @ p["l1"]["W"].T + p["l1"]["b"][None]

    gauge = gj.feedforward_gauge(params, jax.nn.relu, weights=["l0/W", "l1/W"])
    assert [c.leaf for c in gauge.couplings] == ["['l0']['W']", "['l0']['b']", "['l1']['W']"]  # canonical paths
    assert _invariant(fn, gauge, params, 4, getkey())
    # a numbered name keeps its number (w1 -> b1), and an explicit None still means no bias
    flat = {"w1": w0, "b1": b0, "w2": w1, "b2": b1}
    gauge = gj.feedforward_gauge(flat, jax.nn.relu, weights=["w1", "w2"])
    assert "['b1']" in [c.leaf for c in gauge.couplings]
    gauge = gj.feedforward_gauge(flat, jax.nn.relu, weights=["w1", "w2"], biases=[None, None])
    assert [c.leaf for c in gauge.couplings] == ["['w1']", "['w2']"]
    # PyTorch state-dict names: fc1.weight -> fc1.bias
    sd = {"fc1.weight": w0, "fc1.bias": b0, "fc2.weight": w1, "fc2.bias": b1}
    gauge = gj.feedforward_gauge(sd, jax.nn.relu, weights=["['fc1.weight']", "['fc2.weight']"])
    assert "['fc1.bias']" in [c.leaf for c in gauge.couplings]
    # a hand-written {"layer": {"w", "b"}} dict is not haiku's: its "w" is read as the
    # shapes say ((out, in) here), not as haiku's (in, out) (refused, or a wrong gauge)
    hand = {"hidden": {"w": w0, "b": b0}, "out": {"w": w1, "b": b1}}

    def hand_fn(p, x):
        return jax.nn.relu(x @ p["hidden"]["w"].T + p["hidden"]["b"][None]) @ p["out"]["w"].T + p["out"]["b"][None]

    gauge = gj.feedforward_gauge(hand, jax.nn.relu, weights=["hidden/w", "out/w"], biases=["hidden/b", "out/b"])
    assert gauge.couplings[0].axis == 0 and _invariant(hand_fn, gauge, hand, 4, getkey())
    numbered = {"layer_0": hand["hidden"], "layer_1": hand["out"]}  # found automatically
    gauge = gj.feedforward_gauge(numbered, jax.nn.relu)
    assert gauge.couplings[0].axis == 0
    assert _invariant(lambda p, x: hand_fn({"hidden": p["layer_0"], "out": p["layer_1"]}, x), gauge, numbered, 4, getkey())


def test_shared_arrays_and_bound_methods_are_not_per_unit():
    """A size-1 array, or a bound method of a model (whose instance holds the model's own
    weights), is not a per-unit parameter: still "elementwise"."""

    class Net(eqx.Module):
        W: jax.Array

        def act(self, x):
            return jnp.tanh(x) * 2.0

    assert gj.activation_family(Net(jnp.ones((4, 3))).act) == "elementwise"
    slope = jnp.array([0.1])
    assert gj.activation_family(lambda x: jnp.where(x > 0, x, slope * x)) == "elementwise"


def test_named_weights_take_their_layout_from_their_names(getkey):
    """Flax kernels named with `weights=` and no `layout=` were read as (out, in): square
    kernels then gave a wrong gauge (relative error ~9) instead of flax's (in, out)."""
    n = 5
    ws = _normals(getkey(), *[(n, n)] * 3)
    bs = _normals(getkey(), *[(n,)] * 3)
    params = {"params": {f"Dense_{i}": {"kernel": ws[i], "bias": bs[i]} for i in range(3)}}

    def fn(p, x):
        for i in range(3):
            x = x @ p["params"][f"Dense_{i}"]["kernel"] + p["params"][f"Dense_{i}"]["bias"][None]
            x = jax.nn.relu(x) if i < 2 else x
        return x

    gauge = gj.feedforward_gauge(params, jax.nn.relu, weights=[f"params/Dense_{i}/kernel" for i in range(3)],
                                 biases=[f"params/Dense_{i}/bias" for i in range(3)])
    assert gauge.couplings[0].axis == 1
    assert _invariant(fn, gauge, params, n, getkey())
    # names that say nothing: non-square shapes decide, square ones ask for layout=
    plain = {"a": jnp.ones((4, 6)), "c": jnp.ones((6, 3))}
    assert gj.feedforward_gauge(plain, jax.nn.relu, weights=["a", "c"]).couplings[0].axis == 1
    square = {"a": jnp.ones((6, 6)), "c": jnp.ones((6, 6))}
    with pytest.raises(ValueError, match=r"cannot tell the layout of the weights.*'a' \(6, 6\).*pass layout="):
        gj.feedforward_gauge(square, jax.nn.relu, weights=["a", "c"])


@pytest.mark.parametrize("norm", ["LayerNorm_0", "BatchNorm_0"])
def test_flax_and_haiku_trees_with_a_norm_layer_are_refused(norm):
    """A LayerNorm between flax Dense layers was silently ignored and a ReLU
    PositiveMonomial gauge returned, though the norm undoes rescalings (error ~1.2)."""
    dense = lambda a, b, w="kernel", bias="bias": {w: jnp.ones((a, b)), bias: jnp.ones(b)}  # noqa: E731
    params = {"params": {"Dense_0": dense(4, 6), norm: {"scale": jnp.ones(6), "bias": jnp.zeros(6)},
                         "Dense_1": dense(6, 3)}}
    with pytest.raises(ValueError, match=rf"outside the dense layers.*\['params'\]\['{norm}'\]\['scale'\].*gaugejax.Gauge.*infer_gauge"):
        gj.feedforward_gauge(params, jax.nn.relu)
    haiku = {"mlp/~/linear_0": dense(4, 6, "w", "b"), "layer_norm": {"scale": jnp.ones(6), "offset": jnp.zeros(6)},
             "mlp/~/linear_1": dense(6, 3, "w", "b")}
    with pytest.raises(ValueError, match=r"outside the dense layers.*layer_norm.*pass `weights=`"):
        gj.feedforward_gauge(haiku, jax.nn.relu)
    # naming the layers is the way to say the norm takes no part
    gj.feedforward_gauge(params, jax.nn.relu, weights=["params/Dense_0/kernel", "params/Dense_1/kernel"])


def test_w_in_a_list_of_dicts_is_read_as_the_shapes_say(getkey):
    """{"w", "b"} dicts in a list were read (out, in), haiku's dict form (in, out): a list of
    haiku-style square layers got a wrong gauge (error ~10)."""
    ws = _normals(getkey(), (4, 6), (6, 3))
    bs = _normals(getkey(), (6,), (3,))
    params = [{"w": w, "b": b} for w, b in zip(ws, bs)]

    def fn(p, x):
        return jax.nn.relu(x @ p[0]["w"] + p[0]["b"][None]) @ p[1]["w"] + p[1]["b"][None]

    gauge = gj.feedforward_gauge(params, jax.nn.relu)
    assert [c.axis for c in gauge.couplings] == [1, 0, 0]
    assert _invariant(fn, gauge, params, 4, getkey())
    transposed = [{"w": w.T, "b": b} for w, b in zip(ws, bs)]
    assert [c.axis for c in gj.feedforward_gauge(transposed, jax.nn.relu).couplings] == [0, 0, 1]
    square = [{"w": jnp.ones((5, 5)), "b": jnp.ones(5)} for _ in range(3)]
    with pytest.raises(ValueError, match=r"cannot tell the layout.*\['w'\] of a list of dicts.*pass layout="):
        gj.feedforward_gauge(square, jax.nn.relu)
    assert gj.feedforward_gauge(square, jax.nn.relu, layout="in_out").couplings[0].axis == 1
    # haiku's own dict form stays (in, out), square or not
    haiku = {f"mlp/~/linear_{i}": layer for i, layer in enumerate(square)}
    assert gj.feedforward_gauge(haiku, jax.nn.relu).couplings[0].axis == 1


def test_activations_holding_per_unit_arrays_are_refused(getkey):
    """An eqx.nn.PReLU with one slope per unit (or a function closing over such an array)
    was filed "elementwise" and got Permutation sites, which are not a symmetry."""
    import equinox as eqx

    slopes = jnp.linspace(-1.0, 1.0, 6)
    prelu = eqx.nn.PReLU(init_alpha=slopes)
    with pytest.raises(ValueError, match=r"'PReLU' holds an array of shape \(6,\).*gaugejax.Gauge"):
        gj.activation_family(prelu)
    params = [tuple(_normals(getkey(), (6, 4), (6,))), tuple(_normals(getkey(), (3, 6), (3,)))]
    with pytest.raises(ValueError, match="holds an array"):
        gj.feedforward_gauge(params, prelu)

    def closure(z):
        return jnp.where(z > 0, z, slopes * z)

    with pytest.raises(ValueError, match=r"'closure' holds an array of shape \(6,\) in its closure as 'slopes'"):
        gj.activation_family(closure)
    # one scalar slope is the same function on every unit
    assert gj.activation_family(eqx.nn.PReLU(0.1)) == "elementwise"


def test_a_none_bias_means_no_bias(getkey):
    """(W, None) in a list, or {"W": ..., "b": None}, raised "no leaf at path '[0][1]'"."""
    w0, w1, b1 = _normals(getkey(), (6, 4), (3, 6), (3,))

    def fn(p, x):
        return jax.nn.relu(x @ p[0][0].T) @ p[1][0].T + p[1][1][None]

    pairs = [(w0, None), (w1, b1)]
    gauge = gj.feedforward_gauge(pairs, jax.nn.relu)
    assert [c.leaf for c in gauge.couplings] == ["[0][0]", "[1][0]"]
    assert _invariant(fn, gauge, pairs, 4, getkey())
    dicts = [{"W": w0, "b": None}, {"W": w1, "b": b1}]
    assert [c.leaf for c in gj.feedforward_gauge(dicts, jax.nn.relu).couplings] == ["[0]['W']", "[1]['W']"]


def test_functional_dimension_documents_its_compilation_per_fn():
    """Every new `fn` object recompiles (it is static to filter_jit): the docstring says so."""
    doc = " ".join(gj.functional_dimension.__doc__.split())
    assert "recompiles every time" in doc and "same function object" in doc


def test_concepts_page_prints_the_couplings_as_they_are():
    """docs/concepts.md printed the couplings without their `view=None` field."""
    import pathlib

    page = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "concepts.md").read_text()
    start = page.index("print(ff_gauge.couplings)\n") + len("print(ff_gauge.couplings)\n")
    printed = " ".join(line[2:].strip() for line in page[start:].split("```")[0].splitlines() if line.startswith("#"))
    params = [(jnp.ones((64, 32)), jnp.ones(64)), (jnp.ones((10, 64)), jnp.ones(10))]
    assert printed == repr(gj.feedforward_gauge(params, jax.nn.relu).couplings).replace(",  ", ", ")


def test_functional_dimension_threshold_follows_the_coarsest_precision():
    """float32 parameters with float64 outputs carry float32 rounding: the threshold took
    float64's eps and counted it as rank (77 of a bound of 66). Mixed parameter dtypes are
    refused naming the leaves; a dtype too coarse for any rank (bfloat16 here) is refused
    (it crashed)."""
    m = gj.nn.MLP([4, 6, 5, 2], jax.nn.relu, key=jax.random.key(0), dtype=jnp.float32)
    bound = sum(a.size for a in jax.tree.leaves(m)) - gj.derive_gauge(m).orbit_dim
    x = gj.probe_inputs(jax.random.key(3), 400, 4, dtype=jnp.float32)
    assert gj.functional_dimension(lambda p, x: p(x).astype(jnp.float64), m, x).rank <= bound
    with pytest.raises(ValueError, match="mix float dtypes"):
        gj.functional_dimension(lambda p, x: p[0](x) * p[1], (m, jnp.ones((), jnp.float64)), x)
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, m)
    with pytest.raises(ValueError, match="threshold .* is not below 1 for bfloat16"):
        gj.functional_dimension(lambda p, x: p(x), half, x[:64].astype(jnp.bfloat16))


_SLOPES = jnp.linspace(-1.0, 1.0, 6)


def _global_prelu(z):  # per-unit slopes read from a module global
    return jnp.where(z > 0, z, _SLOPES * z)


def test_unregistered_activations_must_commute_with_permutations(getkey):
    """An unregistered activation was filed "elementwise" unchecked: MaxMin (GroupSort),
    a PReLU reading its slopes from a global or through a bound method got Permutation
    sites that are not a symmetry (output changed by 0.2-1.5). Each is now evaluated on
    permuted inputs first."""

    def maxmin(z):  # pairs (z0, z1) -> (max, min): mixes units
        a, b = z[..., ::2], z[..., 1::2]
        return jnp.stack([jnp.maximum(a, b), jnp.minimum(a, b)], -1).reshape(z.shape)

    class PerUnit(eqx.Module):
        slopes: jax.Array

        def act(self, z):
            return jnp.where(z > 0, z, self.slopes * z)

    params = [tuple(_normals(getkey(), (6, 4), (6,))), tuple(_normals(getkey(), (3, 6), (3,)))]
    for fn in (maxmin, _global_prelu, PerUnit(_SLOPES).act):
        with pytest.raises(ValueError, match="does not commute with permutations of the units"):
            gj.feedforward_gauge(params, fn)
    with pytest.raises(ValueError, match="does not commute"):
        gj.activation_family(maxmin)
    with pytest.raises(ValueError, match=r"maps a vector of shape \(8,\) to shape \(4,\)"):
        gj.activation_family(lambda z: z[::2])
    with pytest.raises(ValueError, match="evaluating it on a vector of 6 entries .* raised"):
        gj.feedforward_gauge(params, lambda z: z @ jnp.ones((5, 5)))
    # a global that is the same for every unit, and a registered escape hatch, still work
    scale = jnp.asarray(0.3)
    assert gj.activation_family(lambda z: jnp.where(z > 0, z, scale * z)) == "elementwise"
    gj.register_activation(maxmin, "elementwise")
    assert gj.activation_family(maxmin) == "elementwise"


def test_detection_refuses_convolution_kernels_and_reads_bare_first_names(getkey):
    """A flax Conv kernel (kh, kw, in, out) was read as a dense (in, out) matrix: a
    bias-free CNN got a PositiveMonomial(kw) site on its spatial axes (output error 1.5).
    haiku's default names ("linear", "linear_1", ...) and flax FrozenDicts (a Mapping,
    not a dict) were refused."""
    convs = {"params": {"Conv_0": {"kernel": jnp.ones((3, 3, 3, 16))}, "Conv_1": {"kernel": jnp.ones((3, 3, 16, 8))}}}
    with pytest.raises(ValueError, match=r"'Conv_0'\]\['kernel'\]\"?\)? has shape \(3, 3, 3, 16\).*dense"):
        gj.feedforward_gauge(convs, jax.nn.relu)

    w0, b0, w1, b1, w2, b2 = _normals(getkey(), (4, 6), (6,), (6, 5), (5,), (5, 3), (3,))
    haiku = {"linear_2": {"w": w2, "b": b2}, "linear": {"w": w0, "b": b0}, "linear_1": {"w": w1, "b": b1}}

    def haiku_fn(p, x):
        h = jax.nn.relu(x @ p["linear"]["w"] + p["linear"]["b"][None])
        h = jax.nn.relu(h @ p["linear_1"]["w"] + p["linear_1"]["b"][None])
        return h @ p["linear_2"]["w"] + p["linear_2"]["b"][None]

    gauge = gj.feedforward_gauge(haiku, jax.nn.relu)
    assert [s for s, _ in gauge.sites] == ["h1", "h2"] and _invariant(haiku_fn, gauge, haiku, 4, getkey())

    @jax.tree_util.register_pytree_with_keys_class
    class Frozen(Mapping):  # a FrozenDict-like mapping that is not a dict
        def __init__(self, d):
            self._d = dict(d)

        def __getitem__(self, k):
            return self._d[k]

        def __iter__(self):
            return iter(self._d)

        def __len__(self):
            return len(self._d)

        def tree_flatten_with_keys(self):
            keys = sorted(self._d)
            return [(jax.tree_util.DictKey(k), self._d[k]) for k in keys], keys

        @classmethod
        def tree_unflatten(cls, keys, values):
            return cls(zip(keys, values))

    flax = Frozen({"params": Frozen({f"Dense_{i}": Frozen({"kernel": w, "bias": b})
                                     for i, (w, b) in enumerate([(w0, b0), (w1, b1), (w2, b2)])})})
    gauge = gj.feedforward_gauge(flax, jax.nn.relu)
    assert _invariant(lambda p, x: haiku_fn({k: {"w": p["params"][d]["kernel"], "b": p["params"][d]["bias"]}
                                             for k, d in [("linear", "Dense_0"), ("linear_1", "Dense_1"),
                                                          ("linear_2", "Dense_2")]}, x),
                      gauge, flax, 4, getkey())
