"""Host memory while loading and exporting a checkpoint whose layers dominate its size.

The bounds (README states them too): load_hf's host peak on top of the loaded parameters is at
most 1.5 stacked fields (F: the largest field, here w_gate), the same at any data-parallel size;
export_merged's peak is at most about one field; export writes faster than 150 MB/s."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r'''
import ctypes, json, os, sys, time, tracemalloc
import jax, numpy as np, jax.numpy as jnp
jax.config.update("jax_num_cpu_devices", 8)
sys.path.insert(0, sys.argv[1])
import jora

def rss_peak_of(fn):
    """-> peak resident memory (anonymous + file) during fn beyond the level before it: freed
    heap pages are first returned to the system (malloc_trim), and the kernel's high-water
    mark is reset (clear_refs 5), so the peak counts what fn allocates."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    status = lambda key: int([l for l in open("/proc/self/status")
                              if l.startswith(key)][0].split()[1]) * 1024
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


def peak_of(fn):
    """-> (result, host memory the call held at its peak beyond what it left allocated,
    seconds). tracemalloc sees every numpy and Python buffer (not the XLA CPU backend's own
    buffers: the loaded parameters), and is blind to the allocator keeping freed pages."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    t = time.time()
    out = fn()
    dt = time.time() - t
    now, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, peak - now, dt

folder, out = sys.argv[2], sys.argv[3]
cfg = jora.Config(vocab_size=512, d_model=1024, d_ff=4096, n_layers=4, n_heads=8, n_kv_heads=8,
                  head_dim=128, max_positions=256)
lcfg = jora.LoraConfig(r=16, targets=jora.PROJ)
params = jora.init_params(jax.random.key(0), cfg, jnp.bfloat16)
field = params.layers.w_gate.nbytes
jora.export_merged(folder, cfg, params, shard_bytes=field * 2)   # several files
del params
res = dict(field=field, files=len([f for f in os.listdir(folder) if f.endswith(".safetensors")]))
for data, tp in [(1, 1), (4, 2)]:
    mesh = jora.make_mesh(tp, jax.devices()[:data * tp])
    jora.load_hf(folder, jnp.bfloat16, mesh)   # warm: compiled code and allocator pools
    (cfg2, p), extra, dt = peak_of(lambda: jora.load_hf(folder, jnp.bfloat16, mesh))
    del p
    rss = rss_peak_of(lambda: jora.load_hf(folder, jnp.bfloat16, mesh))   # params included
    res[f"load_{data}x{tp}"] = dict(peak_over_params=extra, rss_peak=rss, s=dt)
lora = jora.init_lora(jax.random.key(1), cfg, lcfg)
lora = lora._replace(**{t: ab._replace(b=ab.b + 0.01) for t, ab in lora._asdict().items()
                        if ab is not None})
mesh = jora.make_mesh(1, jax.devices()[:1])
_, p = jora.load_hf(folder, jnp.bfloat16, mesh)
jora.export_merged(out, cfg, p, lora, lcfg)   # warm
_, extra, _ = peak_of(lambda: jora.export_merged(out, cfg, p, lora, lcfg))
size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
seconds = []

def export_timed():
    t = time.time()
    jora.export_merged(out, cfg, p, lora, lcfg)
    seconds.append(time.time() - t)

# the least of five, for memory and time: another process's load on the machine (pytest -n)
# adds XLA thread arenas and takes the cores, at times for seconds (and tracemalloc, above,
# slows what it traces)
rss = min(rss_peak_of(export_timed) for _ in range(5))
dt = min(seconds)
res["export"] = dict(peak=extra, rss_peak=rss, s=dt, mb_per_s=size / dt / 1e6)
print(json.dumps(res))
'''


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_load_and_export_hold_about_one_field(tmp_path):
    """Measured in a fresh process. Before (the same probe): load 3.0 F at 1 x 1 and 8.4 F at
    4 x 2 of numpy on top of the parameters, export 5.8 F of numpy (7.5 F resident) at about
    100 MB/s (timed then under tracemalloc, which slows it)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, str(script), ROOT, str(tmp_path / "ckpt"),
                        str(tmp_path / "merged")], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    F = m["field"]
    print(json.dumps(m, indent=1))
    assert m["files"] >= 3
    one, eight = m["load_1x1"]["peak_over_params"], m["load_4x2"]["peak_over_params"]
    assert one <= 1.5 * F and eight <= 1.5 * F, (one / F, eight / F)
    assert eight <= one + 0.1 * F   # no more with four data-parallel copies
    # On the CPU backend the device is the host: a fetched tensor aliases XLA's buffer, and
    # the device's temporaries (the layer's slice, its fp32 merge, the cast) are resident too.
    # The resident peak varies 0.7-3.3 F with another process on the machine (pytest -n 2),
    # whose load adds XLA thread arenas; the export that held the model whole was at 7.5 F.
    assert m["export"]["peak"] <= 1.1 * F, m["export"]
    assert m["export"]["rss_peak"] <= 4 * F, m["export"]
    assert m["export"]["mb_per_s"] > 150, m["export"]
