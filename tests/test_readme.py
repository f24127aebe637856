"""README.md's library example, run as written on the real stories260K model.

The first ```python block under "## Use as a library" is taken from the README, its two
placeholders (`model = "..."`, `out = "..."`) are pointed at stories260K's HF folder and a
temporary folder, and it is executed. Then its results are checked: logits, loss, gradients,
generation and both exports. If the README's example stops working, this test fails."""
import math
import os
import re

import numpy as np

import jora
from conftest import STORIES, needs_data

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def library_example() -> str:
    text = open(README, encoding="utf-8").read()
    section = text.split("\n## Use as a library\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert blocks, "no ```python block under '## Use as a library' in README.md"
    return blocks[0]


def with_paths(code: str, model: str, out: str) -> str:
    for name, value in (("model", model), ("out", out)):
        code, n = re.subn(rf'^{name} = "[^"\n]*"', f"{name} = {value!r}", code, flags=re.M)
        assert n == 1, f'the README example must assign `{name} = "..."` once at the top level'
    return code


def test_example_is_self_contained():
    code = library_example()
    compile(code, "README.md", "exec")
    for name in ("load_hf", "Tokenizer", "init_lora", "forward", "loss", "make_batch",
                 "generate", "export_adapter", "export_merged", "load_adapter"):
        assert f"jora.{name}(" in code, f"the README example no longer shows jora.{name}"


@needs_data
def test_readme_library_example_runs(tmp_path, capsys):
    model = os.path.join(STORIES, "hf")
    out = str(tmp_path / "run")
    ns = {"__name__": "readme_example"}
    exec(compile(with_paths(library_example(), model, out), "README.md", "exec"), ns)

    cfg, tokens, logits, nll = ns["cfg"], ns["tokens"], ns["logits"], ns["nll"]
    T = len(tokens[0])
    assert logits.shape == (1, T, cfg.vocab_size) and logits.dtype == np.float32
    assert np.isfinite(np.asarray(logits)).all()

    # The loss is the mean next-token cross-entropy of those very logits.
    lg = np.asarray(logits, np.float64)[0, :-1]
    logp = lg - lg.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -logp[np.arange(T - 1), np.asarray(tokens[0][1:])].mean()
    assert math.isfinite(float(nll)) and 0 < float(nll) < math.log(cfg.vocab_size)
    np.testing.assert_allclose(float(nll), ce, rtol=2e-2, atol=2e-2)

    # B starts at zero: its gradient is nonzero, A's is zero, on every target.
    grads = ns["grads"]
    for t in ("q", "k", "v", "o"):
        ab = getattr(grads, t)
        assert np.isfinite(np.asarray(ab.b)).all() and np.abs(np.asarray(ab.b)).max() > 0
        assert np.abs(np.asarray(ab.a)).max() == 0
    assert grads.gate is None and grads.down is None

    new = ns["new"]
    assert len(new) == 1 and 0 < len(new[0]) <= 32
    assert all(0 <= i < cfg.padded_vocab for i in new[0])
    assert capsys.readouterr().out.strip(), "the example prints the decoded continuation"

    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert os.path.isfile(os.path.join(out, "adapter", f)), f
    for f in ("config.json", "model.safetensors", "tokenizer.model"):
        assert os.path.isfile(os.path.join(out, "merged", f)), f

    # The adapter read back holds the SGD step's nonzero B, and the merged folder loads.
    lora, lcfg = ns["lora"], ns["lcfg"]
    assert lcfg.targets == ("q", "k", "v", "o") and lcfg.r == 16 and lcfg.alpha == 32
    assert np.abs(np.asarray(lora.q.b)).max() > 0
    merged_cfg, _ = jora.load_hf(os.path.join(out, "merged"))
    assert merged_cfg == cfg
