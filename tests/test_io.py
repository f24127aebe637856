"""HF checkpoints in, merged and PEFT exports out, and clear errors for broken inputs."""
import json
import os

import jax
import numpy as np
import pytest
from conftest import GQA, random_lora, random_params

import jora


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random GQA model written in HF layout, with nonzero-B adapters on all targets."""
    folder = tmp_path_factory.mktemp("hf") / "base"
    params = random_params(jax.random.key(0), GQA)
    jora.export_merged(str(folder), GQA, params, dtype=np.float32)
    lcfg = jora.LoraConfig(r=4, alpha=8.0, targets=jora.PROJ)
    lora = random_lora(jax.random.key(1), GQA, lcfg)
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, 12), 0, GQA.vocab_size))
    return str(folder), params, lora, lcfg, tokens


def test_load_hf_round_trip(model):
    folder, params, _, _, tokens = model
    cfg, loaded = jora.load_hf(folder, np.float32)
    assert cfg == GQA
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 loaded, params)


@pytest.mark.parametrize("targets", [("q", "v"), jora.PROJ])
def test_merged_and_adapter_exports_reproduce_factored_logits(model, tmp_path, targets):
    folder, params, lora_all, _, tokens = model
    lcfg = jora.LoraConfig(r=4, alpha=8.0, targets=targets)
    lora = jora.Lora(**{t: getattr(lora_all, t) for t in targets})
    want = np.asarray(jora.forward(params, tokens, GQA, lora, lcfg))
    jora.export_merged(str(tmp_path / "merged"), GQA, params, lora, lcfg, source=folder,
                       dtype=np.float32)
    cfg, merged = jora.load_hf(str(tmp_path / "merged"), np.float32)
    np.testing.assert_allclose(np.asarray(jora.forward(merged, tokens, cfg)), want, atol=2e-5)

    jora.export_adapter(str(tmp_path / "adapter"), GQA, lora, lcfg, base_model=folder)
    back, lcfg2 = jora.load_adapter(str(tmp_path / "adapter"), GQA)
    assert lcfg2 == lcfg
    np.testing.assert_array_equal(np.asarray(jora.forward(params, tokens, GQA, back, lcfg2)),
                                  want)
    base = np.asarray(jora.forward(params, tokens, GQA))
    assert np.abs(base - want).max() > 1e-3


def test_adapter_targets_come_from_its_tensors(model, tmp_path):
    from safetensors.numpy import load_file, save_file
    _, _, lora, _, _ = model
    lcfg = jora.LoraConfig(r=4, alpha=8.0, targets=("q", "v", "down"))
    lora = jora.Lora(**{t: getattr(lora, t) for t in lcfg.targets})
    folder = tmp_path / "a"
    jora.export_adapter(str(folder), GQA, lora, lcfg)
    config = json.loads((folder / "adapter_config.json").read_text())
    for modules in ("all-linear", ".*(q_proj|v_proj|down_proj)"):   # PEFT allows both forms
        (folder / "adapter_config.json").write_text(json.dumps(dict(config,
                                                                    target_modules=modules)))
        assert jora.load_adapter(str(folder), GQA)[1] == lcfg
    tensors = load_file(folder / "adapter_model.safetensors")   # a factor we cannot apply
    tensors["base_model.model.lm_head.lora_A.weight"] = np.ones((4, 64), np.float32)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"a: adapter has LoRA factors on \['down_proj', "
                                         r"'lm_head', 'q_proj', 'v_proj'\]; only"):
        jora.load_adapter(str(folder), GQA)


def test_adapter_has_exact_peft_names_and_shapes(model, tmp_path):
    from safetensors.numpy import load_file
    _, _, lora, lcfg, _ = model
    jora.export_adapter(str(tmp_path / "a"), GQA, lora, lcfg, base_model="meta-llama/x")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    D, F, NH, KH = 64, 128, 8 * 8, 4 * 8
    io = {"self_attn.q_proj": (D, NH), "self_attn.k_proj": (D, KH), "self_attn.v_proj": (D, KH),
          "self_attn.o_proj": (NH, D), "mlp.gate_proj": (D, F), "mlp.up_proj": (D, F),
          "mlp.down_proj": (F, D)}
    want = {}
    for i in range(GQA.n_layers):
        for name, (fan_in, fan_out) in io.items():
            key = f"base_model.model.model.layers.{i}.{name}"
            want[f"{key}.lora_A.weight"] = (4, fan_in)
            want[f"{key}.lora_B.weight"] = (fan_out, 4)
    assert {k: v.shape for k, v in tensors.items()} == want
    # torch's Linear layout: lora_B.weight (out, r) is our B (r, out) transposed.
    np.testing.assert_array_equal(
        tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"],
        np.asarray(lora.up.b[1]).T)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["bias"], config["fan_in_fan_out"]) == (
        4, 8.0, "none", False)
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"]
    assert config["base_model_name_or_path"] == "meta-llama/x" and config["inference_mode"]


def test_merged_export_shards_with_index_and_copies_tokenizer(model, tmp_path):
    folder, params, lora, lcfg, tokens = model
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.model").write_bytes(b"spm")
    jora.export_merged(str(tmp_path / "m"), GQA, params, lora, lcfg, source=str(tmp_path / "src"),
                       shard_bytes=40_000)
    files = sorted(os.listdir(tmp_path / "m"))
    assert "model.safetensors.index.json" in files and "tokenizer.model" in files
    assert sum(f.startswith("model-0") for f in files) > 2
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["architectures"] == ["LlamaForCausalLM"]
    _, merged = jora.load_hf(str(tmp_path / "m"), np.float32)
    assert merged.layers.wq.dtype == np.float32
    want = np.asarray(jora.forward(params, tokens, GQA, lora, lcfg))
    np.testing.assert_allclose(np.asarray(jora.forward(merged, tokens, GQA)), want, atol=0.15)


def test_export_replaces_atomically(model, tmp_path):
    folder, params, _, _, _ = model
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    jora.export_merged(str(out), GQA, params)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert not os.path.exists(str(out) + ".tmp") and not os.path.exists(str(out) + ".old")


# ---- broken checkpoints ---------------------------------------------------------------------

def _broken(model, tmp_path, edit):
    from safetensors.numpy import load_file, save_file
    import shutil
    folder = tmp_path / "broken"
    shutil.copytree(model[0], folder)
    tensors = load_file(folder / "model.safetensors")
    edit(folder, tensors)
    if tensors:
        save_file(tensors, folder / "model.safetensors")
    return str(folder)


def test_missing_tensor_is_named(model, tmp_path):
    folder = _broken(model, tmp_path,
                     lambda f, t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    with pytest.raises(ValueError, match=r"no tensor 'model.layers.1.self_attn.v_proj.weight'"):
        jora.load_hf(folder)


def test_wrong_shape_names_tensor_and_both_shapes(model, tmp_path):
    def edit(f, t):
        t["model.layers.0.mlp.up_proj.weight"] = np.zeros((100, 64), np.float32)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight' has shape "
                                         r"\(100, 64\), the config needs \(128, 64\)"):
        jora.load_hf(_broken(model, tmp_path, edit))


def test_unexpected_tensor_is_named(model, tmp_path):
    def edit(f, t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    with pytest.raises(ValueError,
                       match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        jora.load_hf(_broken(model, tmp_path, edit))


def test_truncated_safetensors_is_reported(model, tmp_path):
    def edit(f, t):
        data = (f / "model.safetensors").read_bytes()
        (f / "model.safetensors").write_bytes(data[: len(data) // 2])
        t.clear()
    with pytest.raises(ValueError, match="model.safetensors"):
        jora.load_hf(_broken(model, tmp_path, edit))


def test_config_missing_field_is_named(model, tmp_path):
    def edit(f, t):
        c = json.loads((f / "config.json").read_text())
        del c["num_hidden_layers"]
        (f / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="config.json: missing field 'num_hidden_layers'"):
        jora.load_hf(_broken(model, tmp_path, edit))


def test_missing_files_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GQA.to_hf()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        jora.load_hf(str(tmp_path))
