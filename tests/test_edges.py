"""Data and model edges a new user meets, each read, warned of or refused in one line."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA, needs_data

import demo
import jora
import train
import trainer


@pytest.fixture
def model(tmp_path):
    return demo.demo_setup(str(tmp_path / "demo"))[0]


def test_a_json_file_with_a_byte_order_mark_is_read(tmp_path):
    records = [{"instruction": "Say hi", "output": "hi"}]
    for name, text in (("a.json", json.dumps(records)), ("a.jsonl", json.dumps(records[0]))):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert trainer.read_records(str(tmp_path / name)) == (records, "alpaca")


def test_empty_answers_are_refused_or_warned_of(tmp_path):
    lines = []
    empty = [{"prompt": f"p{i}", "completion": ""} for i in range(3)]
    with pytest.raises(ValueError, match="every record's 'completion' is empty"):
        trainer.check_answers(empty, "completion", "d.jsonl", lines.append)
    trainer.check_answers(empty + [{"prompt": "p", "completion": "x"}], "completion", "d.jsonl",
                          lines.append)
    assert lines == ["warning: d.jsonl: 3 of 4 records have an empty 'completion': they train "
                     "the end token alone"]


def test_raft_answers_without_the_answer_tag_are_warned_of():
    lines = []
    records = [{"cot_answer": "because <ANSWER>: Paris"}, {"cot_answer": "Paris"}]
    trainer.check_answers(records, "raft", "r.jsonl", lines.append)
    assert lines == ["warning: r.jsonl: 1 of 2 answers have no '<ANSWER>:' tag: scoring "
                     "(--eval-generate) compares their whole text, not a final answer"]


def test_seq_len_beyond_the_models_positions_is_warned_of(model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo.records(400)))
    train.main(["--model", model, "--data", str(data), "--steps", "1", "--seq-len", "300",
                "--out", str(tmp_path / "run"), "--dtype", "float32"])
    assert ("warning: --seq-len 300 is beyond the model's max_position_embeddings 256"
            in capsys.readouterr().out)


def test_generate_refuses_a_model_whose_weights_hold_nan(model, tmp_path):
    from safetensors.numpy import load_file, save_file
    path = os.path.join(model, "model.safetensors")
    w = load_file(path)
    w["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan
    save_file(w, path)
    with pytest.raises(ValueError, match=r"params\.layers\.w_up.* holds NaN or infinite"):
        train.main(["--generate", "--model", model, "--prompt", "Spell 1:", "--dtype", "float32"])
