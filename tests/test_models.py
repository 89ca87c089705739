"""Tests for qlab.models: shapes, causality, module paths, Linen/NNX equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlab.models import (
    CNN,
    MLP,
    CNNConfig,
    CharTransformer,
    LinenCNN,
    LinenMLP,
    Transformer,
    TransformerConfig,
    linen_cnn_from_nnx,
    linen_mlp_from_nnx,
)

WEIGHT_MODULES = (nnx.Linear, nnx.Conv, nnx.Embed, nnx.LayerNorm)


@nnx.jit
def fwd(model, x):
    return model(x)


def n_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def param_owners(model):
    """Every Param's owning module type: weights live only in standard Flax modules."""
    owners = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            for name, v in vars(node).items():
                if isinstance(v, nnx.Param):
                    owners[".".join(map(str, path + (name,)))] = type(node)
    return owners


def small_cfg(**kw):
    base = dict(vocab_size=37, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=24)
    base.update(kw)
    return TransformerConfig(**base)


def test_mlp_shapes_and_params():
    m = MLP(784, hidden=(1024, 1024), out=10, rngs=nnx.Rngs(0))
    assert fwd(m, jnp.zeros((3, 28, 28, 1))).shape == (3, 10)
    assert n_params(m) == 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    owners = param_owners(m)
    assert set(owners) == {f"{p}.{k}" for p in ("layers.0", "layers.1", "head") for k in ("kernel", "bias")}
    assert all(t is nnx.Linear for t in owners.values())
    # Different seeds give different weights.
    m2 = MLP(784, hidden=(1024, 1024), out=10, rngs=nnx.Rngs(1))
    assert not np.allclose(m.head.kernel[...], m2.head.kernel[...])


def test_cnn_shapes_fashion_and_digits():
    m = CNN(CNNConfig.fashion_mnist(), rngs=nnx.Rngs(0))
    assert fwd(m, jnp.zeros((2, 28, 28, 1))).shape == (2, 10)
    assert fwd(m, jnp.zeros((2, 28, 28))).shape == (2, 10)  # channel axis added
    assert 400_000 < n_params(m) < 450_000
    d = CNN(CNNConfig.digits(), rngs=nnx.Rngs(0))
    assert fwd(d, jnp.zeros((5, 8, 8, 1))).shape == (5, 10)
    assert {t for t in param_owners(m).values()} == {nnx.Conv, nnx.Linear}
    with pytest.raises(ValueError):
        CNN(CNNConfig(input_shape=(4, 4, 1), channels=(8, 8, 8)), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("positions,tie", [("learned", False), ("sinusoidal", True)])
def test_transformer_causal(positions, tie):
    cfg = small_cfg(positions=positions, tie_embeddings=tie)
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, cfg.vocab_size)
    logits = fwd(m, tokens)
    assert logits.shape == (2, 20, cfg.vocab_size) and logits.dtype == jnp.float32
    changed = tokens.at[:, 12:].set((tokens[:, 12:] + 5) % cfg.vocab_size)
    logits2 = fwd(m, changed)
    np.testing.assert_allclose(logits[:, :12], logits2[:, :12], atol=1e-5)
    assert not np.allclose(logits[:, 12:], logits2[:, 12:], atol=1e-3)
    # Positions matter: the same token at different places gives different logits.
    same = jnp.full((1, 8), 3)
    out = fwd(m, same)[0]
    assert not np.allclose(out[0], out[5], atol=1e-4)
    assert (m.head is None) == tie
    assert (m.pos_embed is None) == (positions == "sinusoidal")


def test_transformer_paths_and_owners():
    m = Transformer(small_cfg(), rngs=nnx.Rngs(0))
    owners = param_owners(m)
    assert all(issubclass(t, WEIGHT_MODULES) for t in owners.values())
    for path in (
        "embed.embedding",
        "pos_embed.embedding",
        "blocks.0.attn.query.kernel",
        "blocks.1.attn.out.kernel",
        "blocks.1.mlp.up.kernel",
        "blocks.1.mlp.down.kernel",
        "ln_f.scale",
        "head.kernel",
    ):
        assert path in owners, path
    assert CharTransformer is Transformer


def test_transformer_target_size():
    cfg = TransformerConfig(vocab_size=81, d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_len=128)
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    out = fwd(m, jnp.zeros((2, 128), jnp.int32))
    assert out.shape == (2, 128, 81) and bool(jnp.isfinite(out).all())
    assert 3_000_000 < n_params(m) < 3_500_000
    with pytest.raises(ValueError, match="max_len"):
        m(jnp.zeros((1, 129), jnp.int32))
    with pytest.raises(ValueError):
        TransformerConfig(vocab_size=10, d_model=30, n_heads=4)


def test_linen_mlp_matches_nnx():
    m = MLP(64, hidden=(48, 32), out=10, rngs=nnx.Rngs(0))
    module, variables = linen_mlp_from_nnx(m)
    assert isinstance(module, LinenMLP)
    x = jax.random.normal(jax.random.key(0), (7, 8, 8, 1))
    np.testing.assert_allclose(jax.jit(module.apply)(variables, x), fwd(m, x), rtol=1e-6, atol=1e-6)
    # The Linen module's own init has the same parameter tree structure.
    init = module.init(jax.random.key(0), x)
    assert jax.tree.structure(init) == jax.tree.structure(variables)
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, variables)


def test_linen_cnn_matches_nnx():
    m = CNN(CNNConfig.digits(), rngs=nnx.Rngs(0))
    module, variables = linen_cnn_from_nnx(m)
    assert isinstance(module, LinenCNN)
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
    np.testing.assert_allclose(jax.jit(module.apply)(variables, x), fwd(m, x), rtol=1e-5, atol=1e-5)
    init = module.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, variables)
