"""Shared fixtures. Eight fake CPU devices for the sharding tests: this must run before any
backend starts, and pytest imports conftest.py before the test modules."""
import importlib.util
import os
import sys
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)
# On a CPU-only machine the suite's time is mostly XLA compiling many small programs: LLVM's
# cheaper pipeline compiles them faster (level 0 was faster still, but slowed the demo's
# training loop by 70%) and runs the tiny models about as fast. Where a CUDA plugin is
# installed the GPU tests keep XLA's defaults. Set before any backend starts, and inherited
# by the train.py runs the tests start.
if not any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
    fast = "--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + fast).strip()
# train.py's default compilation cache lives under the user's cache folder: the tests get one
# of their own, fresh each session, so that what they compile is never from an earlier run.
# Under pytest-xdist (-n N) the workers of one run share it: one compiles what another reads.
run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
os.environ["XDG_CACHE_HOME"] = (tempfile.mkdtemp(prefix="jora-tests-cache-") if run is None else
                                os.path.join(tempfile.gettempdir(), f"jora-tests-cache-{run}"))
# The test process uses that same (fresh) cache from its first compile on, with train.py's
# settings: jax decides whether a process uses the cache at its first compile, so the setting
# train.main makes later would come too late. Many tests compile the same program (a reference
# computed again, a fresh jax.jit of the same function, a rerun): XLA's part is then read back.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.environ["XDG_CACHE_HOME"], "jora", "xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jora  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
STORIES = os.path.join(DATA, "stories260K")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data is absent")

# A GQA config small enough for CPU, with heads and F divisible by 8 for tp up to 8.
SMALL = jora.Config(vocab_size=128, d_model=64, d_ff=128, n_layers=2, n_heads=8, n_kv_heads=8,
                    head_dim=8, max_positions=256)
GQA = jora.Config(vocab_size=128, d_model=64, d_ff=128, n_layers=2, n_heads=8, n_kv_heads=4,
                  head_dim=8, max_positions=256)


def random_lora(key, cfg, lcfg, b_std=0.05):
    """init_lora, but with a random nonzero B: B = 0 would hide every adapter bug."""
    lora = jora.init_lora(key, cfg, lcfg)
    out = {}
    for i, (t, ab) in enumerate(lora._asdict().items()):
        if ab is not None:
            b = b_std * jax.random.normal(jax.random.fold_in(key, 100 + i), ab.b.shape)
            out[t] = jora.LoraAB(a=ab.a, b=b)
    return jora.Lora(**out)


def random_params(key, cfg, dtype=np.float32):
    """Random weights with non-trivial norms (init_params sets them to 1)."""
    p = jora.init_params(key, cfg, dtype)
    k1, k2, k3 = jax.random.split(jax.random.fold_in(key, 7), 3)
    layers = p.layers._replace(
        attn_norm=1 + 0.1 * jax.random.normal(k1, p.layers.attn_norm.shape, dtype),
        mlp_norm=1 + 0.1 * jax.random.normal(k2, p.layers.mlp_norm.shape, dtype))
    return p._replace(layers=layers,
                      final_norm=1 + 0.1 * jax.random.normal(k3, p.final_norm.shape, dtype),
                      embed=p.embed * 20)   # std 0.4: activations large enough to matter


@pytest.fixture(scope="session")
def stories():
    """The real trained stories260K model in fp32: (cfg, params)."""
    if not os.path.isdir(STORIES):
        pytest.skip("../shared/data is absent")
    return jora.load_hf(os.path.join(STORIES, "hf"), dtype=np.float32)
