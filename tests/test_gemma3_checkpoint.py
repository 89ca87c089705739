"""Gemma 3 from a Hugging Face checkpoint directory: a tiny synthetic one in the official layout."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from qlab.models import gemma3 as G

HF_CONFIG = {  # the official gemma-3-270m config.json's keys, with toy sizes
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "final_logit_softcapping": None,
    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "head_dim": 16,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 32, "intermediate_size": 64,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
    "max_position_embeddings": 128, "num_attention_heads": 4, "num_hidden_layers": 6, "num_key_value_heads": 2,
    "query_pre_attn_scalar": 16, "rms_norm_eps": 1e-06, "rope_local_base_freq": 500.0, "rope_scaling": None,
    "rope_theta": 20000.0, "sliding_window": 4, "tie_word_embeddings": True, "torch_dtype": "float32",
    "use_bidirectional_attention": False, "use_cache": True, "vocab_size": 320,
}


def _hf_weights(cfg, seed=0):
    """Random weights in HF naming and orientation ([out, in]); norms stored WITHOUT Gemma's +1."""
    rng = np.random.default_rng(seed)
    d, q, kv, f = cfg["hidden_size"], cfg["num_attention_heads"] * cfg["head_dim"], \
        cfg["num_key_value_heads"] * cfg["head_dim"], cfg["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "pre_feedforward_layernorm.weight": (d,), p + "post_feedforward_layernorm.weight": (d,),
                       p + "self_attn.q_norm.weight": (cfg["head_dim"],),
                       p + "self_attn.k_norm.weight": (cfg["head_dim"],),
                       p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    return {n: (rng.uniform(-0.5, 0.5, s) if len(s) == 1 else rng.normal(0, s[1] ** -0.5, s)).astype(np.float32)
            for n, s in shapes.items()}


def _write_checkpoint(path, config=HF_CONFIG, weights=None, tokenizer=True):
    path.mkdir(parents=True, exist_ok=True)
    weights = _hf_weights(config) if weights is None else weights
    (path / "config.json").write_text(json.dumps(config))
    save_file(weights, str(path / "model.safetensors"))
    if tokenizer:
        G.build_tokenizer(*G.tiny_vocab(config["vocab_size"])).save(str(path / "tokenizer.json"))
    return weights


def _direct_model(cfg, hf):
    """The qlab model built straight from HF weights, module by module (not through any name table)."""
    model = G.Gemma3(cfg, rngs=nnx.Rngs(0))
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))  # noqa: E731
    model.embed.embedding.value = f32(hf["model.embed_tokens.weight"])
    model.final_norm.weight.value = 1.0 + f32(hf["model.norm.weight"])
    for i, blk in enumerate(model.layers):
        w = lambda n: f32(hf[f"model.layers.{i}.{n}"])  # noqa: E731, B023
        blk.pre_attn_norm.weight.value = 1.0 + w("input_layernorm.weight")
        blk.post_attn_norm.weight.value = 1.0 + w("post_attention_layernorm.weight")
        blk.pre_ffn_norm.weight.value = 1.0 + w("pre_feedforward_layernorm.weight")
        blk.post_ffn_norm.weight.value = 1.0 + w("post_feedforward_layernorm.weight")
        blk.attn.q_norm.weight.value = 1.0 + w("self_attn.q_norm.weight")
        blk.attn.k_norm.weight.value = 1.0 + w("self_attn.k_norm.weight")
        for ours, theirs in [(blk.attn.q_proj, "self_attn.q_proj"), (blk.attn.k_proj, "self_attn.k_proj"),
                             (blk.attn.v_proj, "self_attn.v_proj"), (blk.attn.o_proj, "self_attn.o_proj"),
                             (blk.mlp.gate_proj, "mlp.gate_proj"), (blk.mlp.up_proj, "mlp.up_proj"),
                             (blk.mlp.down_proj, "mlp.down_proj")]:
            ours.kernel.value = w(theirs + ".weight").T  # nnx.Linear kernels are [in, out]
    return model


@nnx.jit
def _fwd(model, tokens):
    return model(tokens)


def test_config_fields_from_config_json():
    cfg = G.checkpoint_config(HF_CONFIG)
    assert cfg == G.Gemma3Config.tiny(sliding_window_pattern=3, rope_base_local=500.0, rope_base_global=20000.0,
                                      native_dtype="float32")  # config.json's torch_dtype
    assert G.checkpoint_config({**HF_CONFIG, "torch_dtype": "bfloat16"}).native_dtype == "bfloat16"
    # older configs carry sliding_window_pattern instead of layer_types
    legacy = {k: v for k, v in HF_CONFIG.items() if k != "layer_types"}
    assert G.checkpoint_config({**legacy, "sliding_window_pattern": 3}) == cfg
    # newer transformers nest the RoPE bases in rope_parameters
    new = {k: v for k, v in HF_CONFIG.items() if k not in ("rope_theta", "rope_local_base_freq")}
    new["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 20000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}
    assert G.checkpoint_config(new) == cfg


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_checkpoint_logits_equal_model_built_from_same_weights(tmp_path, dtype):
    hf = {k: v.astype(dtype) for k, v in _hf_weights(HF_CONFIG, seed=1).items()}
    _write_checkpoint(tmp_path / "ckpt", weights=hf)
    model, tok = G.load_gemma3(tmp_path / "ckpt")  # a directory: the checkpoint reader
    cfg = G.checkpoint_config(HF_CONFIG)
    assert model.config == cfg
    assert [b.is_local for b in model.layers] == [True, True, False] * 2
    ids = tok.encode("the cat at the inn").ids
    assert ids[0] == cfg.bos_id
    tokens = jnp.asarray([ids])
    want = np.asarray(_fwd(_direct_model(cfg, hf), tokens))
    np.testing.assert_array_equal(np.asarray(_fwd(model, tokens)), want)
    # the +1 matters: a loader that skipped it would give other logits
    assert np.abs(np.asarray(model.final_norm.weight[...]) - np.asarray(hf["model.norm.weight"], np.float32)).min() > 0.4


def test_sharded_checkpoint_and_tied_lm_head(tmp_path):
    hf = _hf_weights(HF_CONFIG, seed=2)
    d = tmp_path / "sharded"
    _write_checkpoint(d, weights=hf)
    (d / "model.safetensors").unlink()
    names = sorted(hf)
    half = {n: hf[n] for n in names[: len(names) // 2]}
    rest = {n: hf[n] for n in names[len(names) // 2:]}
    rest["lm_head.weight"] = hf["model.embed_tokens.weight"]  # some exports save the tied head
    save_file(half, str(d / "model-00001-of-00002.safetensors"))
    save_file(rest, str(d / "model-00002-of-00002.safetensors"))
    index = {n: "model-00001-of-00002.safetensors" for n in half}
    index.update({n: "model-00002-of-00002.safetensors" for n in rest})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    model, _ = G.load_gemma3_checkpoint(d)
    tokens = jnp.asarray([[2, 270, 266]])
    want = _direct_model(G.checkpoint_config(HF_CONFIG), hf)
    np.testing.assert_array_equal(np.asarray(_fwd(model, tokens)), np.asarray(_fwd(want, tokens)))


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file_is_named(tmp_path, missing):
    _write_checkpoint(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        G.load_gemma3(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    hf = _hf_weights(HF_CONFIG)
    del hf["model.layers.3.self_attn.k_norm.weight"]
    _write_checkpoint(tmp_path, weights=hf)
    with pytest.raises(KeyError, match=r"model\.layers\.3\.self_attn\.k_norm\.weight"):
        G.load_gemma3_checkpoint(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    hf = _hf_weights(HF_CONFIG)
    hf["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    _write_checkpoint(tmp_path, weights=hf)
    with pytest.raises(ValueError, match=r"q_proj\.bias"):
        G.load_gemma3_checkpoint(tmp_path)


@pytest.mark.parametrize("change, match", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "model_type 'llama'"),
    ({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}, "text-only"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "rope_scaling"),
    ({"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ({"layer_types": ["full_attention", "sliding_attention"] * 3}, "unsupported sliding window layer pattern"),
    ({"layer_types": ["sliding_attention"] * 5}, "layer_types"),
])
def test_wrong_architecture_or_setting_is_named(tmp_path, change, match):
    _write_checkpoint(tmp_path, config={**HF_CONFIG, **change})
    with pytest.raises(ValueError, match=match):
        G.load_gemma3(tmp_path)


def test_tokenizer_of_a_checkpoint_is_its_tokenizer_json(tmp_path):
    _write_checkpoint(tmp_path)
    want = G.build_tokenizer(*G.tiny_vocab(320))
    text = "The theater at the inn"
    assert G.gemma3_tokenizer(tmp_path).encode(text).ids == want.encode(text).ids
