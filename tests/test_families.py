"""The model families against transformers: the tiny checkpoints of ../shared/data/families
(Llama-3.1 and 3.2 RoPE scaling, tied embeddings, Qwen2's q/k/v biases, Qwen3's per-head
norms with N*H != D, Mistral), each with the logits transformers computed for it, in float32
with XLA attention: the base model, base + its PEFT adapter, and the merged export reloaded, at
tp = 1 and tp = 2."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA

import jora

FAMILIES = os.path.join(DATA, "families")
NAMES = ["llama3", "llama3_tied", "qwen2", "qwen3", "mistral"]
needs_families = pytest.mark.skipif(not os.path.isdir(FAMILIES), reason="no shared/data/families")


def rel(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def logits(folder, tp, adapter=None):
    mesh = jora.make_mesh(tp, jax.devices()[:tp])
    cfg, params = jora.load_hf(folder, jnp.float32, mesh)
    lora, lcfg = jora.load_adapter(adapter, cfg) if adapter else (None, None)
    if lora is not None:
        lora = jora.shard(lora, jora.lora_specs(lcfg), mesh)
    ids = jora.load_tensors(os.path.join(FAMILIES, os.path.basename(folder.rstrip("/")),
                                         "ref.safetensors"))["input_ids"]
    opts = jora.Options(attention="xla", packed=False)
    out = jora.forward(params, ids, cfg, lora, lcfg, opts=opts, mesh=mesh)
    return cfg, params, lora, lcfg, np.asarray(out)


@needs_families
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_base_and_adapter_logits_match_transformers(name, tp):
    folder = os.path.join(FAMILIES, name)
    cfg = jora.Config.from_hf(folder)
    if cfg.n_kv_heads % tp:
        pytest.skip(f"{cfg.n_kv_heads} KV heads do not split over tp={tp}")
    ref = jora.load_tensors(os.path.join(folder, "ref.safetensors"))["logits"]
    ref_lora = jora.load_tensors(os.path.join(folder, "ref_lora.safetensors"))["logits"]
    assert rel(logits(folder, tp)[-1], ref) < 1e-4
    assert rel(logits(folder, tp, os.path.join(folder, "adapter"))[-1], ref_lora) < 1e-4


@needs_families
@pytest.mark.parametrize("name", NAMES)
def test_merged_export_reloads_to_the_adapters_logits(name, tmp_path):
    folder = os.path.join(FAMILIES, name)
    cfg, params, lora, lcfg, _ = logits(folder, 1, os.path.join(folder, "adapter"))
    jora.export_merged(str(tmp_path / "merged"), cfg, params, lora, lcfg, dtype=jnp.float32)
    written = json.load(open(tmp_path / "merged" / "config.json"))
    assert written["model_type"] == cfg.family
    assert written["architectures"] == [jora.FAMILIES[cfg.family]]
    assert jora.Config.from_hf(str(tmp_path / "merged")) == cfg   # the config round-trips
    ref_lora = jora.load_tensors(os.path.join(folder, "ref_lora.safetensors"))["logits"]
    ids = jora.load_tensors(os.path.join(folder, "ref.safetensors"))["input_ids"]
    cfg2, merged = jora.load_hf(str(tmp_path / "merged"), jnp.float32)
    out = jora.forward(merged, ids, cfg2, opts=jora.Options(attention="xla", packed=False))
    assert rel(np.asarray(out), ref_lora) < 1e-4


@needs_families
def test_the_rope_scaling_matters():
    """Without Llama-3's frequency scaling the logits move far past the tolerance: the test
    above could not pass by ignoring it."""
    import dataclasses
    folder = os.path.join(FAMILIES, "llama3")
    cfg, params = jora.load_hf(folder, jnp.float32)
    ids = jora.load_tensors(os.path.join(folder, "ref.safetensors"))["input_ids"]
    ref = jora.load_tensors(os.path.join(folder, "ref.safetensors"))["logits"]
    plain = dataclasses.replace(cfg, rope_type="default", rope_scale=1.0)
    out = jora.forward(params, ids, plain, opts=jora.Options(attention="xla", packed=False))
    assert rel(np.asarray(out), ref) > 1e-3


def test_unsupported_families_are_refused_in_one_line():
    base = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=128,
                intermediate_size=128)
    with pytest.raises(ValueError, match="model_type='gemma'.*supported: llama, mistral, qwen2, "
                                         "qwen3"):
        jora.Config.from_hf(dict(base, model_type="gemma"))
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        jora.Config.from_hf(dict(base, model_type="qwen2", use_sliding_window=True))
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        jora.Config.from_hf(dict(base, rope_scaling=dict(rope_type="yarn", factor=4.0)))
    cfg = jora.Config.from_hf(dict(base, eos_token_id=[128001, 128008, 128009]))
    assert cfg.eos_id == 128001 and cfg.end_ids == (128001, 128008, 128009)


def write_tokenizer(folder, *, bos: bool):
    """A byte-level BPE tokenizer.json of under 512 ids (the tiny models' vocabulary), trained
    on the Alpaca file's text: <unk> 0, <s> 1 (BOS, added only if `bos`, as Qwen adds none),
    </s> 2 (EOS), as the tiny configs say."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    records = json.load(open(os.path.join(DATA, "alpaca", "alpaca_data_1k.json")))
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((r["instruction"] + " " + r["output"] for r in records), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
            ("<s>", 1)])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>", "bos_token": "<s>" if bos else None}, f)


@needs_families
@pytest.mark.parametrize("name", NAMES)
def test_train_py_end_to_end_then_generate_and_reload(name, tmp_path):
    """train.py on each family's tiny folder (with a tokenizer of its vocabulary), then
    --generate with the adapter it wrote, then the merged export reloaded: its logits equal
    the base model's with the adapter."""
    import shutil
    import train
    folder = str(tmp_path / name)
    shutil.copytree(os.path.join(FAMILIES, name), folder, ignore=shutil.ignore_patterns(
        "adapter", "ref*"))
    write_tokenizer(folder, bos=not name.startswith("qwen"))
    data = tmp_path / "alpaca.json"
    records = json.load(open(os.path.join(DATA, "alpaca", "alpaca_data_1k.json")))[:40]
    data.write_text(json.dumps(records))
    out = str(tmp_path / "run")
    summary = train.main(["--model", folder, "--data", str(data), "--steps", "2", "--out", out,
                          "--targets", "all", "--dtype", "float32", "--seq-len", "256",
                          "--lora-dropout", "0", "--lr", "0.05", "--warmup", "0"])
    assert np.isfinite(summary["loss"])
    written = json.load(open(os.path.join(out, "merged", "config.json")))
    assert written["model_type"] == name.rstrip("_tied").replace("llama3", "llama")
    assert os.path.exists(os.path.join(out, "merged", "tokenizer.json"))
    result = train.main(["--generate", "--model", folder, "--adapter", os.path.join(out, "adapter"),
                         "--prompt", "Give three tips", "--max-new-tokens", "6"])
    assert len(result["outputs"][0]) >= 1
    cfg, params = jora.load_hf(folder, jnp.float32)
    lora, lcfg = jora.load_adapter(os.path.join(out, "adapter"), cfg)
    ids = np.arange(1, 17)[None]
    opts = jora.Options(attention="xla", packed=False)
    want = np.asarray(jora.forward(params, ids, cfg, lora, lcfg, opts=opts))
    _, merged = jora.load_hf(os.path.join(out, "merged"), jnp.float32)   # written in bf16
    err = rel(np.asarray(jora.forward(merged, ids, cfg, opts=opts)), want)
    moved = rel(np.asarray(jora.forward(params, ids, cfg, opts=opts)), want)
    assert err < 3e-2 and moved > 5 * err, (err, moved)   # the adapter is in the merged weights
