"""MATH.md S14-S17 on gaugejax.nn.Transformer: the derived gauge, its group laws, the
refusals, weight processing as gauge fixing, and the invariant observables."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import rel

import gaugejax as gj
from gaugejax.nn import Transformer


VOCAB, D, LAYERS, HEADS, MLP, CTX = 11, 8, 1, 2, 6, 6
TOL = {jnp.float64: 1e-10, jnp.float32: 1e-5}
EXACT = {jnp.float64: 1e-12, jnp.float32: 1e-5}


def _model(key, dtype=jnp.float64, n_layers=LAYERS, **cfg):
    return Transformer(VOCAB, D, n_layers, HEADS, MLP, CTX, key=key, dtype=dtype, **cfg)


def _tokens(key, batch=3, n=5):
    return jax.random.randint(key, (batch, n), 0, VOCAB)


def _fn(m, tokens):
    return jax.vmap(m)(tokens)


# (id, configuration, the sites the derived gauge must have in layer 0 and globally)
# Each sweep compiles the sampler (a matrix exponential per GL site): ~15 s on 2 shared
# cores. The richest configuration runs by default, the others under `-m slow`.
CONFIGS = [
    pytest.param("pre-layernorm-gain-gelu-causal-tied", {}, {"heads0", "qk0", "ov0", "key_shift0", "mlp0", "stream"},
                 marks=pytest.mark.slow),
    pytest.param("pre-rms-scalefree-relu-untied-bidirectional",
                 dict(norm="rms", norm_gain=False, activation="relu", unembedding="untied", causal=False),
                 {"heads0", "qk0", "ov0", "key_shift0", "mlp0", "stream"}),
    pytest.param("post-rms-scalefree-gelu-tied", dict(norm="rms", norm_gain=False, norm_position="post"),
                 {"heads0", "qk0", "ov0", "key_shift0", "mlp0", "stream"}, marks=pytest.mark.slow),
    pytest.param("rotary-rms-scalefree", dict(norm="rms", norm_gain=False, rotary=True),
                 {"heads0", "ov0", "mlp0", "stream"}, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,cfg,sites", CONFIGS, ids=[p.values[0] for p in CONFIGS])
def test_derived_gauge_is_exactly_what_the_configuration_admits(name, cfg, sites, getkey):
    model = _model(getkey(), **cfg)
    gauge = gj.derive_gauge(model)
    assert set(gauge.site_groups) == sites
    assert gauge.orbit_dim == gj.transformer_orbit_dim(model)
    tokens = _tokens(getkey())
    rep = gj.check_invariance(_fn, gauge, model, tokens, key=getkey(), num_samples=12, chunk_size=1)
    assert rep.max_rel_error <= TOL[jnp.float64], rep


@pytest.mark.slow
def test_float32_full_gauge_with_rotation(getkey):
    model = _model(getkey(), jnp.float32, norm="rms", norm_gain=False, activation="relu", unembedding="untied")
    gauge = gj.derive_gauge(model)
    rep = gj.check_invariance(_fn, gauge, model, _tokens(getkey()), key=getkey(), num_samples=12, chunk_size=1)
    assert rep.max_rel_error <= TOL[jnp.float32], rep


@pytest.mark.slow
def test_float32_rotation_and_heads(getkey):
    # the discrete and Haar parts need no matrix exponential: cheap enough for the default run
    model = _model(getkey(), jnp.float32, norm="rms", norm_gain=False, unembedding="untied")
    gauge = gj.derive_gauge(model)
    rep = gj.check_invariance(_fn, gauge, model, _tokens(getkey()), key=getkey(), num_samples=8, chunk_size=1,
                              scale=None, sites=["stream", "heads0", "mlp0"])
    assert rep.max_rel_error <= 1e-6, rep


def cheap_sample(gauge, key, dtype=jnp.float64, sites=None):
    """A group element without matrix exponentials (their compilation dominates the test
    time): GL sites get I + X/(3 sqrt n), orthogonal ones Haar, the rest `group.sample`."""
    out = {}
    for k, (name, group) in zip(jax.random.split(key, len(gauge.sites)), gauge.sites):
        if sites is not None and name not in sites:
            out[name] = group.identity(dtype)
        elif isinstance(group, gj.GL):
            x = jax.random.normal(k, (*group.batch, group.n, group.n), dtype)
            eye = jnp.broadcast_to(jnp.eye(group.n, dtype=dtype), x.shape)
            out[name] = eye + x / (3 * group.n**0.5)
        else:
            out[name] = group.sample(k, None, dtype)
    return out


def _rotation_only_error(model, gauge, key):
    return gj.check_invariance(
        _fn, gauge, model, _tokens(key), key=key, num_samples=4, chunk_size=1, scale=None, sites=["stream"]
    )


@pytest.mark.parametrize("cfg", [dict(norm="layer", norm_gain=False),
                                 pytest.param(dict(norm="rms", norm_gain=True), marks=pytest.mark.slow)],
                         ids=["layernorm", "rms-gain"])
def test_s17_negative_rotation_through_layernorm_or_gain_breaks(cfg, getkey):
    if True:
        model = _model(getkey(), **cfg)
        with pytest.raises(ValueError, match="LayerNorm|gain"):
            gj.derive_gauge(model, rotation=True)
        bad = gj.derive_gauge(model, rotation=True, unsafe=True)
        rep = _rotation_only_error(model, bad, getkey())
        assert not rep.passed and rep.median_rel_error > 1e-3, rep


def test_rotation_refusals_give_advice_that_works(getkey):
    """The refusal names a processing step only where one exists: an embed_norm gain and a
    post-norm LayerNorm have none (the advice to fold gains or process the weights led back
    to the same error); a pre-norm LayerNorm's advice does lead to a rotation."""
    for cfg, culprit in [(dict(norm="rms", norm_gain=True, embed_norm=True), "embed_norm has a gain"),
                         (dict(norm="layer", norm_position="post"), "blocks.0..norm1 is a LayerNorm")]:
        model = _model(getkey(), unembedding="untied", **cfg)
        for m in (model, gj.process_weights(model) if cfg.get("norm_position") != "post" else model):
            with pytest.raises(ValueError, match=f"{culprit}.*No .*processing.*no residual rotation"):
                gj.derive_gauge(m, rotation=True)
    model = _model(getkey(), norm="layer", unembedding="untied")
    with pytest.raises(ValueError, match="process_weights"):
        gj.derive_gauge(model, rotation=True)
    assert "stream" in gj.derive_gauge(gj.process_weights(model), rotation=True).site_groups


def test_s14_negative_rotary_breaks_qk(getkey):
    model = _model(getkey(), rotary=True)
    with pytest.raises(ValueError, match="rotary"):
        gj.derive_gauge(model, qk=True)
    bad = gj.derive_gauge(model, qk=True, unsafe=True)
    rep = gj.check_invariance(_fn, bad, model, _tokens(getkey()), key=getkey(), num_samples=4, chunk_size=1, sites=["qk0"])
    assert not rep.passed and rep.median_rel_error > 1e-3, rep


def test_gelu_mlp_refuses_rescaling(getkey):
    model = _model(getkey())
    with pytest.raises(ValueError, match="does not admit"):
        gj.derive_gauge(model, mlp_group=gj.PositiveDiagonal)
    bad = gj.derive_gauge(model, mlp_group=gj.PositiveDiagonal, unsafe=True)
    rep = gj.check_invariance(_fn, bad, model, _tokens(getkey()), key=getkey(), num_samples=4, chunk_size=1, sites=["mlp0"])
    assert not rep.passed and rep.median_rel_error > 1e-3, rep


def test_refusals_and_bad_input(getkey):
    model = _model(getkey(), norm="rms", norm_gain=False, unembedding="none", norm_position="post")
    with pytest.raises(ValueError, match="unembedding"):
        gj.derive_gauge(model, rotation=True)
    with pytest.raises(ValueError, match="does not divide"):
        Transformer(VOCAB, 10, 1, 3, MLP, CTX, key=getkey())
    with pytest.raises(ValueError, match="odd"):
        Transformer(VOCAB, 9, 1, 3, MLP, CTX, rotary=True, key=getkey())
    with pytest.raises(ValueError, match="activation"):
        Transformer(VOCAB, D, 1, 2, MLP, CTX, activation="swish", key=getkey())

    class Sub(Transformer):
        pass

    with pytest.raises(TypeError, match="subclass"):
        gj.transformer_gauge(Sub(VOCAB, D, 1, 2, MLP, CTX, key=getkey()))
    with pytest.raises(TypeError, match="subclass Sub"):
        gj.process_weights(Sub(VOCAB, D, 1, 2, MLP, CTX, key=getkey()))
    tokens = [1, 2, 3]  # a list of ids is an array-like like any other
    assert bool(jnp.all(model(tokens) == model(jnp.asarray(tokens))))
    with pytest.raises(ValueError, match="post-norm"):
        gj.fold_norm_gains(_model(getkey(), norm_position="post"))
    with pytest.raises(ValueError, match="RMSNorm"):
        gj.center_writing_weights(_model(getkey(), norm="rms", norm_gain=False))
    with pytest.raises(ValueError, match="not centered|non-centered"):
        gj.layernorm_to_rmsnorm(gj.fold_norm_gains(_model(getkey())))
    with pytest.raises(ValueError, match="untie"):
        gj.fold_norm_gains(_model(getkey()), untie=False)
    with pytest.raises(ValueError, match="tied"):
        gj.center_writing_weights(_model(getkey()))
    for bad in (dict(d_k=0), dict(d_v=-2), dict(d_k=2.5), dict(eps=-1.0)):
        with pytest.raises(ValueError, match=f"`{next(iter(bad))}`"):
            _model(getkey(), **bad)
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        gj.head_order(_model(getkey()), 3)
    with pytest.raises(TypeError, match="`mlp_group`: expected a group class"):
        gj.transformer_gauge(_model(getkey()), mlp_group=gj.Permutation(MLP))
    with pytest.raises(TypeError, match="expects a gaugejax.nn.Transformer"):
        gj.transformer_orbit_dim(gj.nn.MLP((2, 3, 1), jax.nn.relu, key=getkey()))


def test_left_padding_under_a_causal_mask(getkey):
    """A padding query before the first real token has no key to attend to: it attends to
    nothing (its softmax over -inf alone was NaN, and the next layer spread it to every
    position). The real tokens' logits equal those of the unpadded sequence."""
    tokens = jnp.asarray([3, 1, 4, 1, 5])
    padded = jnp.concatenate([jnp.zeros(2, tokens.dtype), tokens])
    mask = jnp.asarray([False, False, True, True, True, True, True])
    # positions shift with the padding: compare with a model without position embeddings
    flat = Transformer(VOCAB, D, 2, HEADS, MLP, 8, positional=False, key=getkey(), dtype=jnp.float64)
    out = flat(padded, mask)
    assert bool(jnp.all(jnp.isfinite(out)))
    assert rel(out[2:], flat(tokens)) <= 1e-12
    g = eqx.filter_grad(lambda m: jnp.sum(m(padded, mask)[2:]))(flat)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
    # weight processing keeps the real tokens' logits (a padding query's output may move)
    _, report = gj.process_weights(flat, padded[None], mask[None])
    assert all(err <= 1e-10 for _, err in report.steps), report
    with pytest.raises(ValueError, match="without `tokens`"):
        gj.process_weights(flat, mask=mask[None])
    with pytest.raises(ValueError, match=r"\(batch, n\)"):
        gj.process_weights(flat, padded)
    with pytest.raises(ValueError, match="outside `jit`"):
        eqx.filter_jit(gj.process_weights)(flat, padded[None], mask[None])


def test_bad_tokens_and_masks(getkey):
    model = _model(getkey())
    for bad in (jnp.asarray([1, VOCAB, 2]), jnp.asarray([1, -1, 2])):
        with pytest.raises(Exception, match="vocab_size"):
            model(bad)
    with pytest.raises(ValueError, match="`mask` must be a boolean array"):
        model(jnp.asarray([1, 2, 3]), jnp.asarray([True, True]))
    with pytest.raises(ValueError, match="`mask` must be a boolean array"):
        model(jnp.asarray([1, 2, 3]), jnp.ones(3))


def test_bfloat16_model_is_bfloat16(getkey):
    """A norm's gain `1 + draw` was promoted to float32 on the host; rotary angles in
    bfloat16 made positions 256 and 257 collide."""
    key = getkey()
    m = Transformer(VOCAB, D, 1, HEADS, MLP, CTX, key=key, dtype=jnp.bfloat16)
    traced = eqx.filter_jit(lambda k: Transformer(VOCAB, D, 1, HEADS, MLP, CTX, key=k, dtype=jnp.bfloat16))(key)
    for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(traced)):
        assert a.dtype == jnp.bfloat16
        assert bool(jnp.all(a == b))
    assert m(jnp.asarray([1, 2, 3])).dtype == jnp.bfloat16
    x = jnp.ones((1, 300, 4), jnp.bfloat16)
    r16 = gj.nn._transformer.rotary(x).astype(jnp.float32)
    r32 = gj.nn._transformer.rotary(x.astype(jnp.float32))
    assert float(jnp.max(jnp.abs(r16 - r32))) <= 1e-2
    assert not bool(jnp.all(r16[0, 256] == r16[0, 257]))


# ----------------------------------------------------------------------------------------
# grouped-query attention
# ----------------------------------------------------------------------------------------
def _as_multi_head(m):
    """The same model in the plain layout: each key/value head repeated for its query heads."""
    blocks = []
    for b in m.blocks:
        a = b.attn
        G, r = a.W_Q.shape[:2]
        rep = lambda x: jnp.repeat(x, r, axis=0)  # noqa: E731
        a2 = type(a)(W_Q=a.W_Q.reshape(G * r, *a.W_Q.shape[2:]), b_Q=a.b_Q.reshape(G * r, -1),
                     W_K=rep(a.W_K), b_K=rep(a.b_K), W_V=rep(a.W_V), b_V=rep(a.b_V),
                     W_O=a.W_O.reshape(a.W_O.shape[0], G * r, -1), b_O=a.b_O)
        blocks.append(eqx.tree_at(lambda x: x.attn, b, a2))
    out = eqx.tree_at(lambda x: x.blocks, m, tuple(blocks))
    object.__setattr__(out, "n_kv_heads", None)
    return out


def test_grouped_query_attention_gauge(getkey):
    model = Transformer(VOCAB, D, 1, 4, MLP, CTX, n_kv_heads=2, norm="rms", norm_gain=False,
                        unembedding="untied", key=getkey(), dtype=jnp.float64)
    tokens = _tokens(getkey())
    fwd = eqx.filter_jit(_fn)  # one compilation per structure instead of op-by-op dispatch
    assert model.blocks[0].attn.W_Q.shape == (2, 2, 2, D) and model.blocks[0].attn.W_K.shape == (2, 2, D)
    assert rel(fwd(model, tokens), fwd(_as_multi_head(model), tokens)) <= 1e-12
    gauge = gj.derive_gauge(model)
    assert set(gauge.site_groups) == {"heads0", "qheads0", "qk0", "ov0", "key_shift0", "mlp0", "stream"}
    assert gauge.orbit_dim == gj.transformer_orbit_dim(model) == 2 * (4 + 4) + 2 * 2 + 8 * 7 // 2  # GELU MLP: no continuous part
    assert gauge.site_groups["qheads0"] == gj.Permutation(2, (2,))  # S_r^G: one per group
    g = cheap_sample(gauge, getkey())
    # swap the groups, and the query heads of one group only
    g["heads0"], g["qheads0"] = jnp.asarray([1, 0], jnp.int32), jnp.asarray([[1, 0], [0, 1]], jnp.int32)
    act = eqx.filter_jit(gauge.act)
    moved = act(g, model)
    assert rel(moved, model) > 1e-2
    assert rel(fwd(moved, tokens), fwd(model, tokens)) <= 1e-10
    # the group law of the semidirect product S_r^G x| S_G: heads0 re-indexes qheads0's groups
    h = cheap_sample(gauge, getkey())
    h["heads0"], h["qheads0"] = jnp.asarray([0, 1], jnp.int32), jnp.asarray([[0, 1], [1, 0]], jnp.int32)
    assert rel(act(gauge.compose(g, h), model), act(g, act(h, model))) <= 1e-12
    assert rel(act(gauge.inverse(g), moved), model) <= 1e-12
    # negative control: moving query heads to another key/value group (without their keys
    # and values) is not a symmetry
    bad = gj.Gauge({"x": gj.Permutation(2)}, [gj.Produce("blocks[0].attn.W_Q", 0, "x"),
                                              gj.Produce("blocks[0].attn.b_Q", 0, "x"),
                                              gj.Produce("blocks[0].attn.W_O", 1, "x")], model)
    moved_bad = bad.act({"x": jnp.asarray([1, 0], g["heads0"].dtype)}, model)
    assert rel(fwd(moved_bad, tokens), fwd(model, tokens)) > 1e-3
    with pytest.raises(ValueError, match="n_kv_heads"):
        Transformer(VOCAB, D, 1, 4, MLP, CTX, n_kv_heads=3, key=getkey())
    with pytest.raises(ValueError, match="grouped-query"):
        gj.process_weights(model)
    with pytest.raises(ValueError, match="grouped-query"):
        gj.qk_circuit(model, 0)


@pytest.mark.slow
def test_grouped_query_attention_sweep(getkey):
    model = Transformer(VOCAB, D, 1, 4, MLP, CTX, n_kv_heads=2, norm="rms", norm_gain=False,
                        activation="relu", unembedding="untied", key=getkey(), dtype=jnp.float64)
    rep = gj.check_invariance(_fn, gj.derive_gauge(model), model, _tokens(getkey()), key=getkey(),
                              num_samples=12, chunk_size=1)
    assert rep.max_rel_error <= TOL[jnp.float64], rep


# ----------------------------------------------------------------------------------------
# group laws, and the semidirect product the engine derives
# ----------------------------------------------------------------------------------------
@pytest.mark.slow  # ~20-60 s on 2 shared cores (compile-bound)
def test_group_laws_and_semidirect_product(getkey):
    model = _model(getkey(), norm="rms", norm_gain=False, activation="relu", unembedding="untied")
    gauge = gj.derive_gauge(model)

    @eqx.filter_jit
    def laws(g, h, m):
        lhs = gauge.act(gauge.compose(g, h), m)
        rhs = gauge.act(g, gauge.act(h, m))
        back = gauge.act(gauge.inverse(g), gauge.act(g, m))
        naive = {k: gauge.site_groups[k].compose(g[k], h[k]) if k != "key_shift0" else g[k] + h[k] for k in g}
        return lhs, rhs, back, gauge.act(naive, m), gauge.act(gauge.identity(jnp.float64), m)

    for _ in range(1):
        g, h = cheap_sample(gauge, getkey()), cheap_sample(gauge, getkey())
        lhs, rhs, back, naive, ident = laws(g, h, model)
        assert rel(lhs, rhs) <= 1e-12
        assert rel(back, model) <= 1e-12
        assert rel(ident, model) == 0.0
        # composing site by site ignores that heads permute the per-head GL blocks (and
        # the key shift's affine part): not the group law
        assert rel(naive, rhs) > 1e-3


# ----------------------------------------------------------------------------------------
# weight processing
# ----------------------------------------------------------------------------------------
def test_layernorm_to_rmsnorm_checks_each_writer_vector(getkey):
    # one large centered embedding row hid an uncentered small one (a leaf-wide tolerance)
    m = gj.center_writing_weights(gj.fold_norm_gains(_model(getkey(), dtype=jnp.float32)))
    E = m.token_embedding.at[1].multiply(1e5).at[2].add(0.5)
    with pytest.raises(ValueError, match="'token_embedding' writes a non-centered stream"):
        gj.layernorm_to_rmsnorm(eqx.tree_at(lambda t: t.token_embedding, m, E))
    gj.layernorm_to_rmsnorm(eqx.tree_at(lambda t: t.token_embedding, m, m.token_embedding.at[1].multiply(1e5)))


def test_centering_passes_its_own_check_on_a_nearly_constant_writer(getkey):
    """A writer vector nearly constant along the stream (3 + 1e-5 noise): one centering
    pass left a rounding residue of its mean (eps x 3) large next to the centered vector,
    and process_weights refused the model it had just centered."""
    m = _model(getkey(), dtype=jnp.float32)
    b = 3.0 + 1e-5 * jax.random.normal(getkey(), (D,), jnp.float32)
    m = eqx.tree_at(lambda t: t.blocks[0].attn.b_O, m, b)
    tokens = _tokens(getkey())
    new, report = gj.process_weights(m, tokens)
    assert rel(_fn(new, tokens), _fn(m, tokens)) <= 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_processing_in_half_precision(dtype, getkey):
    """QR/SVD have no half-precision LAPACK path (eager or under jit): the balanced
    factors are computed in float32 and cast back; each step costs a few epsilons."""
    model = _model(getkey(), dtype=dtype)
    new, report = gj.process_weights(model, _tokens(getkey()))
    assert {x.dtype for x in jax.tree.leaves(new)} == {jnp.dtype(dtype)}
    assert all(err <= 8 * report.eps for _, err in report.steps), report
    jitted = jax.jit(gj.balance_attention)(gj.fold_value_biases(model))
    assert {x.dtype for x in jax.tree.leaves(jitted)} == {jnp.dtype(dtype)}


_F32_SLOW = pytest.mark.slow

PROCESSING = [
    pytest.param({}, jnp.float64, id="pre-ln-tied-f64"),
    pytest.param({}, jnp.float32, id="pre-ln-tied-f32", marks=_F32_SLOW),
    pytest.param(dict(unembedding="untied", activation="relu"), jnp.float64, id="pre-ln-untied-f64"),
    pytest.param(dict(norm="rms"), jnp.float64, id="pre-rms-gain-f64"),
    pytest.param(dict(norm_position="post", embed_norm=True, unembedding="none", causal=False), jnp.float64,
                 id="post-ln-bert-f64"),
    pytest.param(dict(norm_position="post", embed_norm=True, unembedding="none", causal=False), jnp.float32,
                 id="post-ln-bert-f32", marks=_F32_SLOW),
    pytest.param(dict(rotary=True), jnp.float64, id="rotary-f64"),
    pytest.param(dict(rotary=True), jnp.float32, id="rotary-f32", marks=_F32_SLOW),
]


@pytest.mark.parametrize("cfg,dtype", PROCESSING)
def test_processing_preserves_the_function(cfg, dtype, getkey):
    model = _model(getkey(), dtype, **cfg)
    tokens = _tokens(getkey())
    new, report = gj.process_weights(model, tokens)
    names = [s for s, _ in report.steps]
    assert names[-2:] == ["fold_value_biases", "balance_attention"]
    if cfg.get("norm_position") != "post":
        assert names[0] == "fold_norm_gains"
    # error per dtype, in units of eps: rounding only
    assert report.max_rel_error <= 100 * report.eps, str(report)
    # negative control: the processed weights did change
    assert rel(new.blocks[0].attn.W_Q, model.blocks[0].attn.W_Q) > 1e-3


def test_processing_makes_layernorm_rotations_exact(getkey):
    model = _model(getkey(), unembedding="untied")
    # LayerNorm with gains: only the stream's permutations (gains move with them)
    assert isinstance(gj.derive_gauge(model).site_groups["stream"], gj.Permutation)
    new = gj.process_weights(model)
    assert all(n.kind == "rms" and n.weight is None and n.bias is None for _, n in new.norms())
    gauge = gj.derive_gauge(new, rotation=True)
    rep = gj.check_invariance(_fn, gauge, new, _tokens(getkey()), key=getkey(), num_samples=4, chunk_size=1,
                              scale=None, sites=["stream"])
    assert rep.max_rel_error <= 1e-12, rep


def test_processing_under_jit(getkey):
    """A pre-LayerNorm model processes under a user's jit as it does eagerly (the
    centring check read values on the host and failed on tracers); the check itself
    becomes a run-time error that names the leaf, raised whichever part of the result
    the program uses."""
    import equinox as eqx

    model = _model(getkey(), unembedding="untied")
    eager = gj.process_weights(model)
    jitted = eqx.filter_jit(gj.process_weights)(model)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-12
    with pytest.raises(eqx.EquinoxRuntimeError, match="leaf 'token_embedding' writes a non-centered"):
        eqx.filter_jit(gj.layernorm_to_rmsnorm)(gj.fold_norm_gains(model))
    # every part of the result carries the check, not only the leaf that failed it
    with pytest.raises(eqx.EquinoxRuntimeError, match="leaf 'token_embedding' writes a non-centered"):
        eqx.filter_jit(lambda m: gj.layernorm_to_rmsnorm(m).blocks)(gj.fold_norm_gains(model))


def test_tied_embeddings_stay_consistent(getkey):
    model = _model(getkey(), norm_gain=False)  # LayerNorm, no gain: the final output is mean-free
    tokens = _tokens(getkey())
    new, report = gj.process_weights(model, tokens)
    assert new.unembedding == "tied" and new.unembed is None
    assert report.max_rel_error <= 1e-12, str(report)
    # the one embedding leaf is both written and read; a Haar rotation keeps them tied
    gauge = gj.derive_gauge(new)
    assert "stream" in gauge.site_groups
    rep = gj.check_invariance(_fn, gauge, new, tokens, key=getkey(), num_samples=4, chunk_size=1, scale=None, sites=["stream"])
    assert rep.max_rel_error <= 1e-12, rep
    # with a final gain, processing unties (function preserved) instead of breaking the tie
    gained = _model(getkey())
    untied, rep2 = gj.process_weights(gained, tokens)
    assert gained.unembedding == "tied" and untied.unembedding == "untied"
    assert rep2.max_rel_error <= 1e-12


def test_balance_attention_is_canonical_and_balanced(getkey):
    model = _model(getkey())
    gauge = gj.derive_gauge(model, heads=False)
    g = cheap_sample(gauge, getkey(), sites=["qk0", "ov0", "key_shift0"])
    moved = gauge.act(g, model)
    assert rel(moved.blocks[0].attn.W_Q, model.blocks[0].attn.W_Q) > 1e-2
    b1, b2 = gj.balance_attention(model), gj.balance_attention(moved)
    assert rel(b1, b2) <= 1e-10
    a = b1.blocks[0].attn
    qq = jnp.einsum("hkd,hjd->hkj", a.W_Q, a.W_Q) + jnp.einsum("hk,hj->hkj", a.b_Q, a.b_Q)
    kk = jnp.einsum("hkd,hjd->hkj", a.W_K, a.W_K)
    assert rel(qq, kk) <= 1e-12
    vv = jnp.einsum("hvd,hwd->hvw", a.W_V, a.W_V) + jnp.einsum("hv,hw->hvw", a.b_V, a.b_V)
    oo = jnp.einsum("dhv,dhw->hvw", a.W_O, a.W_O)
    assert rel(vv, oo) <= 1e-12
    assert float(jnp.max(jnp.abs(a.b_K))) == 0.0
    # negative control: the unprocessed model is not balanced
    a0 = model.blocks[0].attn
    assert rel(jnp.einsum("hkd,hjd->hkj", a0.W_Q, a0.W_Q), jnp.einsum("hkd,hjd->hkj", a0.W_K, a0.W_K)) > 1e-2
    # minimum norm on the orbit: any other point of it is heavier
    sq = lambda m: sum(float(jnp.sum(x * x)) for x in (m.blocks[0].attn.W_Q, m.blocks[0].attn.W_K))
    assert sq(b1) < sq(gauge.act(cheap_sample(gauge, getkey(), sites=["qk0"]), b1))


def test_canonical_form_fixes_head_permutations_too(getkey):
    """balance_attention sorts heads (head_order): canon(h . g . params) == canon(params)
    for a head permutation h and per-head GL / key shifts g; the function is preserved."""
    model = Transformer(VOCAB, D, 1, 4, MLP, CTX, key=getkey(), dtype=jnp.float64)
    # the attention sites only (the stream's permutations are not what this form fixes)
    gauge = gj.derive_gauge(model, mlp=False, stream_permutation=False)
    g = cheap_sample(gauge, getkey())
    g["heads0"] = jnp.asarray([2, 0, 3, 1], g["heads0"].dtype)
    moved = eqx.filter_jit(gauge.act)(g, model)
    c0, c1 = gj.balance_attention(model), gj.balance_attention(moved)
    assert rel(c1, c0) <= 1e-10
    tokens = _tokens(getkey())
    fwd = eqx.filter_jit(_fn)
    assert rel(fwd(c1, tokens), fwd(model, tokens)) <= 1e-12
    # the documented order: descending |W_QK|_F
    qk = gj.qk_circuit(c0, 0, bias=True).frobenius_norm()
    assert bool(jnp.all(qk[:-1] >= qk[1:])), qk
    assert [int(i) for i in gj.head_order(c0, 0)] == [0, 1, 2, 3]
    # negative control: without sorting, the permuted model's balanced form differs
    u0, u1 = gj.balance_attention(model, sort_heads=False), gj.balance_attention(moved, sort_heads=False)
    assert rel(u1, u0) > 1e-3


# ----------------------------------------------------------------------------------------
# observables and orbit dimensions
# ----------------------------------------------------------------------------------------
def test_factored_svd_is_thin(getkey):
    # the inner rank exceeds both sides: full U and Vh did not fit S
    fm = gj.FactoredMatrix(jax.random.normal(getkey(), (4, 6), jnp.float64), jax.random.normal(getkey(), (6, 5), jnp.float64))
    u, s, vh = fm.svd()
    assert (u.shape, s.shape, vh.shape) == ((4, 4), (4,), (4, 5))
    assert rel((u * s[None, :]) @ vh, fm.dense()) <= 1e-12


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_factored_spectra_in_half_precision(dtype, getkey):
    """LAPACK has no half-precision routines (an opaque NotImplementedError): singular
    values and eigenvalues are computed in float32 from the half-precision factors."""
    left, right = jax.random.normal(getkey(), (2, 5, 3)), jax.random.normal(getkey(), (2, 3, 5))
    half = gj.FactoredMatrix(left.astype(dtype), right.astype(dtype))
    exact = gj.FactoredMatrix(half.left.astype(jnp.float32), half.right.astype(jnp.float32))
    u, s, vh = half.svd()
    assert u.dtype == s.dtype == vh.dtype == dtype
    assert rel(s.astype(jnp.float32), exact.singular_values()) <= 1e-2
    assert half.eigenvalues().dtype == jnp.complex64
    assert rel(half.eigenvalues(), exact.eigenvalues()) <= 1e-5
    with pytest.raises(TypeError, match="`layer` must be an integer, got 0.5"):
        gj.qk_circuit(_model(getkey()), 0.5)


@pytest.mark.slow  # ~25-75 s on 2 shared cores; the invariance of W_QK is also checked by the canonical-form tests
def test_factored_observables_are_invariant(getkey):
    model = _model(getkey(), d_k=3, d_v=2)
    # the per-head GLs (observables in the stream basis move with stream permutations)
    gauge = gj.derive_gauge(model, heads=False, key_shift=False, stream_permutation=False)
    moved = gauge.act(cheap_sample(gauge, getkey()), model)
    for layer in (0,):
        for circuit in (gj.qk_circuit(model, layer), gj.ov_circuit(model, layer)):
            dense_s = jnp.linalg.svd(circuit.dense(), compute_uv=False)[..., : circuit.left.shape[-1]]
            assert rel(circuit.singular_values(), dense_s) <= 1e-12
            u, s, vh = circuit.svd()
            assert rel(jnp.einsum("hik,hk,hkj->hij", u, s, vh), circuit.dense()) <= 1e-12
            assert rel(circuit.frobenius_norm(), jnp.linalg.norm(circuit.dense(), axis=(-2, -1))) <= 1e-12
        for f in (lambda m: gj.qk_circuit(m, layer).singular_values(),
                  lambda m: gj.qk_circuit(m, layer, bias=True).singular_values(),
                  lambda m: gj.ov_circuit(m, layer).singular_values(),
                  lambda m: jnp.abs(gj.ov_circuit(m, layer).eigenvalues()),
                  lambda m: gj.qk_circuit(m, layer).dense()):
            assert rel(f(moved), f(model)) <= 1e-10
    # negative control: the factors themselves are not invariant
    assert rel(gj.qk_circuit(moved, 0).left, gj.qk_circuit(model, 0).left) > 1e-2
    with pytest.raises(ValueError, match="chain"):
        gj.FactoredMatrix(jnp.zeros((3, 2)), jnp.zeros((3, 4)))


@pytest.mark.parametrize("cfg", [dict(activation="relu", norm="rms", norm_gain=False, unembedding="untied"),
                                 pytest.param(dict(d_k=3, d_v=2), marks=pytest.mark.slow),
                                 pytest.param(dict(rotary=True, norm="rms", norm_gain=False), marks=pytest.mark.slow)],
                         ids=["relu-rotation", "gelu-layernorm", "rotary"])
def test_orbit_dimension_formula_vs_numerical_rank(cfg, getkey):
    model = _model(getkey(), **cfg)
    gauge = gj.derive_gauge(model)
    formula = gj.transformer_orbit_dim(model)
    assert gauge.orbit_dim == formula
    assert gauge.orbit_rank(model) == formula


@pytest.mark.parametrize("cfg, switches", [
    (dict(d_k=6, d_v=2), {}), (dict(d_k=2, d_v=7), {}), (dict(d_k=6, d_v=2), dict(key_shift=False)),
    (dict(n_heads=4, n_kv_heads=2, d_k=12, d_v=9), {}),
], ids=["wide-qk", "wide-ov", "wide-qk-no-shift", "wide-grouped"])
def test_orbit_dimension_of_heads_wider_than_the_stream(cfg, switches, getkey):
    """Heads wider than the stream + 1 have a continuous stabiliser: the formula subtracts
    it (it counted the group's dimension, 4-40 above the measured rank here) and meets
    the numerical rank; the engine's orbit_dim stays the group's dimension."""
    cfg = {"n_heads": 2, **cfg}
    model = Transformer(11, 4, 1, cfg.pop("n_heads"), 6, 6, key=getkey(), dtype=jnp.float64, **cfg)
    gauge = gj.derive_gauge(model, **switches)
    formula = gj.transformer_orbit_dim(model, **switches)
    assert gauge.orbit_rank(model) == formula < gauge.orbit_dim


def test_bert_base_attention_orbit_dimension():
    assert gj.attention_orbit_dim(12, 12, 64, 64) == 1_179_648
    bert = eqx.filter_eval_shape(
        Transformer, 30522, 768, 12, 12, 3072, 512, norm_position="post", embed_norm=True,
        causal=False, unembedding="none", key=jax.random.key(0),
    )
    gauge = gj.derive_gauge(bert, key_shift=False, mlp=False)
    assert gauge.orbit_dim == 1_179_648 == gj.transformer_orbit_dim(bert, key_shift=False, mlp=False)
    assert gj.derive_gauge(bert).orbit_dim == 1_179_648 + 12 * 12 * 64  # + key shifts; GELU MLP: none


@pytest.mark.slow
def test_report_rows(getkey):
    """The rows gaugejax/_report_transformer.py adds to `gaugejax report`."""
    from gaugejax._report_transformer import (
        run_transformer_case,
        transformer_cases,
        transformer_rows_ok,
    )

    rows = [run_transformer_case(c, num_samples=16) for c in transformer_cases()]
    assert transformer_rows_ok(rows), rows
    for r in rows:
        assert r["orbit_dim"] == r["orbit_dim_engine"]
        assert {s["part"] for s in r["sweeps"]} >= {"heads", "qk", "ov", "key_shift", "mlp", "all"}
        assert all(c["broke_as_predicted"] for c in r["controls"]) and r["controls"]
    # a row whose control did not break is not ok
    bad = [{**rows[0], "controls": [{**rows[0]["controls"][0], "broke_as_predicted": False}]}]
    assert not transformer_rows_ok(bad)
