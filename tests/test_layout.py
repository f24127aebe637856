"""The house's layout: jora.py and trainer.py read top to bottom (nothing uses a module-level
name defined further down), imports run one way (train.py -> demo.py -> trainer.py -> jora.py
-> kernels/, and bench/ -> the rest), and jora.py copied alone runs."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def forward_references(path: str) -> list[str]:
    """'user (line) -> name (line)' for each module-level definition that uses a module-level
    name defined below it (in a function body, a default, a decorator or a base class)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    defined = {}   # name -> line of its definition
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        for n in names:
            defined.setdefault(n, node.lineno)
    bad = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign)):
            continue
        local = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)   # bound inside it
                 and isinstance(n.ctx, ast.Store)} | {a.arg for a in ast.walk(node)
                                                       if isinstance(a, ast.arg)}
        local |= {n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef,
                                                                  ast.ClassDef)) and n is not node}
        for sub in ast.walk(node):
            if (isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load)
                    and sub.id not in local and defined.get(sub.id, 0) > node.lineno):
                bad.append(f"line {node.lineno} uses {sub.id} (line {defined[sub.id]})")
    return bad


@pytest.mark.parametrize("module", ["jora.py", "trainer.py"])
def test_nothing_uses_a_name_defined_further_down(module):
    assert forward_references(os.path.join(ROOT, module)) == []


# Each module's level: a module imports only modules of lower levels (kernels/ also its own).
LEVELS = {"kernels": 0, "jora": 1, "trainer": 2, "demo": 3, "train": 4, "bench": 5}


def imported(path: str) -> set[str]:
    """The project modules a file imports anywhere (lazy imports inside functions too), by the
    first part of their dotted name: "kernels.ops" -> "kernels"."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(LEVELS)


def backward_imports(root: str) -> list[str]:
    """'file imports module' for each import against the direction of LEVELS."""
    files = [f for f in ("jora.py", "trainer.py", "demo.py", "train.py")
             if os.path.exists(os.path.join(root, f))]
    for package in ("kernels", "bench"):
        folder = os.path.join(root, package)
        if os.path.isdir(folder):
            files += [f"{package}/{f}" for f in sorted(os.listdir(folder)) if f.endswith(".py")]
    bad = []
    for f in files:
        level = LEVELS[f.split("/")[0].removesuffix(".py")]
        for name in sorted(imported(os.path.join(root, f))):
            own_package = f.startswith(name + "/")
            if LEVELS[name] >= level and not own_package:
                bad.append(f"{f} imports {name}")
    return bad


def test_imports_run_one_way():
    assert backward_imports(ROOT) == []


def test_a_planted_back_import_is_caught(tmp_path):
    """The check itself: a copy of the tree where the kernels import the model, lazily, and
    where trainer.py imports train.py, fails it on both."""
    import shutil
    for f in ("jora.py", "trainer.py", "train.py"):
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)
    shutil.copytree(os.path.join(ROOT, "kernels"), tmp_path / "kernels")
    with open(tmp_path / "kernels" / "swiglu.py", "a") as f:
        f.write("\n\ndef planted():\n    import jora\n    return jora\n")
    with open(tmp_path / "trainer.py", "a") as f:
        f.write("\nfrom train import main  # noqa\n")
    assert backward_imports(str(tmp_path)) == ["trainer.py imports train",
                                                "kernels/swiglu.py imports jora"]


def test_jora_copied_alone_runs_its_default_plan(tmp_path):
    """jora.py vendored without kernels/: the default Plan (kernels="auto") falls back to XLA
    and a loss and its gradient run; kernels="pallas" raises ImportError."""
    import shutil
    import subprocess
    import sys
    shutil.copy(os.path.join(ROOT, "jora.py"), tmp_path / "jora.py")
    code = ("import sys; sys.modules['kernels'] = None   # as if absent: import raises\n"
            "import jax, numpy as np, jora\n"
            "cfg = jora.Config(vocab_size=64, d_model=32, d_ff=64, n_layers=1, n_heads=4,"
            " n_kv_heads=2, head_dim=8)\n"
            "lcfg = jora.LoraConfig(r=2, alpha=4.0)\n"
            "p = jora.init_params(jax.random.key(0), cfg)\n"
            "lo = jora.init_lora(jax.random.key(1), cfg, lcfg)\n"
            "b = jora.make_batch(np.random.default_rng(0).integers(0, 64, (2, 9)))\n"
            "l, g = jax.value_and_grad(lambda lo: jora.loss(p, lo, b, cfg, lcfg))(lo)\n"
            "assert jora.Plan().kernels == 'auto' and np.isfinite(float(l)), l\n"
            "try:\n"
            "    jora.loss(p, lo, b, cfg, lcfg, plan=jora.Plan(kernels='pallas'))\n"
            "except ImportError:\n"
            "    print('ok', float(l))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]
