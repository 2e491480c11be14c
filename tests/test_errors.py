"""Bad input gets a clear error naming the leaf, site or argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj


def _pairs(dtype=jnp.float64):
    k = jax.random.split(jax.random.key(0), 4)
    return [(jax.random.normal(k[0], (5, 3), dtype), jax.random.normal(k[1], (5,), dtype)),
            (jax.random.normal(k[2], (2, 5), dtype), jax.random.normal(k[3], (2,), dtype))]


def test_axis_size_disagrees_with_leaf():
    params = _pairs()
    with pytest.raises(ValueError, match=r"site 'h'.*\[1\]\[0\].*axis 1.*expected 4, received 5"):
        gj.Gauge({"h": gj.PositiveDiagonal(4)}, [gj.Consume("[1][0]", 1, "h")], params)


def test_producer_consumer_mismatch_names_both():
    params = [(jnp.ones((5, 3)), jnp.ones(5)), (jnp.ones((2, 4)), jnp.ones(2))]
    with pytest.raises(ValueError, match=r"site 'h1'.*\[0\]\[0\].*\[1\]\[0\].*consumes.*expected 5, received 4"):
        gj.feedforward_gauge(params, jax.nn.relu)


def test_unknown_leaf_and_site_and_axis():
    params = _pairs()
    with pytest.raises(ValueError, match="no leaf at path"):
        gj.Gauge({"h": gj.PositiveDiagonal(5)}, [gj.Produce("[0][2]", 0, "h")], params)
    with pytest.raises(ValueError, match="site 'g' is not declared"):
        gj.Gauge({"h": gj.PositiveDiagonal(5)}, [gj.Produce("[0][0]", 0, "g")], params)
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        gj.Gauge({"h": gj.PositiveDiagonal(5)}, [gj.Produce("[0][0]", 3, "h")], params)
    with pytest.raises(ValueError, match="declared but no coupling uses them"):
        gj.Gauge({"h": gj.PositiveDiagonal(5), "x": gj.SignFlip(2)}, [gj.Produce("[0][0]", 0, "h")], params)


def _gauge(group, dtype=jnp.float64):
    params = _pairs(dtype)
    return params, gj.Gauge({"h": group}, [gj.Produce("[0][0]", 0, "h"), gj.Produce("[0][1]", 0, "h"),
                                           gj.Consume("[1][0]", 1, "h")], params)


@pytest.mark.parametrize("jit", [False, True])
def test_non_positive_scale(jit):
    params, gauge = _gauge(gj.PositiveDiagonal(5))
    g = {"h": jnp.array([1.0, 2.0, -1.0, 1.0, 1.0])}
    act = jax.jit(gauge.act) if jit else gauge.act
    with pytest.raises(Exception, match="site 'h'.*non-positive scale"):
        jax.block_until_ready(act(g, params))


def test_singular_gl():
    params, gauge = _gauge(gj.GL(5))
    g = {"h": jnp.diag(jnp.array([1.0, 1.0, 0.0, 1.0, 1.0]))}
    with pytest.raises(Exception, match="site 'h'.*singular"):
        gauge.act(g, params)


def test_nan_in_element_and_params():
    params, gauge = _gauge(gj.PositiveDiagonal(5))
    with pytest.raises(Exception, match="site 'h'.*NaN"):
        gauge.act({"h": jnp.array([1.0, jnp.nan, 1.0, 1.0, 1.0])}, params)
    bad = [(params[0][0].at[0, 0].set(jnp.inf), params[0][1]), params[1]]
    with pytest.raises(ValueError, match=r"leaf '\[0\]\[0\]' contains NaN or inf"):
        gauge.check_params(bad)
    fn = lambda p, x: x @ p[0][0].T
    with pytest.raises(ValueError, match=r"leaf '\[0\]\[0\]'"):
        gj.check_invariance(fn, gauge, bad, jnp.ones((2, 3)), key=jax.random.key(0))


def test_invalid_permutation():
    params, gauge = _gauge(gj.Permutation(5))
    with pytest.raises(Exception, match="not a permutation"):
        gauge.act({"h": jnp.array([0, 0, 1, 2, 3], jnp.int32)}, params)


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_num_samples(n):
    params, gauge = _gauge(gj.Permutation(5))
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        gj.check_invariance(lambda p, x: x, gauge, params, jnp.ones(2), key=jax.random.key(0), num_samples=n)


def test_mixed_dtypes():
    params, gauge = _gauge(gj.PositiveDiagonal(5), jnp.float32)
    g = gauge.sample(jax.random.key(0), dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"dtype mismatch.*site 'h'.*float64.*leaf '\[0\]\[0\]'.*float32"):
        gauge.act(g, params)


def test_activation_group_not_a_symmetry():
    params = _pairs()
    with pytest.raises(ValueError, match=r"site 'h1'.*gelu.*does not admit PositiveDiagonal"):
        gj.feedforward_gauge(params, jax.nn.gelu, group=gj.PositiveDiagonal)
    with pytest.raises(ValueError, match=r"site 'h1'.*tanh.*does not admit PositiveMonomial"):
        gj.feedforward_gauge(params, jnp.tanh, group=gj.PositiveMonomial)
    # allowed when asked for explicitly
    gj.feedforward_gauge(params, jax.nn.gelu, group=gj.PositiveDiagonal, unsafe=True)


def test_wrong_structure_and_element_sites():
    params, gauge = _gauge(gj.PositiveDiagonal(5))
    with pytest.raises(ValueError, match="structure"):
        gauge.act(gauge.identity(), params[:1])
    with pytest.raises(ValueError, match="missing"):
        gauge.act({}, params)
    with pytest.raises(ValueError, match="site 'h'.*expected an element with shapes"):
        gauge.act({"h": jnp.ones(4)}, params)


def test_no_gauge_for_unknown_model():
    with pytest.raises(TypeError, match="no gauge is known"):
        gj.derive_gauge(object())


def test_mixed_param_dtypes_in_sweep():
    params = [(jnp.ones((5, 3), jnp.float32), jnp.ones(5, jnp.float64)), (jnp.ones((2, 5)), jnp.ones(2))]
    gauge = gj.feedforward_gauge(params, jax.nn.relu, group=gj.Permutation)
    with pytest.raises(ValueError, match=r"mix float dtypes: float32 \(e.g. .\[0\]\[0\].\), float64 \(e.g. .\[0\]\[1\].\)"):
        gj.check_invariance(lambda p, x: x, gauge, params, np.ones(2), key=jax.random.key(0))


def test_translation_site_shared_by_two_leaves():
    # one shift t on two leaves with different linear actions would compose as two shifts
    k = jax.random.split(jax.random.key(0), 3)
    params = {"b1": jax.random.normal(k[0], (3,)), "b2": jax.random.normal(k[1], (3,)),
              "w": jax.random.normal(k[2], (3, 2))}
    with pytest.raises(ValueError, match=r"Translation site 't' already translates leaf .*b1.*one site per leaf"):
        gj.Gauge({"qk": gj.GL(3), "t": gj.Translation((3,))},
                 [gj.Consume("b1", 0, "qk"), gj.Consume("w", 0, "qk"),
                  gj.Translate("b1", "t"), gj.Translate("b2", "t")], params)


def test_group_instance_instead_of_class():
    with pytest.raises(TypeError, match=r"group class or a function width -> group.*instance Permutation\(5\)"):
        gj.feedforward_gauge(_pairs(), jax.nn.relu, group=gj.Permutation(5))
    with pytest.raises(TypeError, match="got 3"):
        gj.feedforward_gauge(_pairs(), jax.nn.relu, group=3)


def test_sweep_arguments():
    params, gauge = _gauge(gj.PositiveDiagonal(5))
    x = np.ones((4, 3))
    mlp = lambda p, x: jax.nn.relu(x @ p[0][0].T + p[0][1][None]) @ p[1][0].T + p[1][1][None]
    run = lambda fn=mlp, **kw: gj.check_invariance(
        fn, gauge, params, x, key=jax.random.key(0), num_samples=4, **kw)
    with pytest.raises(ValueError, match="blocks must be a positive integer, got 0"):
        run(blocks=0)
    with pytest.raises(ValueError, match="rtol must be a non-negative number, got -1"):
        run(rtol=-1.0)
    with pytest.raises(TypeError, match=r"fn's output\['y'\] is of dtype int32"):
        run(lambda p, x: {"y": jnp.int32(1), "z": mlp(p, x)})
    with pytest.raises(ValueError, match="structure this gauge was built for"):
        gj.check_invariance(lambda p, x: x, gauge, params[:1], x, key=jax.random.key(0))
    with pytest.raises(ValueError, match="fn returned no arrays"):
        run(lambda p, x: {})
    with pytest.raises(ValueError, match=r"fn's output\['y'\] has shape \(0,\)"):
        run(lambda p, x: {"y": jnp.zeros((0,)), "z": mlp(p, x)})
    assert run(chunk_size=np.int64(3)).passed  # NumPy integers are integers
    rep = run(sites="h", per_site=True)  # one site's name
    assert rep.passed and list(rep.per_site) == ["h"]


def test_element_and_algebra_dtypes_and_shapes():
    params, gauge = _gauge(gj.Permutation(5))
    with pytest.raises(TypeError, match=r"site 'h'.*integer index arrays.*float32"):
        gauge.act({"h": jnp.arange(5, dtype=jnp.float32)}, params)
    params, gauge = _gauge(gj.PositiveDiagonal(5))
    for f in (gauge.exp, lambda xi: gauge.vertical(params, xi)):
        with pytest.raises(ValueError, match=r"site 'h'.*Lie-algebra element of shape \(5,\), got \(4,\)"):
            f({"h": jnp.ones(4)})
    # exp(xi, dtype=...) is in that dtype whatever xi's, so it acts on such parameters
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    g = gauge.exp({"h": jnp.ones(5, jnp.float32)}, dtype=jnp.bfloat16)
    assert g["h"].dtype == jnp.bfloat16
    gauge.act(g, half)
    # half-precision parameters are ranked in float32 (NumPy's SVD refused bfloat16)
    gl = gj.Gauge({"h": gj.GL(5)}, [gj.Produce("[0][0]", 0, "h"), gj.Produce("[0][1]", 0, "h"),
                                   gj.Consume("[1][0]", 1, "h")], params)
    assert gl.orbit_rank(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)) == gl.orbit_rank(
        jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), params))


def test_coupling_axis_and_link_step():
    params = _pairs()
    for axis in (0.0, True):
        with pytest.raises(TypeError, match=f"axis must be an integer, got {axis}"):
            gj.Gauge({"h": gj.PositiveDiagonal(5)}, [gj.Produce("[0][0]", 0, "h"), gj.Consume("[1][0]", axis, "h")], params)
    A = {"A": [jnp.eye(3), jnp.eye(3)]}
    for h in (float("inf"), True, -0.1):
        with pytest.raises(ValueError, match="step h must be a positive finite float"):
            gj.Gauge({"s": gj.GL(3)}, [gj.Link("['A'][0]", "s", None, h), gj.Link("['A'][1]", None, "s", h)], A)
    gj.Gauge({"s": gj.GL(3)}, [gj.Link("['A'][0]", "s", None, np.float32(0.5)), gj.Link("['A'][1]", None, "s", 0.5)], A)
    # a link's affine term must see every site acting on its leaf: a second Link, or a
    # Produce beside it, acted on A linearly only (the group law failed by O(1))
    sites = {"s0": gj.GL(3), "s1": gj.GL(3)}
    with pytest.raises(ValueError, match="carries 2 Links"):
        gj.Gauge(sites, [gj.Link("['A'][0]", "s1", None, 0.1), gj.Link("['A'][0]", None, "s0", 0.1)], A)
    with pytest.raises(ValueError, match=r"also coupled to \['s1'\]"):
        gj.Gauge(sites, [gj.Link("['A'][0]", None, "s0", 0.1), gj.Produce("['A'][0]", 0, "s1")], A)


def test_in_out_pairs_ask_for_layout():
    """(W, b) pairs written (in, out) got a site-dimension error that never said layout."""
    pairs = [(jnp.ones((4, 6)), jnp.zeros(6)), (jnp.ones((6, 3)), jnp.zeros(3))]
    with pytest.raises(ValueError, match=r"list of \(W, b\) pairs.*'\[0\]\[0\]' \(4, 6\).*look \(in, out\); pass layout='in_out'"):
        gj.feedforward_gauge(pairs, jax.nn.relu)
    assert gj.feedforward_gauge(pairs, jax.nn.relu, layout="in_out").couplings[0].axis == 1


def test_activation_must_be_callable():
    """A string activation ("relu") was accepted and silently gave Permutation sites."""
    with pytest.raises(TypeError, match=r"`activation` must be a callable.*got 'relu' of type str"):
        gj.feedforward_gauge(_pairs(), "relu")
    with pytest.raises(TypeError, match=r"`activation\[0\]` must be a callable.*got 'relu'"):
        gj.feedforward_gauge(_pairs(), ["relu"])
    with pytest.raises(TypeError, match="an activation must be a callable.*'tanh'"):
        gj.activation_family("tanh")


@pytest.mark.parametrize("bad", [6.7, 6.0, True, "6"])
def test_mlp_sizes_must_be_integers(bad):
    """gaugejax.nn.MLP([4, 6.7, 3]) truncated the width to 6."""
    with pytest.raises(ValueError, match=rf"`sizes\[1\]` must be an integer layer width, got {bad!r}"):
        gj.nn.MLP([4, bad, 3], key=jax.random.key(0))
    assert gj.nn.MLP([4, np.int64(6), 3], key=jax.random.key(0)).sizes == [4, 6, 3]


def test_functional_dimension_and_probe_arguments():
    """rtol = -1 counted every singular value (a rank above params - orbit), NaN or 2 none;
    max_scale = -5 gave NaN inputs: each refused by name."""
    m = gj.nn.MLP([2, 3, 1], jax.nn.relu, key=jax.random.key(0))
    x = gj.probe_inputs(jax.random.key(1), 8, 2)
    for rtol in (-1.0, float("nan"), 2.0):
        with pytest.raises(ValueError, match="`rtol` must be a number in"):
            gj.functional_dimension(lambda p, x: p(x), m, x, rtol=rtol)
    for kw, match in ((dict(max_scale=-5.0), "max_scale"), (dict(max_scale=float("nan")), "max_scale"),
                      (dict(num=0), "`num`"), (dict(dim=2.0), "`dim`")):
        args = {"num": 8, "dim": 2, **kw}
        with pytest.raises(ValueError, match=match):
            gj.probe_inputs(jax.random.key(1), args.pop("num"), args.pop("dim"), **args)


def test_group_constructors_and_orthogonality_check():
    """Group sizes are checked when the group is built (GL(-2) and batch=(2, 0) failed
    later inside JAX, or not at all); the orthogonality check is no longer vacuous in
    half precision (its tolerance, 31 in bfloat16 at n = 4, accepted 3 I and 0)."""
    for make, match in [(lambda: gj.GL(-2), "`n` must be a positive integer"),
                        (lambda: gj.Permutation(2.5), "`n` must be a positive integer"),
                        (lambda: gj.SignFlip(3, batch=(2, 0)), "`batch` must be a tuple of positive"),
                        (lambda: gj.GL(3, batch=[2]), "`batch` must be a tuple"),
                        (lambda: gj.Translation((2, -1)), "`n` must be a positive integer"),
                        (lambda: gj.nn.MLP([4, 6, 2], "relu", key=jax.random.key(0)), "`activation` must be a callable")]:
        with pytest.raises((ValueError, TypeError), match=match):
            make()
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        group = gj.Orthogonal(4)
        for bad in (3 * jnp.eye(4), jnp.zeros((4, 4)), 1.5 * jnp.eye(4)):
            assert bool(group.check(bad.astype(dtype))[1][0]), (dtype, bad[0, 0])
        q = group.sample(jax.random.key(0), None, jnp.float32).astype(dtype)
        assert not bool(group.check(q)[1][0]), dtype
    assert bool(gj.Orthogonal(512).check(1.03 * jnp.eye(512, dtype=jnp.float32))[1][0])


def test_coupling_leaves_key_paths_single_couplings_and_integer_leaves():
    """A coupling's leaf given as a key path (as tree_flatten_with_path yields) or an int
    failed with "'tuple' object has no attribute 'lstrip'", a single coupling not in a list
    with "'Produce' object is not iterable", and an integer leaf on a continuous site was
    accepted (act then asked for an integer positive diagonal)."""
    params = [(jnp.ones((4, 3)), jnp.ones(4)), (jnp.ones((2, 4)), jnp.ones(2))]
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    gauge = gj.Gauge({"h": gj.PositiveDiagonal(4)},
                     [gj.Produce(paths[0], 0, "h"), gj.Produce(paths[1], 0, "h"), gj.Consume(paths[2], 1, "h")], params)
    assert [c.leaf for c in gauge.couplings] == ["[0][0]", "[0][1]", "[1][0]"]
    with pytest.raises(TypeError, match=r"Produce\(leaf=0, .*a leaf path must be a string .* got 0 of type int"):
        gj.Gauge({"h": gj.PositiveDiagonal(4)}, [gj.Produce(0, 0, "h")], params)
    with pytest.raises(TypeError, match="got a single Produce .*wrap it in a list"):
        gj.Gauge({"h": gj.PositiveDiagonal(4)}, gj.Produce("[0][0]", 0, "h"), params)
    ints = [(jnp.ones((4, 3), jnp.int32), jnp.ones(4))]
    with pytest.raises(ValueError, match=r"leaf '\[0\]\[0\]' has dtype int32, but site 'h' carries the continuous"):
        gj.Gauge({"h": gj.PositiveDiagonal(4)}, [gj.Produce("[0][0]", 0, "h")], ints)
    assert gj.Gauge({"h": gj.Permutation(4)}, [gj.Produce("[0][0]", 0, "h")], ints).sites


def test_a_gauge_refuses_a_model_whose_activation_does_not_admit_it():
    """A gauge derived for a ReLU eqx.nn.MLP acted on a tanh one (same structure and
    shapes) with positive scales, which tanh does not admit: align, canonicalize and act
    changed the function silently. A gauge of permutations only still fits both."""
    import equinox as eqx

    relu = eqx.nn.MLP(3, 2, 6, 1, activation=jax.nn.relu, key=jax.random.key(0))
    tanh = eqx.nn.MLP(3, 2, 6, 1, activation=jnp.tanh, key=jax.random.key(1))
    gauge = gj.derive_gauge(relu)
    g = gauge.sample(jax.random.key(2))
    with pytest.raises(ValueError, match=r"leaf 'activation' is the activation 'tanh' \(odd\).*PositiveMonomial"):
        gauge.act(g, tanh)
    leaky = eqx.nn.MLP(3, 2, 6, 1, activation=jax.nn.leaky_relu, key=jax.random.key(1))
    gauge.act(g, leaky)  # the same family
    perms = gj.derive_gauge(relu, group=gj.Permutation)
    perms.act(perms.sample(jax.random.key(3)), tanh)
