"""qlab.nn.call_sites: the public names are patched only while a scope is open; candidate site names."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from qlab import nn as qnn
from qlab.nn import call_sites


def test_public_names_patched_only_inside_scopes():
    orig = dict(call_sites.ORIGINAL_OPS)
    assert (jnp.einsum, jnp.dot, jnp.matmul, jax.lax.dot_general) == tuple(orig[k] for k in call_sites.CALL_OPS)
    with qnn.call_scope("outer", ()):
        assert jnp.einsum is not orig["einsum"]
        with qnn.call_scope("inner", ()):
            assert jnp.matmul is not orig["matmul"]
        assert jax.lax.dot_general is not orig["dot_general"]  # still inside the outer scope
    assert (jnp.einsum, jnp.dot, jnp.matmul, jax.lax.dot_general) == tuple(orig[k] for k in call_sites.CALL_OPS)
    with pytest.raises(RuntimeError):
        with qnn.call_scope("", ()):
            raise RuntimeError("boom")
    assert jnp.einsum is orig["einsum"]


def test_candidate_sites_and_interception_flag():
    sites = call_sites.candidate_sites("a/b")
    assert len(sites) == len(call_sites.CALL_OPS) * call_sites.SITES_PER_OP
    assert "a/b/dot_general_7" in sites and "a/b/einsum_8" not in sites

    class Gram(nnx.Module):
        def __call__(self, x):
            return jnp.matmul(x, x.T)

    g = Gram()
    call_sites.intercept_call_sites(g, "g", (qnn.Rule("g/matmul_0", act="int2"),))
    assert call_sites.is_intercepting(g) and isinstance(g, Gram) and type(g).__name__ == "Gram"
    assert not call_sites.is_intercepting(Gram())
