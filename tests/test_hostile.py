"""Hostile inputs (issue 21): no lost runs, no hangs, no tracebacks. Every check of train.py and
jora against bad flags and files, interrupted runs, a full disk and two runs in one folder."""
import contextlib
import dataclasses
import errno
import glob
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import demo
import jora
import trainer
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--seq-len", "48", "--batch-size", "8", "--lora-r", "4", "--targets", "q,v", "--lr",
       "3e-3", "--warmup", "2", "--log-every", "1", "--lora-dropout", "0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The demo's small model and data, and adapters for it (and for a 3-layer variant)."""
    root = tmp_path_factory.mktemp("hostile")
    base, data = demo.demo_setup(str(root / "demo"))
    cfg = jora.Config.from_hf(base)
    lcfg = jora.LoraConfig(r=2, targets=("q", "v"))
    for name, c in (("adapter", cfg), ("adapter3", dataclasses.replace(cfg, n_layers=3))):
        jora.export_adapter(str(root / name), c, jora.init_lora(jax.random.key(0), c, lcfg), lcfg)
    return SimpleNamespace(root=root, base=base, data=data, adapter=str(root / "adapter"),
                           adapter3=str(root / "adapter3"), model=["--model", base, "--data", data])


@pytest.fixture(scope="module")
def finished(files):
    """A finished real run: 2 steps, checkpoints step_1 and step_2, adapter/ and merged/."""
    out = str(files.root / "finished")
    train.main(files.model + RUN + ["--out", out, "--steps", "2", "--save-every", "1"])
    return out


def copy_run(finished, tmp_path) -> str:
    shutil.copytree(finished, tmp_path / "run")
    return str(tmp_path / "run")


def snapshot(out) -> dict:   # every file's bytes (the lock file aside)
    paths = glob.glob(os.path.join(out, "**"), recursive=True)
    return {p: open(p, "rb").read() for p in paths if os.path.isfile(p) and ".lock" not in p}


def steps_logged(out) -> list[int]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if "loss" in r]


@contextlib.contextmanager
def within(seconds: int, what: str):   # fail, rather than hang, after `seconds`
    def hung(*_):
        raise TimeoutError(f"{what}: still waiting after {seconds} s")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(argv) -> str:
    """train.cli(argv) must exit with one line, 'error: ...'; -> that line."""
    with pytest.raises(SystemExit) as e:
        train.cli(argv)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    return msg


# ---- the traceback list: one line each, naming the flag, file, record or field ---------------

def _model(tmp, files, edit):   # a copy of the demo model folder, edited
    folder = tmp / "model"
    shutil.copytree(files.base, folder)
    edit(folder)
    return ["--model", str(folder), "--data", files.data]


def _config(tmp, files, change):
    def edit(folder):
        c = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(change(c)))
    return _model(tmp, files, edit)


def _data(tmp, files, content, name="data.jsonl"):
    path = tmp / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return ["--model", files.base, "--data", str(path)]


def _adapter(tmp, files, edit):
    folder = tmp / "adapter"
    shutil.copytree(files.adapter, folder)
    edit(folder)
    return ["--generate", "--model", files.base, "--prompt", "Spell 1:", "--adapter", str(folder)]


def _both(folder):   # model.safetensors beside an index that names another shard
    shutil.copy(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    names = jora.load_tensors(str(folder / "model.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:int(len(data) * keep)])


RAFT = {"instruction": "<DOCUMENT>a</DOCUMENT>\nQ?", "cot_answer": "A", "question": "Q?",
        "context": {"sentences": [["a"]]}}
CASES = {   # id: (argv from (tmp, files), what the line must say)
    **{f"flag {' '.join(f)}": (lambda t, fs, f=f: fs.model + f, want) for f, want in [
        (["--lr", "-1"], "--lr must be > 0, got -1.0"),
        (["--lr", "nan"], "--lr must be > 0, got nan"),
        (["--lr", "inf"], "--lr must be > 0, got inf"),
        (["--lora-alpha", "0"], "--lora-alpha must be > 0, got 0.0"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--steps", "-1"], "--steps must be >= 1, got -1"),
        (["--save-every", "-1"], "--save-every must be >= 0, got -1"),
        (["--eval-split", "-0.1"], "--eval-split must be in [0,1), got -0.1"),
        (["--eval-split", "1.0"], "--eval-split must be in [0,1), got 1.0"),
        (["--clip", "-1"], "--clip must be >= 0, got -1.0"),
        (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
        (["--top-p", "2"], "--top-p must be in (0,1], got 2.0"),
        (["--top-p", "0"], "--top-p must be in (0,1], got 0.0"),
        (["--keep", "-1"], "--keep must be >= 1, got -1"),
        (["--keep", "0"], "--keep must be >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
        (["--log-every", "0"], "--log-every must be >= 1, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, got -1"),
        (["--eval-split", "0.0001"], "--eval-split 0.0001 of 2000 examples holds out none"),
        (["--resume", "--overwrite"], "--resume and --overwrite: pick one"),
        (["--eval-split", "0", "--eval-every", "5"],
         "--eval-every/--eval-generate need --eval-split > 0 (a held-out share of the data)"),
        (["--prompt", "x"], "--prompt/--prompts apply to --generate only")]},
    "no --data": (lambda t, fs: ["--model", fs.base], "no --data: training needs a model "
                                                      "folder and a data file"),
    "--data without --model": (lambda t, fs: ["--data", fs.data], "--data needs --model"),
    "--generate without --model": (lambda t, fs: ["--generate", "--prompt", "x"],
                                   "--generate needs --model"),
    "--adapter while training": (lambda t, fs: fs.model + ["--adapter", fs.adapter],
                                 "--adapter applies to --generate only"),
    "raft without question": (
        lambda t, fs: _data(t, fs, json.dumps({k: v for k, v in RAFT.items() if k != "question"})),
        "data.jsonl: record 1 has no 'question' (format raft)"),
    "raft context a string": (
        lambda t, fs: _data(t, fs, json.dumps(dict(RAFT, context="a"))),
        "data.jsonl: record 1 field 'context' is a JSON string; format raft expects"),
    "data not UTF-8": (lambda t, fs: _data(t, fs, b'{"prompt": "\xff"}\n'),
                       "data.jsonl: not UTF-8 text (gzipped?)"),
    "data gzipped": (lambda t, fs: _data(t, fs, gzip.compress(open(fs.data, "rb").read()),
                                         "data.jsonl.gz"),
                     "data.jsonl.gz: not UTF-8 text (gzipped?)"),
    "data one JSON object": (lambda t, fs: _data(t, fs, json.dumps(RAFT, indent=1), "d.json"),
                             "d.json: holds a JSON object where a list of records (JSON) or one "
                             "record a line (JSONL) was expected"),
    "num_attention_heads 0": (lambda t, fs: _config(t, fs, lambda c: dict(
        c, num_attention_heads=0)), "config.json: field 'num_attention_heads' is 0; it must be "
                                    "an integer >= 1"),
    "hidden_size a string": (lambda t, fs: _config(t, fs, lambda c: dict(c, hidden_size="128")),
                             "config.json: field 'hidden_size' is '128'"),
    "config.json not JSON": (lambda t, fs: _model(t, fs, lambda f: (f / "config.json").write_text(
        "{oops")), "config.json: not JSON (line 1"),
    "config.json a list": (lambda t, fs: _config(t, fs, lambda c: [c]),
                           "config.json: holds a JSON list where a JSON object"),
    "index without weight_map": (lambda t, fs: _model(t, fs, lambda f: (
        f / "model.safetensors.index.json").write_text('{"metadata": {}}')),
        "model.safetensors.index.json: no 'weight_map' object"),
    "index not JSON": (lambda t, fs: _model(t, fs, lambda f: (
        f / "model.safetensors.index.json").write_text("weight_map")),
        "model.safetensors.index.json: not JSON"),
    "model.safetensors and an index": (lambda t, fs: _model(t, fs, _both),
                                       "holds both model.safetensors and "
                                       "model.safetensors.index.json"),
    "garbage tokenizer.model": (lambda t, fs: _model(t, fs, lambda f: (
        f / "tokenizer.model").write_bytes(os.urandom(300))),
        "tokenizer.model: not a sentencepiece tokenizer model"),
    "adapter_config without r": (lambda t, fs: _adapter(t, fs, lambda f: (
        f / "adapter_config.json").write_text(json.dumps({
            k: v for k, v in json.loads((f / "adapter_config.json").read_text()).items()
            if k != "r"}))), "adapter_config.json: field 'r' is 'missing'"),
    "truncated adapter": (lambda t, fs: _adapter(t, fs, lambda f: _truncate(
        f / "adapter_model.safetensors")), "adapter_model.safetensors: not a readable "
                                           "safetensors file, truncated or corrupt"),
    "adapter for more layers": (lambda t, fs: _adapter(t, fs, lambda f: (
        shutil.rmtree(f), shutil.copytree(fs.adapter3, f))),
        "adapter has factors for layer 2, the model has 2 layers"),
    "prompts file not UTF-8": (lambda t, fs: (t / "p.txt").write_bytes(b"\xff\xfe") and [
        "--generate", "--model", fs.base, "--prompts", str(t / "p.txt")],
        "p.txt: not UTF-8 text (gzipped?)"),
    "prompts file empty": (lambda t, fs: (t / "p.txt").write_text("") == 0 and [
        "--generate", "--model", fs.base, "--prompts", str(t / "p.txt")], "p.txt: no prompts"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_line_naming_the_cause_and_write_nothing(files, tmp_path, case):
    make, want = CASES[case]
    out = str(tmp_path / "out")
    msg = refused(make(tmp_path, files) + ["--out", out])
    assert want in msg, msg
    assert not os.path.exists(out)   # validated before anything was written


# ---- runs are never lost -------------------------------------------------------------------

def test_forgotten_model_on_a_real_runs_folder_is_refused(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    msg = refused(["--out", out, "--steps", "2"])   # the demo, over a real run
    assert f"--out {out} holds a run of " in msg and "not the demo" in msg
    assert snapshot(out) == before


def test_overwrite_refuses_an_invalid_new_run_and_removes_only_what_jora_wrote(
        files, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    before = snapshot(out)
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text('{"prompt": "Spell 1:", "completion": " one"}\n' * 3)
    for bad in (["--eval-split", "1.0"], ["--data", str(tiny)], ["--lr", "nan"],
                ["--batch-size", "12"]):   # (12 rows do not split over 8 devices: trainer.train)
        refused(files.model + RUN + ["--out", out, "--overwrite"] + bad)
        assert snapshot(out) == before, bad
    (tmp_path / "run" / "notes.txt").write_text("mine")
    (tmp_path / "run" / "checkpoints" / "mine").mkdir()
    (tmp_path / "run" / "checkpoints" / "step_notes.txt").write_text("mine too")
    (tmp_path / "run" / "checkpoints" / "step_00000009.tmp").mkdir()   # a killed save's
    train.main(files.model + RUN + ["--out", out, "--overwrite", "--steps", "1"])
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == [
        "mine", "step_00000001", "step_notes.txt"]
    assert steps_logged(out) == [1]


def test_two_runs_on_one_out_and_the_lock_survives_no_kill_9(files, tmp_path):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time; sys.path.insert(0, {ROOT!r}); import trainer
trainer.lock_run({out!r}); print("locked", flush=True); time.sleep(300)"""],
                              stdout=subprocess.PIPE, text=True)
    try:
        with within(120, "the lock holder"):
            assert holder.stdout.readline().strip() == "locked"
        msg = refused(files.model + RUN + ["--out", out, "--steps", "1"])
        assert f"--out {out} is in use by another run (pid {holder.pid})" in msg
        assert os.listdir(out) == [".lock"]   # refused before writing anything
    finally:
        holder.kill()   # kill -9: the kernel drops the flock with the process
        holder.wait()
    assert trainer.lock_run(out)
    trainer.unlock_run(out)


# ---- non-finite steps: checkpoints are good only if every tensor is finite ------------------

def test_a_step_gone_non_finite_names_the_tensor_and_the_last_good_checkpoint(
        files, tmp_path, monkeypatch):
    update = jora.adamw_update

    def poisoned(lora, grads, opt, lr, tcfg):   # step 3's update makes lora.v.b NaN, while the
        lora, opt = update(lora, grads, opt, lr, tcfg)   # loss and gradient stay finite
        nan = jnp.where(opt.step == 3, jnp.nan, 1.0)
        return lora._replace(v=jora.LoraAB(lora.v.a, lora.v.b * nan)), opt
    monkeypatch.setattr(jora, "adamw_update", poisoned)
    out = str(tmp_path / "run")
    msg = refused(files.model + RUN + ["--out", out, "--steps", "6", "--save-every", "1",
                                       "--log-every", "2"])
    assert (f"non-finite lora.v.b at step 3; stopped. The last good checkpoint (every tensor "
            f"finite) is {out}/checkpoints/step_00000002") in msg
    assert [os.path.basename(p) for p in trainer.checkpoints(out)] == ["step_00000001",
                                                                    "step_00000002"]
    for path in trainer.checkpoints(out):
        trainer.read_checkpoint(path)   # raises for a non-finite tensor


def test_a_checkpoint_with_a_non_finite_tensor_is_not_good(finished, tmp_path):
    from safetensors.numpy import save_file
    out = copy_run(finished, tmp_path)
    path = os.path.join(out, "checkpoints", "step_00000002", "state.safetensors")
    t = jora.load_tensors(path)
    t["lora.q.b"][0, 0, 0] = np.nan
    save_file(t, path)
    good, skipped = trainer.good_checkpoint(out)
    assert good.endswith("step_00000001")
    assert skipped == [f"{path}: tensor 'lora.q.b' is not finite"]
    lora = jora.init_lora(jax.random.key(0), jora.TINY, jora.LoraConfig())
    state = jora.TrainState(lora._replace(q=jora.LoraAB(lora.q.a * np.nan, lora.q.b)),
                            jora.adamw_init(lora), np.int32(0))
    with pytest.raises(FloatingPointError, match="not saved, tensor 'lora.q.a' is not finite"):
        trainer.save_checkpoint(str(tmp_path / "bad"), state, {})
    assert not os.path.exists(tmp_path / "bad")


# ---- no hangs ------------------------------------------------------------------------------

def test_a_dataset_that_cannot_fill_a_batch_is_refused_within_seconds(files, tmp_path):
    with within(60, "the data loader"):
        t = time.time()
        one = tmp_path / "one.jsonl"
        one.write_text('{"prompt": "Spell 1:", "completion": " one"}\n')
        msg = refused(["--model", files.base, "--data", str(one), "--batch-size", "2",
                       "--out", str(tmp_path / "a")])
        assert msg.endswith("one.jsonl: 1 records, 1 usable at --seq-len 256, 0 held out by "
                            "--eval-split 0.0: 1 examples cannot fill one batch of 2 rows "
                            "(--batch-size x --grad-accum) of --seq-len 256 packed tokens"), msg
        many = tmp_path / "many.jsonl"   # 270 left after length filtering, batch 150 x 2
        many.write_text('{"prompt": "Spell 1:", "completion": " one"}\n' * 270 +
                        '{"prompt": "Spell 1 2 3 4 5 6 7 8 9:", "completion": " one"}\n' * 30)
        msg = refused(["--model", files.base, "--data", str(many), "--batch-size", "150",
                       "--grad-accum", "2", "--seq-len", "16", "--pack",
                       "--out", str(tmp_path / "b")])
        assert ("many.jsonl: 300 records, 270 usable at --seq-len 16, 5 held out by "
                "--eval-split 0.02: 265 examples cannot fill one batch of 300 rows "
                "(--batch-size x --grad-accum) of --seq-len 16 packed tokens") in msg, msg
        ex = [trainer.Example(np.ones(5, np.int32), np.ones(5, np.float32))] * 3
        for pack, position in ((False, (0, 0)), (True, (0, 0)), (True, (4, 2))):
            with pytest.raises(ValueError, match="3 examples cannot fill one batch of 4 rows"):
                trainer.batches(ex, rows=4, seq_len=16, pack=pack, seed=0,   # at the call:
                                position=position)                 # no next() needed
        assert time.time() - t < 30


def test_a_second_signal_stops_at_once(files, tmp_path):
    mesh = jora.make_mesh(1)
    cfg, params = jora.load_hf(files.base, jnp.float32, mesh)
    tok = jora.Tokenizer(files.base)
    ex = trainer.prepare_examples(files.data, "auto", tok, seq_len=48, eval_split=0.0, seed=0,
                                  batch_size=8, pack=False, log=lambda *_: None).train

    def log(line):   # two Ctrl-C while step 2 is logged
        if line.startswith("step 2/"):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    out = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg, params, jora.LoraConfig(r=2), jora.TrainConfig(steps=50, batch_size=8,
                                                                      seq_len=48),
                      ex, out, mesh, schedule=trainer.Schedule(log_every=1), log=log)
    assert trainer.checkpoints(out) == []      # no checkpoint: stopped at once
    assert trainer.lock_run(out)               # and the lock was given back
    trainer.unlock_run(out)

    def log(line):   # one Ctrl-C during the baseline evaluation, before any step
        if line.startswith("step 0/"):
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg, params, jora.LoraConfig(r=2), jora.TrainConfig(steps=50, batch_size=8,
                                                                      seq_len=48),
                      ex[8:], out + "2", mesh, eval_examples=ex[:8],
                      schedule=trainer.Schedule(eval_every=10), log=log)
    assert not os.path.exists(os.path.join(out + "2", "metrics.jsonl")) or steps_logged(
        out + "2") == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handlers restored


# ---- interrupted runs, resume -----------------------------------------------------------------

def _popen(argv):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + argv,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_sigterm_saves_a_checkpoint_and_exits_143(files, tmp_path):
    out = str(tmp_path / "run")
    proc = _popen(files.model + RUN + ["--out", out, "--steps", "5000"])
    lines = []
    with within(120, "train.py's first step"):
        for line in proc.stdout:   # the first step has run: the step loop
            lines.append(line)
            if line.startswith("step 1/"):
                break
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, "".join(lines) + rest
    assert "interrupted at step" in rest and "continue with --resume" in rest
    assert trainer.latest_checkpoint(out) is not None
    assert not os.path.exists(os.path.join(out, "adapter"))   # not exported: not finished
    assert "143 (SIGTERM)" in train.parser().format_help()


def test_kill_9_then_resume_logs_each_step_once(files, tmp_path):
    out = str(tmp_path / "run")
    proc = _popen(files.model + RUN + ["--out", out, "--steps", "5000", "--save-every", "3"])
    metrics, deadline = os.path.join(out, "metrics.jsonl"), time.time() + 120
    step = lambda: int(os.path.basename(trainer.latest_checkpoint(out) or "step_0")[5:])
    rows = lambda: open(metrics).read().count("\n") if os.path.exists(metrics) else 0
    while time.time() < deadline and not (step() and rows() > step() + 1):
        time.sleep(0.01)
    proc.kill()   # rows past the checkpoint, perhaps half of one: to be dropped on resume
    proc.communicate()
    saved = step()
    assert rows() > saved > 0
    train.main(["--resume", "--out", out, "--steps", str(saved + 2)])   # model, data: from it
    assert steps_logged(out) == list(range(1, saved + 3))


def test_a_truncated_latest_checkpoint_falls_back_to_the_one_before(finished, tmp_path, capsys):
    out = copy_run(finished, tmp_path)
    latest = os.path.join(out, "checkpoints", "step_00000002", "state.safetensors")
    _truncate(latest)
    summary = train.main(["--resume", "--out", out, "--steps", "3", "--lr", "1e-3"])
    said = capsys.readouterr().out
    assert f"warning: {latest}: not a readable safetensors file, truncated or corrupt" in said
    assert "resuming from the checkpoint before it" in said
    assert f"resumed from {out}/checkpoints/step_00000001 at step 1" in said
    assert "warning: --lr 0.001 differs from the run's 0.003" in said
    assert summary["step"] == 3 and steps_logged(out) == [1, 2, 3]


# ---- exports stay consistent ------------------------------------------------------------------

def test_a_killed_export_leaves_no_stale_merged_beside_a_new_adapter(finished, tmp_path,
                                                                     monkeypatch):
    out = copy_run(finished, tmp_path)
    adapter = os.path.join(out, "adapter", "adapter_model.safetensors")
    old = os.stat(adapter).st_mtime_ns

    def killed(folder, *a, **k):
        assert not os.path.exists(folder)                # the old merged/ went first,
        assert os.stat(adapter).st_mtime_ns != old       # before the new adapter/
        raise KeyboardInterrupt                          # and then the process is stopped
    monkeypatch.setattr(jora, "export_merged", killed)
    with pytest.raises(SystemExit) as e:
        train.cli(["--resume", "--out", out])
    assert e.value.code == 130
    assert os.path.exists(adapter) and not os.path.exists(os.path.join(out, "merged"))


def test_a_full_disk_during_export_is_one_line_and_leaves_no_tmp(finished, tmp_path,
                                                                 monkeypatch):
    out = copy_run(finished, tmp_path)

    def full(path, *a, **k):   # export_merged's streaming writer
        open(path, "wb").write(b"\0" * 100)   # part of a file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(jora, "_write_safetensors", full)
    msg = refused(["--resume", "--out", out])
    assert msg == (f"error: cannot write {out}/merged (No space left on device); the partial "
                   f"merged.tmp was removed")
    assert not glob.glob(os.path.join(out, "**", "*.tmp"), recursive=True)


def test_resume_of_a_checkpoint_that_names_no_model_asks_for_it(tmp_path):
    lcfg = jora.LoraConfig(r=2, targets=("q",))   # a checkpoint trainer.train wrote for a library
    lora = jora.init_lora(jax.random.key(0), jora.TINY, lcfg)   # user: no run_info in it
    trainer.save_checkpoint(str(tmp_path / "run" / "checkpoints" / "step_00000001"),
                         jora.TrainState(lora, jora.adamw_init(lora), np.int32(0)),
                         dict(step=1, data_position=[0, 8]))
    msg = refused(["--resume", "--out", str(tmp_path / "run")])
    assert msg.startswith("error: no --model: training needs a model folder"), msg


def test_the_demo_reruns_in_place_and_resumes_from_its_folder_alone(tmp_path, capsys):
    out = str(tmp_path / "demo")
    small = ["--batch-size", "8", "--seq-len", "48", "--save-every", "1", "--log-every", "1"]
    train.main(["--out", out, "--steps", "1"] + small)
    train.main(["--out", out, "--steps", "2"] + small)   # a demo run: replaced, not refused
    assert steps_logged(out) == [1, 2]
    capsys.readouterr()
    summary = train.main(["--resume", "--out", out, "--steps", "3"])   # all else: the checkpoint
    said = capsys.readouterr().out
    assert [w for w in said.splitlines() if w.startswith("warning")] == [
        f"warning: --steps 3 differs from the run's 2 ({out}/checkpoints/step_00000002)"]
    assert "held-out exact match: " in said and "exact_match" in summary
    assert steps_logged(out) == [1, 2, 3]
