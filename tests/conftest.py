"""Shared test set-up: a persistent JAX compilation cache so repeated runs skip recompiles."""

import os

import jax

_cache = os.path.join(os.environ.get("QLAB_CACHE", os.path.expanduser("~/.cache/qlab")), "jax-cache")
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
