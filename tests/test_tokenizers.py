"""jora.Tokenizer against the real tokenizers in ../shared/data: ids their READMEs state, special
ids, round trips over Alpaca text, BOS rules, and the files it must refuse."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import DATA, needs_data

from jora import Tokenizer

pytestmark = needs_data
JSON = ("llama3", "qwen2.5")   # read through Hugging Face's tokenizers
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str) -> Tokenizer:
    if name in JSON:
        pytest.importorskip("tokenizers")
    return Tokenizer(os.path.join(DATA, name))


def copy(names, src: str, dst) -> str:
    for n in names:
        shutil.copy(os.path.join(DATA, src, n), dst / n)
    return str(dst)


# name, "Hello world" ids, bos_id, eos_id, vocab_size (each from the folder's README)
CASES = [("llama2", [15043, 3186], 1, 2, 32000),
         ("mistral-v0.3", [23325, 2294], 1, 2, 32768),
         ("llama3", [9906, 1917], 128000, 128001, 128257),   # Vision: + <|image|> 128256
         ("qwen2.5", [9707, 1879], None, 151645, 151665)]     # eos: <|im_end|>, no BOS


@pytest.mark.parametrize("name, hello, bos, eos, vocab", CASES, ids=[c[0] for c in CASES])
def test_hello_world_and_special_ids(name, hello, bos, eos, vocab):
    tok = load(name)
    assert tok.path.endswith("tokenizer.json" if name in JSON else "tokenizer.model")
    assert (tok.bos_id, tok.eos_id, tok.stop_ids, tok.vocab_size) == (bos, eos, (eos,), vocab)
    assert tok.encode("Hello world") == hello
    first = [] if bos is None else [bos]
    assert tok.encode("Hello world", bos=True, eos=True) == first + hello + [eos]
    assert tok.decode(hello + [eos]) == "Hello world"


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_round_trip_alpaca(name):
    tok = load(name)
    with open(os.path.join(DATA, "alpaca", "alpaca_data_1k.json")) as f:
        records = json.load(f)
    texts = [r[k] for r in records for k in ("instruction", "input", "output") if r[k]]
    assert len(records) == 1000 and len(texts) > 2000
    bad = [t for t in texts if tok.decode(tok.encode(t)) != t]
    assert not bad, f"{len(bad)} texts change, e.g. {bad[0]!r}"


def test_llama3_stop_ids_from_generation_config(tmp_path):
    pytest.importorskip("tokenizers")
    folder = copy(["tokenizer.json", "tokenizer_config.json"], "llama3", tmp_path)
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"bos_token_id": 128000, "eos_token_id": [128001, 128009]}, f)
    for path in (folder, os.path.join(folder, "tokenizer.json")):   # a folder or its file
        tok = Tokenizer(path)
        assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (128000, 128001, (128001, 128009))
        assert tok.encode("Hi", bos=True, eos=True) == [128000, 13347, 128001]
    # An Instruct model's config names <|eot_id|> as its EOS: that is what examples end with.
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, f)
    tok = Tokenizer(folder)
    assert (tok.eos_id, set(tok.stop_ids)) == (128009, {128001, 128009})
    # Without tokenizer_config.json, generation_config.json's first end id is the EOS.
    os.remove(tmp_path / "tokenizer_config.json")
    assert Tokenizer(folder).eos_id == 128001
    os.remove(tmp_path / "generation_config.json")
    with pytest.raises(ValueError, match="no EOS id"):
        Tokenizer(folder)


def test_sentencepiece_stop_ids_from_generation_config(tmp_path):
    folder = copy(["tokenizer.model"], "mistral-v0.3", tmp_path)
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [2, 4]}, f)
    tok = Tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, (2, 4))


def test_never_two_bos():
    tok = load("llama3")
    assert tok.encode("<|begin_of_text|>Hello world", bos=True) == [128000, 9906, 1917]
    with open(os.path.join(DATA, "chat_templates", "Llama-3.1-8B-Instruct.sample.txt")) as f:
        chat = f.read()   # a rendered chat: the template already wrote <|begin_of_text|>
    ids = tok.encode(chat, bos=True)
    assert ids[:2] == [128000, 128006] and ids.count(128000) == 1 and ids[-1] == 128009
    assert tok.encode(chat) == ids   # the BOS came from the text itself


def test_qwen_adds_no_bos():
    tok = load("qwen2.5")
    assert tok.bos_id is None
    assert tok.encode("Hello world", bos=True) == [9707, 1879]
    with open(os.path.join(DATA, "chat_templates", "Qwen2.5-7B-Instruct.sample.txt")) as f:
        ids = tok.encode(f.read(), bos=True)
    assert len(ids) == 35 and ids[:3] == [151644, 8948, 198] and ids[-2:] == [151645, 198]


def test_decode_drops_ids_past_the_vocabulary_and_special_tokens():
    tok = load("qwen2.5")   # the model's embedding (151,936) is larger than the tokenizer
    assert tok.decode([151644, 9707, 1879, 151645, 151665, 151935, -1]) == "Hello world"
    tok = load("llama2")
    assert tok.decode([1, 15043, 3186, 2, 32000, 32767]) == "Hello world"


def test_tiktoken_tokenizer_model_is_refused(tmp_path):
    folder = copy(["tokenizer.model"], "llama3", tmp_path)   # Llama-3's: tiktoken, no .json
    for path in (folder, os.path.join(folder, "tokenizer.model")):
        with pytest.raises(ValueError, match="tiktoken.*tokenizer.json"):
            Tokenizer(path)


def test_missing_files_and_packages(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        Tokenizer(str(tmp_path / "tokenizer.model"))
    (tmp_path / "tokenizer.model").write_bytes(b"\x00junk")
    with pytest.raises(ValueError, match="not a sentencepiece"):
        Tokenizer(str(tmp_path))
    monkeypatch.setitem(sys.modules, "tokenizers", None)   # as if not installed
    with pytest.raises(ImportError, match="pip install tokenizers"):
        Tokenizer(os.path.join(DATA, "qwen2.5"))


def test_jora_imports_without_tokenizer_packages():
    # jora.py vendors with jax, numpy and einops: tokenizers and sentencepiece load lazily.
    code = ("import sys; sys.modules.update(tokenizers=None, sentencepiece=None); "
            "import jora; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
