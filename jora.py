"""jora.py: tensor-parallel LoRA fine-tuning of Llama-2-family models in JAX, in one file.

SPDX-License-Identifier: MIT.  Last checked with Python 3.12 and jax 0.11.2.

Read it top to bottom: config -> parameters (and how each is split) -> checkpoint I/O -> model
-> loss -> AdamW -> sharded step -> data -> generation -> training loop. Copy this file alone
into a project: it needs jax, numpy, safetensors and sentencepiece (the last two are imported
inside the functions that read and write files).

Letters used in every shape comment and einsum:
  B batch            T positions (query)   S positions (key)   V vocab
  D d_model          F mlp hidden          L layers            R LoRA rank
  N query heads      K kv heads            G = N // K          H head_dim
  I, O  a projection's input and output features (e.g. D -> N*H for q)

LoRA (Hu et al. 2021, eq. 3). A frozen projection y = x @ W, W (I, O), gains two small trained
factors A (I, R) and B (R, O):
    y = x @ W + (alpha / R) * dropout(x) @ A @ B
A starts kaiming-uniform (as PEFT), B at zero, so step 0 is exactly the base model. W + A @ B is
never formed while training (it would cost a full-size weight and its gradient per layer); it is
formed only when exporting a merged model.

Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) over the mesh axis "model"; the batch is
split over the mesh axis "data". One `jax.shard_map` wraps forward + loss; gradients are taken
outside it. Inside, shapes in comments are per device (N/tp means this device's heads):
  weight              split on                 LoRA A        LoRA B        communication
  wq, wk, wv          output heads (N or K)    replicated    split (O)     none
  w_gate, w_up        output columns (F)       replicated    split (O)     none
  wo                  input heads (N*H)        split (I)     replicated    psum after
  w_down              input rows (F)           split (I)     replicated    psum after
  lm_head             vocab (V padded to 128)  -             -             psums inside the loss
  embed, norms        replicated
Row-parallel layers need only the one psum the frozen layer needs anyway, because
sum_i (x_i W_i + s x_i A_i B) = x W + s x A B. With sequence parallelism each psum becomes a
reduce-scatter over positions, and an all-gather precedes each column-parallel block.

Dtypes: frozen weights and activations in `dtype` (bf16 by default); LoRA factors and AdamW
moments fp32; RMSNorm statistics, RoPE angles, softmax, logits and the loss in fp32 (the logits'
gradient meets lm_head in `dtype`, like every other matmul's: see logits_matmul).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import shutil
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"   # the two mesh axes
PROJ = ("q", "k", "v", "o", "gate", "up", "down")   # the seven projections LoRA may target
COLUMN = ("q", "k", "v", "gate", "up")               # split on output; "o", "down" on input

# User errors are ValueError or OSError with one line that names the file, record, field or flag.
_KIND = {dict: "a JSON object", list: "a JSON list", str: "a JSON string", int: "a number",
         float: "a number", bool: "true/false", type(None): "null"}


def read_text(path: str) -> str:
    """A UTF-8 text file's contents; an error names the file."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (gzipped?): byte {e.start} is "
                         f"{raw[e.start]:#04x}") from None


def read_json(path: str, expect=dict, shape: str = "a JSON object"):
    """Parse a JSON file; errors name the file, and valid JSON of the wrong shape says what
    shape was expected."""
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(value, expect):
        raise ValueError(f"{path}: holds {_KIND.get(type(value), 'JSON')} where {shape} was "
                         f"expected")
    return value


# ---------------------------------------------------------------------------------------------
# 1. Config
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    """Architecture of a Llama-2-family model. Frozen, hence hashable: a static jit argument."""
    vocab_size: int = 32_000      # V
    d_model: int = 4096           # D
    d_ff: int = 11_008            # F
    n_layers: int = 32            # L
    n_heads: int = 32             # N
    n_kv_heads: int = 32          # K (Llama-2 70B: 8, grouped-query attention)
    head_dim: int = 128           # H
    rope_theta: float = 10_000.0
    rope_scale: float = 1.0       # linear RoPE scaling: positions are divided by this
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # lm_head = embed^T (small models)
    max_positions: int = 4096
    bos_id: int = 1
    eos_id: int = 2

    @property
    def padded_vocab(self) -> int:   # lm_head columns: a multiple of 128, so any tp divides it
        return -(-self.vocab_size // 128) * 128

    @classmethod
    def from_hf(cls, config) -> "Config":
        """Read an HF `LlamaForCausalLM` config.json (a path, a folder or a dict), as written by
        transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`, `head_dim`)."""
        src = "config"
        if not isinstance(config, dict):
            src = os.path.join(config, "config.json") if os.path.isdir(config) else config
            config = read_json(src, dict, "a JSON object (an HF LlamaForCausalLM config)")

        def get(key, default=...):
            if key not in config or config[key] is None:
                if default is ...:
                    raise ValueError(f"{src}: missing field '{key}'")
                return default
            return config[key]

        def refuse(key, value, why):
            raise ValueError(f"{src}: unsupported {key}={value!r} ({why})")

        def number(key, default=..., kind=int, least=1):   # an integer >= least, or a float > 0
            v = get(key, default)
            if (isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int)
                    or not (least <= v if kind is int else 0 < v < math.inf)):
                raise ValueError(f"{src}: field '{key}' is {v!r}; it must be " +
                                 (f"an integer >= {least}" if kind is int else "a number > 0"))
            return kind(v)

        if get("model_type", "llama") != "llama":
            refuse("model_type", config["model_type"], "only Llama is supported")
        if get("hidden_act", "silu") != "silu":
            refuse("hidden_act", config["hidden_act"], "Llama uses silu")
        for key in ("attention_bias", "mlp_bias"):
            if get(key, False):
                refuse(key, True, "Llama-2 projections have no bias")
        # transformers 5 keeps theta and scaling together in rope_parameters.
        rope = dict(get("rope_scaling", None) or {})
        rope.update(get("rope_parameters", None) or {})
        config = dict(config, rope_theta=rope.get("rope_theta", get("rope_theta", 10_000.0)),
                      rope_factor=rope.get("factor", 1.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "linear"):
            refuse("rope_scaling.rope_type", kind, "only default and linear RoPE are implemented")
        scale = number("rope_factor", kind=float) if kind == "linear" else 1.0
        d, n = number("hidden_size"), number("num_attention_heads")
        eos = get("eos_token_id", 2)   # may be a list in HF configs
        config["eos_token_id"] = eos[0] if isinstance(eos, list) and eos else eos
        cfg = cls(vocab_size=number("vocab_size"), d_model=d, d_ff=number("intermediate_size"),
                  n_layers=number("num_hidden_layers"), n_heads=n,
                  n_kv_heads=number("num_key_value_heads", n),
                  head_dim=number("head_dim", d // n), rope_theta=number("rope_theta", kind=float),
                  rope_scale=scale, norm_eps=number("rms_norm_eps", 1e-6, float),
                  tie_embeddings=bool(get("tie_word_embeddings", False)),
                  max_positions=number("max_position_embeddings", 4096),
                  bos_id=number("bos_token_id", 1, least=0),
                  eos_id=number("eos_token_id", least=0))
        if cfg.n_heads % cfg.n_kv_heads:
            refuse("num_key_value_heads", cfg.n_kv_heads,
                   f"must divide num_attention_heads={cfg.n_heads}")
        return cfg

    def to_hf(self) -> dict:
        """The config.json that transformers needs to load an exported model."""
        return dict(architectures=["LlamaForCausalLM"], model_type="llama",
                    vocab_size=self.vocab_size, hidden_size=self.d_model,
                    intermediate_size=self.d_ff, num_hidden_layers=self.n_layers,
                    num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
                    head_dim=self.head_dim, rope_theta=self.rope_theta,
                    rope_scaling=None if self.rope_scale == 1.0 else
                    {"type": "linear", "rope_type": "linear", "factor": self.rope_scale},
                    rms_norm_eps=self.norm_eps, tie_word_embeddings=self.tie_embeddings,
                    max_position_embeddings=self.max_positions, hidden_act="silu",
                    bos_token_id=self.bos_id, eos_token_id=self.eos_id,
                    attention_bias=False, mlp_bias=False, torch_dtype="bfloat16")


LLAMA2_7B = Config()
LLAMA2_13B = Config(d_model=5120, d_ff=13_824, n_layers=40, n_heads=40, n_kv_heads=40)
LLAMA2_70B = Config(d_model=8192, d_ff=28_672, n_layers=80, n_heads=64, n_kv_heads=8)
TINY = Config(vocab_size=256, d_model=64, d_ff=160, n_layers=2, n_heads=4, n_kv_heads=2,
              head_dim=16, max_positions=512)   # tests and the built-in demo
PRESETS = {"7b": LLAMA2_7B, "13b": LLAMA2_13B, "70b": LLAMA2_70B, "tiny": TINY}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which projections get adapters, and their rank, scale and dropout (PEFT's defaults)."""
    r: int = 16                   # R
    alpha: float = 16.0           # the update is scaled by alpha / r
    dropout: float = 0.0          # on the adapter's input only, during training
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        bad = [t for t in self.targets if t not in PROJ]
        if bad or not self.targets:
            raise ValueError(f"LoRA targets {bad or '()'} not among {PROJ}")
        # One canonical order, so that ("v", "q") and ("q", "v") are the same configuration.
        object.__setattr__(self, "targets", tuple(t for t in PROJ if t in self.targets))
        if self.r < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"need r >= 1 and 0 <= dropout < 1, got r={self.r} "
                             f"dropout={self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@dataclasses.dataclass(frozen=True)
class Options:
    """How to run the model (never what it computes)."""
    remat: str = "none"       # none | min | dots | full | attn: what backward keeps (REMAT)
    attention: str = "auto"   # auto (cudnn on GPU, xla elsewhere) | cudnn | xla
    loss_chunk: int = 2048    # positions per cross-entropy chunk: (B, chunk, V/tp) fp32 logits
    mlp_chunk: int = 0        # positions per MLP chunk (0: all): smaller backward transients
                              # at long T; free with remat full/attn (see over_positions)
    chunk_layers: int = 0     # only the last N layers chunk their MLP (0: all of them): the
                              # peak is there, where every earlier layer's saved tensors are
                              # alive; earlier layers skip the chunks' cost. Unrolled layers only
    full_layers: int = 0      # the first N layers remat "full" whatever `remat` says: memory
                              # a layer at a time (each keeps one (B, T, D) instead of what the
                              # policy keeps); unrolled layers only (unstack_layers)
    sequence_parallel: bool = False   # split positions over "model" between parallel regions
    kernels: str = "xla"      # xla | pallas: the fused LoRA kernel of kernels/ (if present)
    packed: bool = True       # rows hold several examples: mask attention by segment. False
                              # (one example a row, padding at the end) needs no mask at all,
                              # which lets flash attention skip building a (T, T) one
    max_segments: int = 8     # packed rows: at most M runs of one segment id (examples, the
                              # padding tail; `batches` keeps to it), whose offsets cuDNN takes
                              # instead of a (T, T) mask; memory grows with M. 0: the mask

    def __post_init__(self):
        if self.loss_chunk < 1:
            raise ValueError(f"loss_chunk must be >= 1 position, got {self.loss_chunk}")
        if self.mlp_chunk < 0:
            raise ValueError(f"mlp_chunk must be >= 0 positions (0: no chunks), "
                             f"got {self.mlp_chunk}")
        for f in ("chunk_layers", "full_layers"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f} must be >= 0, got {getattr(self, f)}")
        if self.max_segments < 0 or self.max_segments == 1:
            raise ValueError(f"max_segments must be 0 (a (T, T) mask) or >= 2 (an example and "
                             f"the padding after it), got {self.max_segments}")
        if self.chunk_layers and not self.mlp_chunk:
            raise ValueError(f"chunk_layers={self.chunk_layers} chooses which layers run their "
                             f"MLP over chunks: it needs mlp_chunk > 0, the chunk size")


# ---------------------------------------------------------------------------------------------
# 2. Parameters, and how each is split over the mesh
# ---------------------------------------------------------------------------------------------

class Layer(NamedTuple):      # leaves (L, ...), or tuples of L (1, ...) slices: unstack_layers
    attn_norm: jax.Array      # (L, D)
    wq: jax.Array             # (L, D, N*H)   stored (in, out): HF's weight transposed
    wk: jax.Array             # (L, D, K*H)
    wv: jax.Array             # (L, D, K*H)
    wo: jax.Array             # (L, N*H, D)
    mlp_norm: jax.Array       # (L, D)
    w_gate: jax.Array         # (L, D, F)
    w_up: jax.Array           # (L, D, F)
    w_down: jax.Array         # (L, F, D)


class Params(NamedTuple):
    embed: jax.Array          # (V, D)
    layers: Layer
    final_norm: jax.Array     # (D,)
    lm_head: jax.Array        # (D, V') V' = V padded to 128 (masked); embed^T when tied


class LoraAB(NamedTuple):
    a: jax.Array              # (L, I, R) fp32
    b: jax.Array              # (L, R, O) fp32


class Lora(NamedTuple):       # None = no adapter on that projection (an empty pytree)
    q: LoraAB | None = None
    k: LoraAB | None = None
    v: LoraAB | None = None
    o: LoraAB | None = None
    gate: LoraAB | None = None
    up: LoraAB | None = None
    down: LoraAB | None = None


WEIGHT = dict(q="wq", k="wk", v="wv", o="wo", gate="w_gate", up="w_up", down="w_down")
TARGET = {w: t for t, w in WEIGHT.items()}


def param_specs() -> Params:
    """Params-shaped tree of PartitionSpecs: how each weight is laid out on the "model" axis."""
    col, row = P(None, None, MODEL), P(None, MODEL, None)
    return Params(embed=P(), final_norm=P(), lm_head=P(None, MODEL),
                  layers=Layer(attn_norm=P(), mlp_norm=P(), wq=col, wk=col, wv=col, wo=row,
                               w_gate=col, w_up=col, w_down=row))


def lora_specs(lcfg: LoraConfig) -> Lora:
    col = LoraAB(a=P(), b=P(None, None, MODEL))   # A replicated, B split like W's output
    row = LoraAB(a=P(None, MODEL, None), b=P())   # A split like W's input, B replicated
    return Lora(**{t: (col if t in COLUMN else row) for t in lcfg.targets})


def proj_shape(cfg: Config, target: str) -> tuple[int, int]:
    """(I, O) of one projection."""
    D, F, NH, KH = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return dict(q=(D, NH), k=(D, KH), v=(D, KH), o=(NH, D), gate=(D, F), up=(D, F),
                down=(F, D))[target]


def param_shapes(cfg: Config) -> Params:
    L, D, V = cfg.n_layers, cfg.d_model, cfg.vocab_size
    w = {WEIGHT[t]: (L, *proj_shape(cfg, t)) for t in PROJ}
    return Params(embed=(V, D), final_norm=(D,), lm_head=(D, cfg.padded_vocab),
                  layers=Layer(attn_norm=(L, D), mlp_norm=(L, D), **w))


def init_params(key, cfg: Config, dtype=jnp.bfloat16) -> Params:
    """Random weights (normal, std 0.02; norms 1) for tests and benchmarks. Jit it with
    out_shardings to create a large model directly in its sharded layout."""
    shapes, keys = param_shapes(cfg), iter(jax.random.split(key, 4 + len(Layer._fields)))
    init = lambda name, shape: (jnp.ones(shape, dtype) if name.endswith("norm") else
                                0.02 * jax.random.normal(next(keys), shape, dtype))
    return Params(embed=init("embed", shapes.embed), final_norm=init("norm", shapes.final_norm),
                  lm_head=init("lm_head", shapes.lm_head),
                  layers=Layer(**{f: init(f, s) for f, s in shapes.layers._asdict().items()}))


def unstack_layers(params: Params, free: bool = False) -> Params:
    """Stacked layers (each leaf (L, ...)) -> each leaf a tuple of L one-layer slices (1, ...).
    Under lax.scan XLA copies each layer's weights out of the stack for cuBLAS (16% of a 7B step
    on an H200); unrolled, each GEMM reads its weight in place (+15%; longer compiles). Slices
    keep their ranks, so param_specs() holds. free: delete each stacked leaf once split (peak:
    one leaf more, not two models), only if no other array shares its buffer."""
    split = jax.jit(lambda a: tuple(a[i:i + 1] for i in range(a.shape[0])))
    layers = {}
    for f, leaf in params.layers._asdict().items():
        layers[f] = leaf if isinstance(leaf, tuple) else split(leaf)
        if free and isinstance(leaf, jax.Array):
            leaf.delete()
    return params._replace(layers=Layer(**layers))


def layer_slice(leaf, i: int):
    """Layer i of a stacked (L, ...) or unstacked (tuple of (1, ...)) leaf, as (1, ...)."""
    return leaf[i] if isinstance(leaf, tuple) else leaf[i:i + 1]


def init_lora(key, cfg: Config, lcfg: LoraConfig) -> Lora:
    """A ~ U(-1/sqrt(I), 1/sqrt(I)) (PEFT's kaiming_uniform_ with a=sqrt(5)), B = 0: fp32."""
    keys = jax.random.split(key, len(lcfg.targets))
    out = {}
    for k, t in zip(keys, lcfg.targets):
        (i, o), L = proj_shape(cfg, t), cfg.n_layers
        a = jax.random.uniform(k, (L, i, lcfg.r), jnp.float32, -1.0, 1.0) / math.sqrt(i)
        out[t] = LoraAB(a=a, b=jnp.zeros((L, lcfg.r, o), jnp.float32))
    return Lora(**out)


def make_mesh(tp: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ("data", "model") mesh: tp devices per model group, the rest data-parallel."""
    devices = list(jax.devices() if devices is None else devices)
    if tp < 1 or len(devices) % tp:
        raise ValueError(f"--tp {tp} must divide the number of devices ({len(devices)})")
    # Auto axes: jit may reshard a misplaced input instead of refusing it.
    return jax.make_mesh((len(devices) // tp, tp), (DATA, MODEL),
                         axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def check_tp(cfg: Config, tp: int):
    """Refuse layouts the Megatron split cannot express, naming the numbers."""
    for name, n, why in (("num_key_value_heads", cfg.n_kv_heads, "whole KV heads (they are "
                          "not replicated)"), ("num_attention_heads", cfg.n_heads, "whole heads"),
                         ("intermediate_size", cfg.d_ff, "equal MLP slices"),
                         ("padded vocabulary", cfg.padded_vocab, "equal vocabulary slices")):
        if n % tp:
            raise ValueError(f"{name}={n} is not divisible by tp={tp}: each device must hold "
                             f"{why}; choose a tp that divides it")


def shard(tree, specs, mesh):
    """Place every array of `tree` on `mesh`, split as the congruent `specs` tree says.
    On several hosts every process passes the same host values and sends only its own
    devices' slices."""
    def put(x, spec):
        sharding = NamedSharding(mesh, spec)
        if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(put, tree, specs)


# ---------------------------------------------------------------------------------------------
# 3. Checkpoint I/O: HF safetensors in, merged HF and PEFT adapters out
# ---------------------------------------------------------------------------------------------

HF_NAME = dict(wq="self_attn.q_proj", wk="self_attn.k_proj", wv="self_attn.v_proj",
               wo="self_attn.o_proj", w_gate="mlp.gate_proj", w_up="mlp.up_proj",
               w_down="mlp.down_proj", attn_norm="input_layernorm",
               mlp_norm="post_attention_layernorm")


def load_tensors(path: str) -> dict[str, np.ndarray]:
    """A whole safetensors file; an unreadable one (truncated, not safetensors) is named."""
    from safetensors.numpy import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return load_file(path)
    except Exception as e:   # safetensors' own error names no file
        raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt "
                         f"({str(e).splitlines()[0][:200]})") from None


def _hf_tensor_index(folder: str) -> dict[str, str]:
    """tensor name -> safetensors file, for a single file or an index + shards."""
    from safetensors import safe_open
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(index):
        weight_map = read_json(index, dict, "an index object").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                       for v in weight_map.values()):
            raise ValueError(f"{index}: no 'weight_map' object (tensor name -> file name)")
        files = set(weight_map.values())
        if os.path.exists(single) and files != {"model.safetensors"}:
            raise ValueError(f"{folder}: holds both model.safetensors and "
                             f"model.safetensors.index.json (naming {len(files)} other "
                             f"file(s)); which is the model? Remove the other")
        for f in sorted(files):
            if not os.path.isfile(os.path.join(folder, f)):
                raise FileNotFoundError(f"{index}: names {f}, which is not in {folder}")
        return {k: os.path.join(folder, v) for k, v in weight_map.items()}
    if not os.path.exists(single):
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    try:
        with safe_open(single, "numpy") as f:
            return {k: single for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{single}: not a readable safetensors file ({e})") from None


def _read(files: dict[str, str], name: str, want_shape, index) -> np.ndarray:
    """The slice `index` of HF tensor `name`, checked against `want_shape`. The file is opened
    for this read alone: its mapped pages do not stay resident while the rest loads."""
    from safetensors import safe_open
    if name not in files:
        raise ValueError(f"checkpoint has no tensor '{name}' (expected shape {want_shape})")
    path = files[name]
    try:
        with safe_open(path, "numpy") as f:
            sl = f.get_slice(name)
            shape = tuple(sl.get_shape())
            if shape != tuple(want_shape):
                raise ValueError(f"{path}: tensor '{name}' has shape {shape}, "
                                 f"the config needs {tuple(want_shape)}")
            return sl[index]
    except ValueError:
        raise
    except Exception as e:   # truncated or corrupt file: safetensors' own message is terse
        raise ValueError(f"{path}: cannot read tensor '{name}' ({e})") from None


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("axis", "hf"))
def _put(buffer, piece, at, *, axis: int, hf: bool):
    """buffer with `piece` written at offset `at` of `axis`, in place (the buffer is donated);
    hf: the piece is in torch's (..., O, I) layout, transposed here, on the device."""
    piece = jnp.swapaxes(piece, -1, -2) if hf else piece
    return jax.lax.dynamic_update_slice_in_dim(buffer, piece.astype(buffer.dtype), at, axis)


def _place(shape, spec, mesh, dtype, fill, *, hf: bool = False) -> jax.Array:
    """A global array on `mesh` from fill(index) -> (piece, offset, axis) numpy pieces of
    this device's slice `index` (hf: each in torch's transposed layout). Each piece is read
    once, sent to every local device whose slice it belongs to, cast, transposed and written
    into place there, and dropped: host memory holds about one piece (one layer's slice of a
    stacked weight), whatever the number of devices."""
    sharding = NamedSharding(mesh, spec)
    where = sharding.addressable_devices_indices_map(shape)
    key = lambda index: tuple((s.start, s.stop, s.step) for s in index)
    groups = {}
    for device, index in where.items():
        groups.setdefault(key(index), (index, []))[1].append(device)
    arrays = {}
    for index, devices in groups.values():
        size = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))
        for d in devices:   # zeros: lm_head's padding columns are never written
            arrays[d] = jnp.zeros(size, dtype, device=d)
        for piece, at, axis in fill(index):
            for d in devices:
                arrays[d] = _put(arrays[d], jax.device_put(piece, d), at, axis=axis, hf=hf)
                arrays[d].block_until_ready()
            del piece
    return jax.make_array_from_single_device_arrays(shape, sharding,
                                                    [arrays[d] for d in where])


def load_hf(folder: str, dtype=jnp.bfloat16, mesh=None) -> tuple[Config, Params]:
    """Load an HF Llama folder -> (Config, Params) placed on `mesh` (default: one device).

    Each device's slice of each parameter is read straight from the safetensors files one
    layer at a time, sent, and cast and transposed on the device: host memory holds about one
    layer's slice at a time, never the model, whatever the number of devices.
    """
    cfg = Config.from_hf(folder)
    mesh = make_mesh(1, jax.devices()[:1]) if mesh is None else mesh
    check_tp(cfg, mesh.shape[MODEL])
    files = _hf_tensor_index(folder)
    shapes, specs = param_shapes(cfg), param_specs()
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(cfg.n_layers) for n in HF_NAME.values()}
    if not cfg.tie_embeddings:
        expected.add("lm_head.weight")
    unexpected = sorted(set(files) - expected - {"lm_head.weight"}
                        - {k for k in files if "rotary_emb" in k})
    if unexpected:
        raise ValueError(f"{folder}: unexpected tensor '{unexpected[0]}' "
                         f"({len(unexpected)} in all) for config {cfg}")
    missing = sorted(expected - set(files))
    if missing:
        raise ValueError(f"{folder}: checkpoint has no tensor '{missing[0]}' "
                         f"({len(missing)} missing in all)")
    dt = jnp.dtype(dtype)

    def stacked(field):   # (L, I, O) from model.layers.{i}.<name>.weight (O, I)
        shape, name = getattr(shapes.layers, field), HF_NAME[field]

        def fill(index):   # layer i as a (1, O, I) piece at row j of this slice
            for j, i in enumerate(range(*index[0].indices(shape[0]))):
                x = _read(files, f"model.layers.{i}.{name}.weight", shape[1:][::-1],
                          index[1:][::-1])
                yield x[None], j, 0
        return _place(shape, getattr(specs.layers, field), mesh, dt, fill,
                      hf=len(shape) == 3)

    def head(index):      # (D, V') from (V, D); the padding columns stay zero
        cols = range(*index[1].indices(shapes.lm_head[1]))
        real = [c for c in cols if c < cfg.vocab_size]
        if real:
            name = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
            yield _read(files, name, (cfg.vocab_size, cfg.d_model),
                        (slice(real[0], real[-1] + 1), index[0])), 0, 1

    def plain(name, shape):
        def fill(index):
            yield _read(files, name, shape, index), 0, 0
        return fill

    params = Params(
        embed=_place(shapes.embed, specs.embed, mesh, dt,
                     plain("model.embed_tokens.weight", shapes.embed)),
        layers=Layer(**{f: stacked(f) for f in Layer._fields}),
        final_norm=_place(shapes.final_norm, specs.final_norm, mesh, dt,
                          plain("model.norm.weight", shapes.final_norm)),
        lm_head=_place(shapes.lm_head, specs.lm_head, mesh, dt, head, hf=True))
    return cfg, params


def to_host(x) -> np.ndarray:
    """Gather a (possibly sharded, possibly multi-process) array into host memory. On several
    hosts this is a collective: every process must call it."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _one_device(x):
    """x gathered onto this process's first device: a computation there then sees the same
    inputs whatever the mesh, so that every layout exports bit-identical files."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = to_host(x)   # several hosts: a collective
    return jax.device_put(x, jax.local_devices()[0])


@functools.partial(jax.jit, static_argnames=("dtype", "hf"))
def _merged(w, a, b, scale, *, dtype, hf: bool):
    """W (..., I, O) + scale * A (..., I, R) @ B (..., R, O) in fp32, cast to dtype; hf: the
    trailing axes transposed to torch's (O, I). Exact fp32 products: no TF32 for a merge."""
    y = w.astype(jnp.float32)
    if a is not None:
        y = y + scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                                   precision=jax.lax.Precision.HIGHEST)
    y = y.astype(dtype)
    # transposed apart from the cast: fused, XLA's CPU backend runs the pair ~4x slower
    return jnp.swapaxes(jax.lax.optimization_barrier(y), -1, -2) if hf else y


def merge_lora(w, ab: LoraAB | None, lcfg: LoraConfig, dtype=None, hf: bool = False):
    """W + scale * A @ B for stacked (L, I, O) or one layer's (I, O) weights -> numpy, in
    `dtype` (default W's); hf: in torch's (..., O, I) layout. Computed on one device, in
    fp32, one tensor at a time; only the result comes to the host (for export)."""
    a, b = (None, None) if ab is None else (_one_device(ab.a), _one_device(ab.b))
    out = _merged(_one_device(w), a, b, lcfg.scale if ab is not None else 0.0,
                  dtype=jnp.dtype(dtype or w.dtype), hf=hf)
    return np.asarray(out)


SAFETENSORS_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64",
                     "int32": "I32", "int64": "I64", "uint8": "U8", "bool": "BOOL"}


def _write_safetensors(path: str, items, metadata: dict | None = None):
    """Stream tensors into a safetensors file: items = [(name, shape, dtype, get)], get() ->
    numpy. The header is written from the shapes first, then each tensor is fetched, written
    and dropped, so only one tensor is in host memory at a time (save_file holds them all)."""
    header, at = {"__metadata__": metadata} if metadata else {}, 0
    for name, shape, dtype, _ in items:
        n = math.prod(shape) * jnp.dtype(dtype).itemsize
        header[name] = dict(dtype=SAFETENSORS_DTYPE[jnp.dtype(dtype).name], shape=list(shape),
                            data_offsets=[at, at + n])
        at += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # tensors start 8-byte aligned, as safetensors writes them
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name, shape, dtype, get in items:
            x = np.ascontiguousarray(get())
            if x.shape != tuple(shape) or x.dtype != jnp.dtype(dtype):
                raise AssertionError(f"{name}: {x.shape} {x.dtype}, planned {shape} {dtype}")
            f.write(x.view(np.uint8).data if x.size else b"")   # bf16 has no buffer format
            del x


def _atomic_dir(folder: str, write):
    """Run write(tmp_folder), then swap it into place: a crash never leaves half a folder.
    Only process 0 writes; the others run write(None), taking part in any collectives."""
    if jax.process_index() != 0:
        return write(None)
    folder = os.path.abspath(folder)
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write(tmp)
    except BaseException as e:   # a full disk, Ctrl-C, ...: no partial folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            why = os.strerror(e.errno) if getattr(e, "errno", None) else str(e).splitlines()[0]
            raise OSError(f"cannot write {folder} ({why}); the partial "
                          f"{os.path.basename(tmp)} was removed") from None
        raise
    if os.path.exists(folder):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def export_merged(folder: str, cfg: Config, params: Params, lora: Lora | None = None,
                  lcfg: LoraConfig | None = None, source: str | None = None,
                  dtype=jnp.bfloat16, shard_bytes: int = 5 * 2**30):
    """Write an HF Llama folder (W + scale*A@B merged) that transformers loads.

    Files of about `shard_bytes` with model.safetensors.index.json when larger; config.json
    from `cfg`; tokenizer files copied from `source` (the folder the model came from). Each
    tensor is merged and cast on a device, fetched, written and dropped: host memory holds one
    tensor at a time.
    """
    dt = jnp.dtype(dtype)
    items = [("model.embed_tokens.weight", params.embed.shape,
              lambda: merge_lora(params.embed, None, lcfg, dt))]
    shapes = param_shapes(cfg).layers
    for i in range(cfg.n_layers):
        for f, hf in HF_NAME.items():   # layer i's slice is taken only when written
            w, ab = getattr(params.layers, f), getattr(lora or Lora(), TARGET.get(f, "_"), None)
            get = (lambda w=w, i=i, ab=ab, matrix=not f.endswith("norm"): merge_lora(
                layer_slice(w, i)[0], ab and LoraAB(ab.a[i], ab.b[i]), lcfg, dt,
                hf=matrix))   # matrices in torch's (O, I) layout
            items.append((f"model.layers.{i}.{hf}.weight", getattr(shapes, f)[1:][::-1], get))
    items.append(("model.norm.weight", params.final_norm.shape,
                  lambda: merge_lora(params.final_norm, None, lcfg, dt)))
    if not cfg.tie_embeddings:   # (V, D): the padding columns stay behind
        items.append(("lm_head.weight", params.embed.shape,
                      lambda: merge_lora(params.lm_head, None, lcfg, dt, hf=True)
                      [:cfg.vocab_size]))
    nbytes = lambda shape: math.prod(shape) * dt.itemsize
    files, size = [[]], 0      # plan the files from the shapes alone
    for item in items:
        if files[-1] and size + nbytes(item[1]) > shard_bytes:
            files.append([])
            size = 0
        files[-1].append(item)
        size += nbytes(item[1])
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])

    def write(tmp):
        for fname, group in zip(names, files):
            if tmp:
                _write_safetensors(os.path.join(tmp, fname),
                                   [(n, s, dt, get) for n, s, get in group], {"format": "pt"})
            else:   # another process: take part in the gathers, write nothing
                for _, _, get in group:
                    get()
        if not tmp:
            return
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(nbytes(x) for _, x, _ in items)},
                     "weight_map": {n: f for f, g in zip(names, files) for n, _, _ in g}}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        hf = dict(cfg.to_hf(), torch_dtype=dt.name)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                     "tokenizer.json", "generation_config.json"):
            if source and os.path.exists(os.path.join(source, name)):
                shutil.copy(os.path.join(source, name), tmp)

    _atomic_dir(folder, write)


PEFT_NAME = {t: HF_NAME[w] for t, w in WEIGHT.items()}   # q -> "self_attn.q_proj", ...


def export_adapter(folder: str, cfg: Config, lora: Lora, lcfg: LoraConfig,
                   base_model: str = ""):
    """Write a PEFT LoRA adapter: adapter_config.json + adapter_model.safetensors.

    Keys base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight (R, I) and
    ...lora_B.weight (O, R): torch.nn.Linear's (out, in) layout.
    """
    from safetensors.numpy import save_file
    tensors = {}
    for t in lcfg.targets:
        ab = getattr(lora, t)
        a, b = to_host(ab.a), to_host(ab.b)   # (L, I, R), (L, R, O) fp32
        for i in range(cfg.n_layers):
            key = f"base_model.model.model.layers.{i}.{PEFT_NAME[t]}"
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=lcfg.r, lora_alpha=lcfg.alpha,
                  lora_dropout=lcfg.dropout, bias="none", fan_in_fan_out=False,
                  target_modules=[PEFT_NAME[t].split(".")[1] for t in lcfg.targets],
                  base_model_name_or_path=base_model, inference_mode=True,
                  init_lora_weights=True, use_rslora=False, use_dora=False,
                  modules_to_save=None, layers_to_transform=None)

    def write(tmp):
        if tmp is None:
            return
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)

    _atomic_dir(folder, write)


def load_adapter(folder: str, cfg: Config) -> tuple[Lora, LoraConfig]:
    """Read a PEFT LoRA adapter folder (as export_adapter writes) -> (Lora, LoraConfig)."""
    path = os.path.join(folder, "adapter_config.json")
    c = read_json(path, dict, "a JSON object (a PEFT adapter config)")
    if c.get("peft_type", "LORA") != "LORA" or c.get("use_dora") or c.get("use_rslora"):
        raise ValueError(f"{folder}: only plain LoRA adapters are supported")
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        if not isinstance(c.get(key), kind) or isinstance(c[key], bool) or c[key] <= 0:
            raise ValueError(f"{path}: field '{key}' is {c.get(key, 'missing')!r}; it must be a "
                             f"number > 0")
    w = load_tensors(os.path.join(folder, "adapter_model.safetensors"))
    layers = {int(i) for n in w if ".layers." in n
              if (i := n.split(".layers.")[1].split(".")[0]).isdigit()}
    if layers and max(layers) >= cfg.n_layers:
        raise ValueError(f"{folder}: adapter has factors for layer {max(layers)}, the model has "
                         f"{cfg.n_layers} layers: it was made for another model")
    # The targets are the modules with factors in the file (target_modules may be a list, a
    # regular expression or "all-linear"); a factor on any other module could not be applied.
    modules = {n.split(".")[-3] for n in w if ".lora_" in n}
    known = {PEFT_NAME[t].split(".")[1]: t for t in PROJ}
    if modules - set(known) or not modules:
        raise ValueError(f"{folder}: adapter has LoRA factors on {sorted(modules) or 'nothing'}; "
                         f"only {sorted(known)} are supported")
    targets = tuple(known[m] for m in modules)
    lcfg = LoraConfig(r=int(c["r"]), alpha=float(c["lora_alpha"]),
                      dropout=float(c.get("lora_dropout", 0.0)), targets=targets)
    out = {}
    for t in targets:
        i_, o_ = proj_shape(cfg, t)
        a, b = [], []
        for i in range(cfg.n_layers):
            key = f"base_model.model.model.layers.{i}.{PEFT_NAME[t]}"
            for part, want, dst in (("lora_A", (lcfg.r, i_), a), ("lora_B", (o_, lcfg.r), b)):
                name = f"{key}.{part}.weight"
                if name not in w:
                    raise ValueError(f"{folder}: adapter has no tensor '{name}'")
                if w[name].shape != want:
                    raise ValueError(f"{folder}: '{name}' has shape {w[name].shape}, "
                                     f"expected {want}")
                dst.append(w[name].astype(np.float32).T)
        out[t] = LoraAB(a=jnp.asarray(np.stack(a)), b=jnp.asarray(np.stack(b)))
    return Lora(**out), lcfg


# ---------------------------------------------------------------------------------------------
# 4. Model (the body runs inside shard_map: shapes are per device)
# ---------------------------------------------------------------------------------------------

def rms_norm(x, w, eps):
    """x (..., D) -> same dtype; statistics in fp32 (Zhang & Sennrich 2019)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * y.astype(x.dtype)   # HF multiplies in the activation dtype


def rope(x, positions, cfg: Config):
    """Rotary embedding in HF's rotate-half layout: pairs (x[i], x[i + H/2]) are rotated.

    x (B, T, X, H), positions (B, T) -> (B, T, X, H). HF checkpoints store q/k rows in this
    layout, so their weights load unpermuted.
    """
    H = x.shape[-1]
    inv_freq = cfg.rope_theta ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)    # (H/2,)
    angle = (positions.astype(jnp.float32) / cfg.rope_scale)[..., None] * inv_freq  # (B, T, H/2)
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def mix32(x):
    """A bijective hash of uint32 values (Wellons' "lowbias32"): each input bit flips about half
    of the output bits, so counters 0, 1, 2, ... come out as independent-looking random bits."""
    x = jnp.asarray(x).astype(jnp.uint32)
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


class Dropout(NamedTuple):
    """Where a projection's input sits in the global tensor, for its dropout mask: a hash of
    (seed, global row, global position, global feature). The mask is thus the same however
    rows, positions or features are split over devices, chunks or layers, and it costs a few
    integer operations an element, fused where it is applied: no random tensor is stored."""
    seed: jax.Array           # () uint32: one per (step, micro-batch, layer, projection)
    row: jax.Array | int = 0  # offsets of this device's x (B, T, I) in the global (B, T, I)
    pos: jax.Array | int = 0
    feat: jax.Array | int = 0

    def apply(self, x, p: float):
        """x (B, T, I) with each element zeroed with probability p, survivors scaled by 1/(1-p)."""
        B, T, I = x.shape
        iota = lambda n, at: (jnp.arange(n, dtype=jnp.uint32) + jnp.asarray(at).astype(jnp.uint32))
        row = mix32(self.seed ^ mix32(iota(B, self.row)))[:, None, None]             # (B, 1, 1)
        pos = mix32(row + iota(T, self.pos)[None, :, None])                           # (B, T, 1)
        bits = mix32(pos ^ (iota(I, self.feat) * jnp.uint32(0x9E3779B9)))             # (B, T, I)
        keep = bits >= jnp.uint32(min(round(p * 2.0**32), 2**32 - 1))
        return jnp.where(keep, x * (1.0 / (1.0 - p)), 0).astype(x.dtype)


def project(x, w, ab: LoraAB | None, lcfg: LoraConfig | None, drop: Dropout | None = None,
            fused=False):
    """x (B, T, I) @ w (I, O) [+ scale * dropout(x) @ A @ B] -> (B, T, O); never forms A @ B.

    drop: where x sits, for the dropout mask (None: no dropout, as in evaluation).
    fused: the same op as one Pallas kernel from kernels/ (optional: imported only here).
    """
    dropping = drop is not None and ab is not None and lcfg.dropout > 0
    if fused and ab is not None and not dropping:
        from kernels.lora_matmul import lora_matmul
        B, T, I = x.shape
        y = lora_matmul(x.reshape(B * T, I), w, ab.a, ab.b, lcfg.scale,
                        interpret=jax.default_backend() != "gpu")
        return y.reshape(B, T, -1)
    y = jnp.einsum("BTI,IO->BTO", x, w)
    if ab is None:
        return y
    return y + lora_delta(drop.apply(x, lcfg.dropout) if dropping else x, ab.a, ab.b, lcfg.scale)


def lora_delta(x, a, b, scale: float):
    """scale * x (B, T, I) @ A (I, R) @ B (R, O) -> (B, T, O) in x's dtype.

    Every (B, T, .) tensor stays in x's dtype, so XLA adds the result to x @ W in that GEMM's
    epilogue (an fp32 result cost an fp32 write and an add kernel: bench/NOTES.md change 14).
    Every matmul accumulates in fp32; the scale multiplies only (B, T, R) tensors. The backward
    is written out so that dA and dB, sums over all positions, are fp32 (autodiff's are bf16:
    5x less accurate under jit on XLA's CPU backend).
    """
    return _lora_delta(*_vary_alike(x, a, b), scale)


def _vary_alike(*xs):
    """Inside shard_map: each x cast to the union of the operands' varying mesh axes. Done
    before a custom_vjp (whose rule sees operands already alike), the casts' transposes sum
    the gradient of an operand that is the same on every slice of an axis over that axis
    (a row-parallel LoRA A differs per model slice, B does not; so does lm_head, h not)."""
    types = [getattr(jax.typeof(x), "manual_axis_type", None) for x in xs]
    if any(t is None for t in types):   # not inside shard_map
        return xs
    union = frozenset().union(*(t.varying for t in types))
    return tuple(jax.lax.pcast(x, tuple(sorted(union - t.varying)), to="varying")
                 if union - t.varying else x for x, t in zip(xs, types))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lora_delta(x, a, b, scale):
    return _lora_fwd(x, a, b, scale)[0]


def _lora_fwd(x, a, b, scale):
    f32, dt = jnp.float32, x.dtype
    xa = (scale * jnp.einsum("BTI,IR->BTR", x, a.astype(dt), preferred_element_type=f32)
          ).astype(dt)                                                          # (B, T, R)
    return jnp.einsum("BTR,RO->BTO", xa, b.astype(dt)), (x, xa, a, b)


def _lora_bwd(scale, res, g):   # g (B, T, O): the output's gradient, in x's dtype
    x, xa, a, b = res
    f32, dt = jnp.float32, x.dtype
    gb = scale * jnp.einsum("BTO,RO->BTR", g, b.astype(dt), preferred_element_type=f32)
    gb = gb.astype(dt)                                  # (B, T, R): the gradient of x @ A
    dx = jnp.einsum("BTR,IR->BTI", gb, a.astype(dt))                            # (B, T, I)
    da = jnp.einsum("BTI,BTR->IR", x, gb, preferred_element_type=f32)
    db = jnp.einsum("BTR,BTO->RO", xa, g, preferred_element_type=f32)
    return dx, da.astype(a.dtype), db.astype(b.dtype)


_lora_delta.defvjp(_lora_fwd, _lora_bwd)


def attend_masked(q, k, v, allowed):
    """Grouped-query attention. q (B, T, N, H), k/v (B, S, K, H), allowed (B, T, S) bool
    -> (B, T, N, H). Query head n reads KV head n // G, so no KV head is ever copied."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)                                            # (B,T,K,G,H)
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * H ** -0.5
    p = jax.nn.softmax(jnp.where(allowed[:, None, None], s, -jnp.inf), axis=-1)   # fp32
    return jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v).reshape(B, T, N, H)


def segment_runs(segment_ids, max_runs: int):
    """segment_ids (B, T) -> (starts (B, M + 1), lengths (B, M)) int32 of each row's runs of
    equal id, in order, -1 past the last (cuDNN's packed layout); M = max_runs. A row with
    more runs than M does not fit (its starts[:, M] is then >= 0): `loss` refuses such
    batches on the host (count_runs), and attend turns them into NaN under jit."""
    B, T = segment_ids.shape
    new = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    run = jnp.cumsum(new, axis=1, dtype=jnp.int32) - 1                     # (B, T): its run
    r = jnp.arange(max_runs + 1, dtype=jnp.int32)
    starts = jnp.sum(run[:, :, None] < r, axis=1, dtype=jnp.int32)   # (B, M+1): T past the end
    present = r < run[:, -1:] + 1                                            # (B, M+1)
    lengths = jnp.where(present[:, :-1], starts[:, 1:] - starts[:, :-1], -1)
    return jnp.where(present, starts, -1), lengths


def count_runs(segment_ids) -> int:   # on the host: the most runs in any row of a batch
    s = np.asarray(segment_ids)
    return int((1 + (s[:, 1:] != s[:, :-1]).sum(1)).max()) if s.size else 0


def check_runs(segment_ids, opts: Options):
    """Refuse a concrete batch whose packed rows have more runs of one segment id than
    Options.max_segments (under jit, traced batches cannot be read: attend flags them)."""
    if (not opts.packed or not opts.max_segments or segment_ids is None
            or isinstance(segment_ids, jax.core.Tracer)
            or not getattr(segment_ids, "is_fully_addressable", True)):
        return
    if (n := count_runs(segment_ids)) > opts.max_segments:
        raise ValueError(f"a packed row holds {n} runs of one segment id (examples and "
                         f"padding), more than Options.max_segments={opts.max_segments}: "
                         f"raise it, or pack fewer examples a row")


def attend(q, k, v, segment_ids, impl: str, max_segments: int = 0):
    """Causal self-attention over one sequence. q (B, T, N, H), k/v (B, T, K, H) -> like q.

    segment_ids (B, T) or None: a position attends only within its own segment (packing).
    cuDNN with max_segments > 0 gets each row's runs of one segment id as offsets (at most
    max_segments of them) and attends within each run alone, skipping the blocks across runs
    (its backward keeps ~an fp32 (T, N, H) a run); else a (T, T) mask, read as an additive bias.
    """
    if impl == "auto":
        impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    T = q.shape[1]
    if impl == "cudnn" and segment_ids is not None and max_segments:
        # jax's public API takes no offsets (0.11.2); its cuDNN wrapper does
        from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
        starts, lengths = segment_runs(segment_ids, max_segments)
        o = dot_product_attention(q, k, v, None, None, lengths, lengths, starts, starts,
                                  scale=q.shape[-1] ** -0.5, mask_type=MaskType.CAUSAL)
        # a row with more runs than the offsets hold has a start in their last slot, and cuDNN
        # then spoils other rows too (seen on an H200): all NaN, so that a jitted step flags it
        # (a non-finite loss) instead of training on attention across examples
        return jnp.where(jnp.any(starts[:, -1] >= 0), jnp.nan, o)
    same = None if segment_ids is None else segment_ids[:, :, None] == segment_ids[:, None, :]
    if impl == "cudnn":   # flash attention: (T, T) scores are never stored
        return jax.nn.dot_product_attention(q, k, v, mask=None if same is None else
                                            same[:, None], is_causal=True,
                                            implementation="cudnn")
    allowed = jnp.tril(jnp.ones((T, T), bool))[None]                               # s <= t
    return attend_masked(q, k, v, allowed if same is None else allowed & same)


name = checkpoint_name   # tags a value for the remat policy; otherwise the identity


def decoder_layer(x, w: Layer, ab: Lora, positions, attn, cfg: Config,
                  lcfg: LoraConfig | None, drop: Dropout | None = None, sp: bool = False,
                  fused: bool = False, mlp_chunk=None):
    """One pre-norm Llama block. x (B, T, D), replicated over "model" -> ((B, T, D), aux).

    attn(q, k, v) -> (o, aux) does the attention proper: plain causal attention when training,
    attention over a KV cache (aux = the updated cache) when generating.
    drop: this layer's dropout seed and this device's first global row (None: no dropout).
    sp (sequence parallelism, Korthikanti et al. 2022): x is (B, T/tp, D), this device's slice
    of the positions; it is all-gathered before the column-parallel projections, and the
    row-parallel sums are reduce-scattered back to slices instead of all-reduced. The same bytes
    move, but norms, residuals and the activations remat keeps shrink by tp.
    fused: LoRA projections through the Pallas kernel (see project).
    mlp_chunk: None, or (positions, remat policy): run the MLP over chunks (over_positions).
    """
    if sp:
        gather = lambda h: jax.lax.all_gather(h, MODEL, axis=1, tiled=True)     # (B, T, D)
        reduce = lambda y: jax.lax.psum_scatter(y, MODEL, scatter_dimension=1, tiled=True)
    else:
        gather, reduce = (lambda h: h), (lambda y: jax.lax.psum(y, MODEL))

    def mask(target, x, pos=0):   # projection `target`'s dropout mask for its input x
        if drop is None:
            return None
        # row-parallel inputs (o, down) hold this device's slice of the features
        feat = 0 if target in COLUMN else jax.lax.axis_index(MODEL) * x.shape[-1]
        return drop._replace(seed=mix32(drop.seed + PROJ.index(target)), pos=pos, feat=feat)

    h = gather(rms_norm(x, w.attn_norm, cfg.norm_eps))
    B, T, _ = h.shape
    q, k, v = (project(h, getattr(w, WEIGHT[t]), getattr(ab, t), lcfg, mask(t, h), fused)
               .reshape(B, T, -1, cfg.head_dim) for t in ("q", "k", "v"))  # (B, T, N/tp or K/tp, H)
    # Names mark what remat="min" keeps: every matmul output the backward pass needs.
    q, k, v = (name(y, n) for y, n in ((rope(q, positions, cfg), "q"),
                                        (rope(k, positions, cfg), "k"), (v, "v")))
    o, aux = attn(q, k, v)                                                 # (B, T, N/tp, H)
    o = name(o.reshape(B, T, -1), "attn")
    x = name(x + reduce(project(o, w.wo, ab.o, lcfg, mask("o", o), fused)), "resid")  # row-par.
    h = gather(rms_norm(x, w.mlp_norm, cfg.norm_eps))

    def mlp(h, s):   # h (B, C, D), positions [s, s + C) -> this device's partial (B, C, D)
        g = name(project(h, w.w_gate, ab.gate, lcfg, mask("gate", h, s), fused), "gate")
        u = name(project(h, w.w_up, ab.up, lcfg, mask("up", h, s), fused), "up")  # (B, C, F/tp)
        gu = jax.nn.silu(g) * u
        return project(gu, w.w_down, ab.down, lcfg, mask("down", gu, s), fused)

    y = mlp(h, 0) if mlp_chunk is None else over_positions(mlp, h, *mlp_chunk)
    return x + reduce(y), aux


def over_positions(f, h, chunk: int, policy):
    """f(h (B, C, D), s) -> (B, C, O), applied to the chunks h[:, s:s + C] of h (B, T, D) in turn.

    Each chunk is checkpointed under `policy` (the layer's), so the backward recomputes one chunk
    at a time: the MLP's (B, T, F) transients, the largest at long T, shrink to (B, C, F); free
    with `full`/`attn` remat. Unrolled chunks of 2,048 are measured (bench/NOTES.md, change 10).
    """
    if policy is not None:   # (None: the layer is not rematerialised, nor are its chunks)
        f = jax.checkpoint(f, policy=policy, static_argnums=(1,))
    T = h.shape[1]
    return jnp.concatenate([f(h[:, s:s + chunk], s) for s in range(0, T, chunk)], 1)


def keep_attention(prim, *_, **__) -> bool:
    """Remat policy: save only the cuDNN attention forward's outputs (result and softmax stats).
    Its backward rule reads those very outputs, so a checkpoint_name on the result would not
    stop the kernel from running again. (Offloading them to host was slower, and bigger.)"""
    return prim.name.startswith("dot_product_attention_fwd")


# none: XLA keeps whatever autodiff wants (fast, most memory); min: keep the named matmul
# outputs, recompute norms, RoPE, SiLU and the attention kernel; dots: keep every matmul output;
# full: keep each layer's input, recompute the layer (least memory, ~1/3 more FLOPs); attn: full,
# but the O(T^2) attention forward runs once (cuDNN; +1 (B, T, D) a layer; XLA path: as full).
# Options.full_layers mixes them: the first N layers full, the rest under the chosen policy.
REMAT = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
         "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
         "min": jax.checkpoint_policies.save_only_these_names(
             "q", "k", "v", "attn", "resid", "gate", "up"),
         "attn": keep_attention}


def over_layers(body, carry, layers: Layer, lora: Lora, n_layers: int):
    """carry = body(carry, w, ab, i) with layer i's weights and LoRA factors, for each layer:
    lax.scan over stacked layers (one compiled layer), unrolled over unstacked ones."""
    if isinstance(layers.wq, tuple):
        for i in range(n_layers):
            carry = body(carry, Layer(*(layer_slice(leaf, i)[0] for leaf in layers)),
                         jax.tree.map(lambda a: a[i], lora), i)
        return carry
    step = lambda c, xs: (body(c, *xs), None)
    return jax.lax.scan(step, carry, (layers, lora, jnp.arange(n_layers)))[0]


def hidden_states(params: Params, lora: Lora | None, tokens, positions, segment_ids,
                  cfg: Config, lcfg: LoraConfig | None, opts: Options, key=None):
    """tokens (B, T) -> final-normed hidden states (B, T, D). Inside shard_map."""
    lora = Lora() if lora is None else lora
    x = params.embed[tokens]                                                # (B, T, D)
    B, T = tokens.shape
    drop = None
    if key is not None:   # dropout: a seed from the key, and this device's first global row
        seed = jnp.uint32(0)
        for word in jax.random.key_data(key).reshape(-1):
            seed = mix32(seed ^ word)
        drop = Dropout(seed=seed, row=jax.lax.axis_index(DATA) * B)
    tp = jax.lax.axis_size(MODEL)
    sp = opts.sequence_parallel and tp > 1
    if sp:   # keep only this device's slice of the positions between the parallel regions
        if T % tp:
            raise ValueError(f"sequence parallelism needs the length {T} divisible by tp={tp}")
        x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(MODEL) * (T // tp), T // tp, 1)

    @functools.cache   # one body per (policy, chunked), shared by the layers that use it
    def layer(policy, chunked):   # one layer's body under a remat policy ("none": no checkpoint)
        chunk = (opts.mlp_chunk, REMAT[policy]) if chunked and 0 < opts.mlp_chunk < T else None

        def body(x, w, ab, i):   # layer i's masks: its own seed
            d = None if drop is None else drop._replace(seed=mix32(drop.seed + mix32(i)))
            attn = lambda q, k, v: (attend(q, k, v, segment_ids, opts.attention,
                                           opts.max_segments), None)
            return decoder_layer(x, w, ab, positions, attn, cfg, lcfg, d, sp,
                                 opts.kernels == "pallas", chunk)[0]
        # keep only what the policy saves; recompute the rest backward
        return body if policy == "none" else jax.checkpoint(body, policy=REMAT[policy])

    if opts.remat not in REMAT:
        raise ValueError(f"remat must be one of {list(REMAT)}, got {opts.remat!r}")
    for f in ("full_layers", "chunk_layers"):
        if getattr(opts, f) and not isinstance(params.layers.wq, tuple):
            raise ValueError(f"Options.{f} needs unrolled layers (jora.unstack_layers): "
                             "a lax.scan runs one body for every layer")

    def body(x, w, ab, i):   # i: a Python int when layers are unrolled, else traced
        if isinstance(i, int):
            full = i < opts.full_layers
            chunked = not opts.chunk_layers or i >= cfg.n_layers - opts.chunk_layers
            return layer("full" if full else opts.remat, chunked)(x, w, ab, i)
        return layer(opts.remat, True)(x, w, ab, i)

    x = over_layers(body, x, params.layers, lora, cfg.n_layers)
    x = rms_norm(x, params.final_norm, cfg.norm_eps)
    return jax.lax.all_gather(x, MODEL, axis=1, tiled=True) if sp else x


# ---------------------------------------------------------------------------------------------
# 5. Loss: vocab-parallel, chunked cross-entropy
# ---------------------------------------------------------------------------------------------

class Batch(NamedTuple):
    tokens: jax.Array         # (B, T) int32 model input
    targets: jax.Array        # (B, T) int32 the next token at each position
    weights: jax.Array        # (B, T) fp32 1 where the loss counts (answer tokens + EOS), else 0
    positions: jax.Array      # (B, T) int32 RoPE positions; restart at 0 in each packed example
    segment_ids: jax.Array    # (B, T) int32 packed example id (attention stays inside), 0 = pad


def batch_specs() -> Batch:
    return Batch(*([P(DATA, None)] * len(Batch._fields)))


def logits_matmul(h, w):
    """h (..., D) @ w (D, V) -> fp32 logits, and a backward that multiplies in h's dtype.

    Autodiff's own backward would multiply the fp32 logit gradient by w promoted to fp32: an
    fp32 copy of lm_head (500 MiB at 7B) and fp32 GEMMs. Rounding the gradient to bf16 first
    is what bf16 training does everywhere else (HF's logits are bf16 in both directions).
    """
    return _logits_matmul(*_vary_alike(h, w))   # dh summed over the vocab slices


@jax.custom_vjp
def _logits_matmul(h, w):
    return jnp.einsum("...D,DV->...V", h, w, preferred_element_type=jnp.float32)


def _logits_fwd(h, w):
    return _logits_matmul(h, w), (h, w)


def _logits_bwd(res, g):                                                    # g (..., V) fp32
    h, w = res
    g = g.astype(h.dtype)
    dh = jnp.einsum("...V,DV->...D", g, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum("...D,...V->DV", h, g, preferred_element_type=jnp.float32)  # (unused: frozen)
    return dh.astype(h.dtype), dw.astype(w.dtype)


_logits_matmul.defvjp(_logits_fwd, _logits_bwd)


def _vocab_logits(h, lm_head, vocab_size):
    """h (..., D) @ lm_head (D, V'/tp) -> this device's fp32 logits; padding columns -inf."""
    logits = logits_matmul(h, lm_head)
    col = jax.lax.axis_index(MODEL) * logits.shape[-1] + jnp.arange(logits.shape[-1])
    return jnp.where(col < vocab_size, logits, -jnp.inf)


def _token_nll(h, lm_head, targets, vocab_size):
    """h (B, C, D), lm_head (D, V'/tp) this device's vocab slice, targets (B, C) -> nll (B, C).

    The softmax normaliser and the target's logit are each assembled with one psum over the
    vocab slices, so the full (B, C, V) logits never exist on any device.
    """
    logits = _vocab_logits(h, lm_head, vocab_size)                          # (B, C, V'/tp)
    v_local = logits.shape[-1]
    m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, -1)), MODEL)    # (B, C), for stability
    lse = m + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(logits - m[..., None]), -1), MODEL))
    local = targets - jax.lax.axis_index(MODEL) * v_local                   # target in my slice?
    mine = (local >= 0) & (local < v_local)
    hit = jnp.take_along_axis(logits, jnp.clip(local, 0, v_local - 1)[..., None], -1)[..., 0]
    return lse - jax.lax.psum(jnp.where(mine, hit, 0.0), MODEL)


def _local_loss_sums(params, lora, batch: Batch, key, cfg, lcfg, opts):
    """Inside shard_map: (sum of weighted nll, sum of weights) over the whole global batch."""
    segments = batch.segment_ids if opts.packed else None
    h = hidden_states(params, lora, batch.tokens, batch.positions, segments, cfg, lcfg, opts,
                      key)                                                   # (B, T, D)
    B, T, D = h.shape
    C = min(opts.loss_chunk, T)
    pad = -T % C
    pad2 = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    # (T/C, B, C, ...): scan over chunks; checkpoint so backward recomputes each chunk's logits.
    chunks = [pad2(a).reshape(B, -1, C, *a.shape[2:]).swapaxes(0, 1)
              for a in (h, batch.targets, batch.weights)]

    @jax.checkpoint
    def chunk_loss(_, xs):
        hc, tc, wc = xs
        return None, jnp.sum(_token_nll(hc, params.lm_head, tc, cfg.vocab_size) * wc)

    _, nll = jax.lax.scan(chunk_loss, None, chunks)                          # (T/C,)
    return jax.lax.psum(jnp.sum(nll), DATA), jax.lax.psum(jnp.sum(batch.weights), DATA)


def _mesh_of(params: Params):   # the mesh the parameters were placed on (one device if none)
    e = params.embed
    s = None if isinstance(e, jax.core.Tracer) else getattr(e, "sharding", None)
    return s.mesh if isinstance(s, NamedSharding) else make_mesh(1, jax.devices()[:1])


def loss_sums(params: Params, lora: Lora | None, batch: Batch, cfg: Config,
              lcfg: LoraConfig | None, opts: Options = Options(), key=None, mesh=None):
    """-> (sum of token nll over weighted positions, number of weighted positions), fp32.

    Differentiable in `lora` from the outside: jax.grad of this is correct for every mesh.
    Inside your own jit, pass `mesh` (it is read from the arrays' placement otherwise).
    """
    mesh = _mesh_of(params) if mesh is None else mesh
    check_runs(batch.segment_ids, opts)
    return _loss_sums(params, lora, batch, key, cfg=cfg, lcfg=lcfg, opts=opts, mesh=mesh)


@jax.jit(static_argnames=("cfg", "lcfg", "opts", "mesh"))
def _loss_sums(params, lora, batch, key, *, cfg, lcfg, opts, mesh):
    # Pallas kernels cannot carry shard_map's varying-axis types (check_vma), so they run with
    # it off; gradients are taken outside this shard_map, which is exact either way.
    fn = jax.shard_map(
        lambda p, l, b, k: _local_loss_sums(p, l, b, k, cfg, lcfg, opts), mesh=mesh,
        in_specs=(param_specs(), lora_specs(lcfg) if lora is not None else None, batch_specs(),
                  P()),
        out_specs=(P(), P()), check_vma=opts.kernels != "pallas")
    return fn(params, lora, batch, key)


def loss(params: Params, lora: Lora | None, batch: Batch, cfg: Config,
         lcfg: LoraConfig | None = None, opts: Options = Options(), key=None, mesh=None):
    """Mean next-token cross-entropy (nats) over the positions where batch.weights is 1."""
    nll, n = loss_sums(params, lora, batch, cfg, lcfg, opts, key, mesh)
    return nll / jnp.maximum(n, 1.0)


def make_batch(tokens, weights=None, segment_ids=None) -> Batch:
    """Next-token batch from rows of tokens (B, T+1) (numpy): input = [:-1], target = [1:].

    weights (B, T+1) marks which *target* tokens count (default: all); segment_ids (B, T+1)
    gives packed examples (0 = padding) and restarts positions at each new segment.
    """
    tokens = np.asarray(tokens, np.int32)
    w = np.ones_like(tokens, np.float32) if weights is None else np.asarray(weights, np.float32)
    seg = np.ones_like(tokens) if segment_ids is None else np.asarray(segment_ids, np.int32)
    starts = np.concatenate([np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
    idx = np.arange(seg.shape[1])[None].repeat(seg.shape[0], 0)
    pos = idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    # A target counts only inside the same example as its input (never across a boundary).
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return Batch(tokens=tokens[:, :-1], targets=tokens[:, 1:], weights=w[:, 1:] * same,
                 positions=pos[:, :-1].astype(np.int32), segment_ids=seg[:, :-1])


def forward(params: Params, tokens, cfg: Config, lora: Lora | None = None,
            lcfg: LoraConfig | None = None, opts: Options = Options(), segment_ids=None,
            positions=None, mesh=None):
    """tokens (B, T) int -> logits (B, T, V) fp32, with LoRA adapters when `lora` is given.

    For inspection and tests: it materialises all logits (training uses the chunked loss).
    """
    mesh = _mesh_of(params) if mesh is None else mesh
    check_runs(segment_ids, opts)
    tokens = jnp.asarray(tokens, jnp.int32)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T)) if positions is None else positions
    return _forward_jit(params, lora, tokens, jnp.asarray(positions, jnp.int32),
                        None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32),
                        cfg=cfg, lcfg=lcfg, opts=opts, mesh=mesh)


@jax.jit(static_argnames=("cfg", "lcfg", "opts", "mesh"))
def _forward_jit(params, lora, tokens, positions, segment_ids, *, cfg, lcfg, opts, mesh):
    def local(p, l, t, pos, seg):
        return _vocab_logits(hidden_states(p, l, t, pos, seg, cfg, lcfg, opts), p.lm_head,
                             cfg.vocab_size)
    row = P(DATA, None)
    logits = jax.shard_map(local, mesh=mesh,
                           in_specs=(param_specs(), None if lora is None else lora_specs(lcfg),
                                     row, row, None if segment_ids is None else row),
                           out_specs=P(DATA, None, MODEL), check_vma=opts.kernels != "pallas")(
                               params, lora, tokens, positions, segment_ids)
    return logits[..., :cfg.vocab_size]


# ---------------------------------------------------------------------------------------------
# 6. Optimizer: AdamW over the LoRA factors only, warmup + cosine schedule
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100              # optimizer steps in the whole run
    batch_size: int = 8           # rows per micro-batch (split over the "data" axis)
    grad_accum: int = 1           # micro-batches per optimizer step
    seq_len: int = 512            # longest row in tokens
    lr: float = 2e-4              # peak learning rate
    warmup: int = 10              # linear warmup steps, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0     # decoupled (Loshchilov & Hutter 2019)
    clip: float = 1.0             # global gradient-norm clip; 0 = off
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    seed: int = 0


class AdamW(NamedTuple):
    step: jax.Array           # () int32, optimizer steps taken
    mu: Lora                  # first moments, fp32, the same tree (and split) as the LoRA factors
    nu: Lora                  # second moments


def adamw_init(lora: Lora) -> AdamW:
    zeros = lambda: jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), lora)
    return AdamW(step=jnp.zeros((), jnp.int32), mu=zeros(), nu=zeros())


def learning_rate(step, tcfg: TrainConfig):
    """Linear warmup over tcfg.warmup steps, then cosine decay to min_lr_ratio * lr at the end.
    `step` counts from 0 (the first update uses lr/warmup)."""
    step = jnp.asarray(step, jnp.float32)
    warm = tcfg.lr * (step + 1) / max(tcfg.warmup, 1)
    frac = jnp.clip((step - tcfg.warmup) / max(tcfg.steps - tcfg.warmup, 1), 0.0, 1.0)
    lo = tcfg.lr * tcfg.min_lr_ratio
    cos = lo + 0.5 * (tcfg.lr - lo) * (1 + jnp.cos(jnp.pi * frac))
    return jnp.where(step < tcfg.warmup, warm, cos)


def global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def adamw_update(lora: Lora, grads: Lora, opt: AdamW, lr, tcfg: TrainConfig):
    """One AdamW step with bias correction; weight decay acts on the weights, not the gradient."""
    step = opt.step + 1
    mu = jax.tree.map(lambda m, g: tcfg.b1 * m + (1 - tcfg.b1) * g, opt.mu, grads)
    nu = jax.tree.map(lambda n, g: tcfg.b2 * n + (1 - tcfg.b2) * g * g, opt.nu, grads)
    c1, c2 = 1 - tcfg.b1 ** step, 1 - tcfg.b2 ** step   # moments start at 0: undo that bias

    def new(p, m, n):
        return p - lr * ((m / c1) / (jnp.sqrt(n / c2) + tcfg.eps) + tcfg.weight_decay * p)

    return jax.tree.map(new, lora, mu, nu), AdamW(step, mu, nu)


# ---------------------------------------------------------------------------------------------
# 7. The sharded training step
# ---------------------------------------------------------------------------------------------

class TrainState(NamedTuple):
    lora: Lora
    opt: AdamW
    bad_step: jax.Array       # () int32: first step whose loss or gradient was not finite, or 0


def state_specs(lcfg: LoraConfig) -> TrainState:
    s = lora_specs(lcfg)
    return TrainState(lora=s, opt=AdamW(step=P(), mu=s, nu=s), bad_step=P())


def make_train_step(cfg: Config, lcfg: LoraConfig, tcfg: TrainConfig, mesh,
                    opts: Options = Options()):
    """-> step(state, params, batches, key) -> (state, metrics), jitted once, state donated.

    batches: a Batch whose leaves are (A, B, T) for A = grad_accum micro-batches. The loss is
    normalised by the answer tokens of all A micro-batches together (not a mean of means).
    A step whose loss, gradient or any updated factor is not finite leaves the state unchanged
    and is recorded (bad_step); metrics["finite"] says which: [loss, gradient, *factors].
    """
    def grad_sums(lora, params, batch, key):
        # Gradient of the *sum* of token losses, taken outside loss_sums' shard_map.
        f = lambda l: loss_sums(params, l, batch, cfg, lcfg, opts, key, mesh)
        (nll, n), g = jax.value_and_grad(f, has_aux=True)(lora)
        return nll, n, g

    def step(state: TrainState, params: Params, batches: Batch, key):
        keys = jax.random.split(jax.random.fold_in(key, state.opt.step), tcfg.grad_accum)
        if lcfg.dropout == 0:
            keys = None

        def accumulate(carry, xs):
            nll, n, g = carry
            batch, k = xs
            nll_i, n_i, g_i = grad_sums(state.lora, params, batch, k)
            return (nll + nll_i, n + n_i, jax.tree.map(jnp.add, g, g_i)), None

        zero = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.lora))
        (nll, n, grads), _ = jax.lax.scan(accumulate, zero, (batches, keys))
        n = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / n, grads)
        norm = global_norm(grads)
        if tcfg.clip > 0:
            grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, tcfg.clip / (norm + 1e-6)), grads)
        lr = learning_rate(state.opt.step, tcfg)
        lora, opt = adamw_update(state.lora, grads, state.opt, lr, tcfg)
        # The new factors too: a huge (or NaN) learning rate spoils them while the loss and the
        # gradient are still finite, and a checkpoint must hold finite tensors only.
        finite = jnp.stack([jnp.isfinite(nll), jnp.isfinite(norm)] +
                           [jnp.isfinite(x).all() for x in jax.tree.leaves(lora)])
        ok = finite.all()
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        bad = jnp.where(ok | (state.bad_step > 0), state.bad_step, state.opt.step + 1)
        new = TrainState(lora=keep(lora, state.lora), opt=keep(opt, state.opt), bad_step=bad)
        return new, dict(loss=nll / n, grad_norm=norm, lr=lr, tokens=n, finite=finite)

    return jax.jit(step, donate_argnums=(0,))


def accum_batch(b: Batch, grad_accum: int, mesh) -> Batch:
    """(A * B, T) rows -> A micro-batches (A, B, T), split over "data": what the step takes."""
    spec = P(None, DATA, None)
    return shard(Batch(*(x.reshape(grad_accum, -1, x.shape[-1]) for x in b)),
                 Batch(*[spec] * len(Batch._fields)), mesh)


# ---------------------------------------------------------------------------------------------
# 8. Data: tokenizer, Alpaca / RAFT / completion records, packing, deterministic order
# ---------------------------------------------------------------------------------------------

class Tokenizer:
    """A sentencepiece `tokenizer.model` (Llama-2's, or any other); BOS/EOS ids from the model."""

    def __init__(self, path: str):
        import sentencepiece
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as e:   # RuntimeError or OSError, with sentencepiece's C++ message
            raise ValueError(f"{path}: not a sentencepiece tokenizer model "
                             f"({str(e).splitlines()[0][:200]})") from None
        self.path = path
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:   # ids past the tokenizer (a padded model vocab) are dropped
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


ALPACA = ("Below is an instruction that describes a task{}. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{}\n\n{}### Response:\n")


def alpaca_prompt(instruction: str, input_: str = "") -> str:
    """The Stanford Alpaca prompt template (with or without an input)."""
    if input_:
        return ALPACA.format(", paired with an input that provides further context",
                             instruction, f"### Input:\n{input_}\n\n")
    return ALPACA.format("", instruction, "")


FORMAT_KEYS = {"alpaca": ("instruction", "output"), "raft": ("instruction", "cot_answer"),
               "completion": ("prompt", "completion")}


def read_records(path: str, fmt: str = "auto") -> tuple[list[dict], str]:
    """Read a JSON list or JSONL file -> (records, format). Errors name the file and record."""
    text = read_text(path)
    records = []
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    try:   # valid JSON, but one value over several lines: not JSONL
                        whole = json.loads(text)
                    except json.JSONDecodeError:
                        raise ValueError(f"{path}: record {len(records) + 1} (line {n}) is "
                                         f"malformed JSON ({e.msg})") from None
                    raise ValueError(f"{path}: holds {_KIND.get(type(whole), 'JSON')} where a "
                                     f"list of records (JSON) or one record a line (JSONL) was "
                                     f"expected") from None
    if not records:
        raise ValueError(f"{path}: no records")
    for i, r in enumerate(records, 1):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {i} is {_KIND.get(type(r), 'JSON')}, not a JSON "
                             f"object")
    if fmt == "auto":
        first = records[0] if isinstance(records[0], dict) else {}
        fmt = next((f for f in ("raft", "alpaca", "completion")
                    if all(k in first for k in FORMAT_KEYS[f])), None)
        if fmt is None:
            raise ValueError(f"{path}: record 1 has keys {sorted(first)}; cannot tell the format "
                             f"(alpaca needs instruction/output, raft instruction/cot_answer, "
                             f"completion prompt/completion)")
    optional = dict(alpaca=("input",), raft=("oracle_context",), completion=())[fmt]
    for i, r in enumerate(records, 1):
        for k in FORMAT_KEYS[fmt] + ("question",) * (fmt == "raft") + optional:
            if k not in r and k not in optional:
                raise ValueError(f"{path}: record {i} has no '{k}' (format {fmt})")
            if k in r and not isinstance(r[k], str):
                raise ValueError(f"{path}: record {i} field '{k}' is {type(r[k]).__name__}, "
                                 f"not a string")
        ctx = r.get("context", {}) if fmt == "raft" else {}
        docs = ctx.get("sentences", [[]]) if isinstance(ctx, dict) else None
        if not (isinstance(docs, list) and docs and isinstance(docs[0], list)
                and all(isinstance(d, str) for d in docs[0])):
            k, v = ("context", ctx) if docs is None else ("context.sentences", docs)
            raise ValueError(f"{path}: record {i} field '{k}' is {_KIND.get(type(v), 'JSON')}; "
                             f'format raft expects "context": {{"sentences": [[document, ...]]}}')
    return records, fmt


def _raft_prompt(docs: list[str], question: str) -> str:   # gorilla raft.py's layout
    return "".join(f"<DOCUMENT>{d}</DOCUMENT>\n" for d in docs) + question


class Example(NamedTuple):
    tokens: np.ndarray        # (n,) int32: BOS, prompt, answer, EOS
    weights: np.ndarray       # (n,) fp32: 1 on answer tokens and EOS (the tokens to predict)


def tokenize_records(records, fmt: str, tok: Tokenizer, seq_len: int, path: str = "data",
                     log=None):
    """-> (examples, report). An example is at most seq_len + 1 tokens (one row's inputs and
    targets). RAFT examples that are too long lose distractor documents first (longest first;
    never the oracle, never the answer); what still does not fit is skipped; other formats
    are truncated at the end of the answer if the prompt fits, else skipped. Nothing silent:
    `report` counts every such case. log: called with a progress line every 10 s."""
    report = dict(examples=0, dropped_distractors=0, shortened_raft=0, truncated=0, skipped=0)
    out, limit, shown = [], seq_len + 1, time.time()
    for i, r in enumerate(records):
        if log and time.time() - shown > 10:   # ~700 long RAFT records a second
            log(f"{path}: tokenized {i:,} of {len(records):,} records")
            shown = time.time()
        answer = tok.encode(r[FORMAT_KEYS[fmt][1]]) + [tok.eos_id]
        if fmt == "alpaca":
            prompt = tok.encode(alpaca_prompt(r["instruction"], r.get("input", "")), bos=True)
        elif fmt == "completion":
            prompt = tok.encode(r["prompt"], bos=True)
        else:
            prompt = tok.encode(r["instruction"], bos=True)
            docs = list(r.get("context", {}).get("sentences", [[]])[0])
            oracle = r.get("oracle_context")
            dropped = 0
            while len(prompt) + len(answer) > limit and any(d != oracle for d in docs):
                docs.remove(max((d for d in docs if d != oracle), key=len))
                prompt = tok.encode(_raft_prompt(docs, r["question"]), bos=True)
                dropped += 1
            report["dropped_distractors"] += dropped
            report["shortened_raft"] += dropped > 0
            if len(prompt) + len(answer) > limit:
                report["skipped"] += 1
                continue
        if len(prompt) + len(answer) > limit:
            if len(prompt) >= limit:
                report["skipped"] += 1
                continue
            answer = answer[:limit - len(prompt)]
            report["truncated"] += 1
        ids = np.asarray(prompt + answer, np.int32)
        w = np.concatenate([np.zeros(len(prompt), np.float32), np.ones(len(answer), np.float32)])
        out.append(Example(ids, w))
    report["examples"] = len(out)
    if not out:
        raise ValueError(f"{path}: no usable examples: all {len(records)} records are longer "
                         f"than --seq-len {seq_len} ({report})")
    return out, report


def padded_length(n: int, limit: int, bucket: int = 64) -> int:
    """n positions rounded up to a multiple of `bucket`, one that doubles each time n doubles past
    16 buckets (8 lengths a doubling: at most 1/8 padding), capped at `limit`. Each length
    compiles its own step (minutes at long T with 7B): 1,024 to 32,768 are 40 lengths, not 496."""
    step = bucket
    while step * 16 < n:
        step *= 2
    return min(limit, -(-n // step) * step)


def batches(examples: list[Example], rows: int, seq_len: int, pack: bool, seed: int,
            position: tuple[int, int] = (0, 0), bucket: int = 64,
            max_segments: int = Options.max_segments):
    """Endless deterministic batches -> yields (tokens, weights, segment_ids, next_position).

    Each array is (rows, T + 1). The order within epoch e is a permutation drawn from (seed, e);
    `position` = (epoch, examples consumed in it) is where to resume. With `pack`, consecutive
    examples share a row of seq_len + 1 tokens (segment ids 1, 2, ...), at most max_segments - 1
    of them (the padding tail is one run more: Options.max_segments; 0: no limit); otherwise one
    example a row, padded to the batch's longest, T rounded up by padded_length. Examples that
    cannot fill one batch are refused here, at the call, not at the first next().
    """
    data = _batches(examples, rows, seq_len, pack, seed, position, bucket, max_segments)
    return itertools.chain([next(data)], data)


def _batches(examples, rows, seq_len, pack, seed, position, bucket, max_segments):
    most = max_segments - 1 if pack and max_segments else None
    epoch, cursor = position
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(examples))
        whole, yielded = cursor == 0, False   # an epoch from its start that yields nothing: none
        while cursor < len(order):
            group, lens = [], []
            while cursor < len(order) and len(group) < rows:
                row, used = [], 0
                while cursor < len(order):
                    n = len(examples[order[cursor]].tokens)
                    if row and (not pack or used + n > seq_len + 1 or len(row) == most):
                        break
                    row.append(examples[order[cursor]])
                    used, cursor = used + n, cursor + 1
                group.append(row)
                lens.append(used)
            if len(group) < rows:           # the epoch's tail: start the next epoch instead
                break
            T1 = 1 + (seq_len if pack else padded_length(max(lens) - 1, seq_len, bucket))
            tokens = np.zeros((rows, T1), np.int32)
            weights = np.zeros((rows, T1), np.float32)
            segs = np.zeros((rows, T1), np.int32)
            for i, row in enumerate(group):
                at = 0
                for j, ex in enumerate(row, 1):
                    n = len(ex.tokens)
                    tokens[i, at:at + n], weights[i, at:at + n], segs[i, at:at + n] = (
                        ex.tokens, ex.weights, j)
                    at += n
            yielded = True
            yield tokens, weights, segs, (epoch, cursor)
        if whole and not yielded:   # (one that resumed near its end may well yield nothing)
            raise ValueError(f"{len(examples)} examples cannot fill one batch of {rows} rows "
                             f"(--batch-size x --grad-accum)" +
                             (f" of --seq-len {seq_len} packed tokens" if pack else ""))
        epoch, cursor = epoch + 1, 0


def batches_per_epoch(examples, rows: int, seq_len: int, pack: bool, seed: int = 0,
                      max_segments: int = Options.max_segments) -> float:
    """Batches in one pass over `examples` (what --epochs counts); packed: the packer's batches,
    counted by running it. Refuses examples that cannot fill one batch, as `batches` does."""
    data = batches(examples, rows, seq_len, pack, seed, max_segments=max_segments)
    if not pack:
        return len(examples) / rows
    n = 0
    for *_, (epoch, _) in data:
        if epoch > 0:   # this batch already belongs to the next epoch
            return n
        n += 1


def prepare_examples(path: str, fmt: str, tok: Tokenizer, seq_len: int, eval_split: float,
                     seed: int, rows: int, pack: bool, max_segments: int = Options.max_segments,
                     log=print):
    """Read and tokenize a data file, hold out eval_split of the examples (a permutation drawn
    from seed + 7) -> (train examples, eval examples, batches an epoch). Refuses, with the
    numbers and the flags that decide them, a split that leaves too few to fill one batch."""
    records, fmt = read_records(path, fmt)
    examples, report = tokenize_records(records, fmt, tok, seq_len, path, log)
    log(f"data: {path} ({fmt}) {len(records)} records -> {report}")
    n_eval = int(len(examples) * eval_split)
    if eval_split and not n_eval:
        raise ValueError(f"--eval-split {eval_split} of {len(examples)} examples holds out none")
    split = jax.random.permutation(jax.random.key(seed + 7), len(examples)).tolist()
    train_ex = [examples[i] for i in split[n_eval:]]
    try:
        per_epoch = batches_per_epoch(train_ex, rows, seq_len, pack, seed, max_segments)
    except ValueError as e:
        e = (f"{path}: {len(records)} records, {len(examples)} usable at --seq-len {seq_len}, "
             f"{n_eval} held out by --eval-split {eval_split}: {e}")
        raise ValueError(e) from None
    if pack:   # how full the rows are: max_segments can leave them part empty
        used = sum(len(e.tokens) for e in train_ex) / (per_epoch * rows * (seq_len + 1))
        log(f"packed: {per_epoch:,} batches an epoch, {min(used, 1):.0%} of positions used")
    return train_ex, [examples[i] for i in split[:n_eval]], per_epoch


# ---------------------------------------------------------------------------------------------
# 9. Generation: prefill + KV-cache decoding in one jitted loop; scoring answers
# ---------------------------------------------------------------------------------------------

def _sample(logits, key, temperature, top_k: int, top_p):
    """logits (B, V) fp32 -> token ids (B,). temperature 0 = greedy."""
    if top_k > 0:   # keep the k largest
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    sorted_ = jnp.sort(logits, axis=-1)[:, ::-1]          # nucleus: smallest set with mass >= p
    mass = jnp.cumsum(jax.nn.softmax(sorted_ / jnp.maximum(temperature, 1e-6), -1), -1)
    keep = jnp.minimum(jnp.sum(mass < top_p, -1, keepdims=True), logits.shape[-1] - 1)
    cutoff = jnp.take_along_axis(sorted_, keep, -1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, -1)).astype(jnp.int32)


def _generate_local(params, lora, tokens, pad, key, temperature, top_p, *, cfg, lcfg,
                    max_new, top_k):
    """Inside shard_map. tokens (B, T0) left-padded prompts, pad (B,) pad lengths
    -> (B, max_new) new tokens (EOS repeated once a row has finished)."""
    lora = Lora() if lora is None else lora
    B, T0 = tokens.shape
    S = T0 + max_new                                                       # cache length
    K_local = layer_slice(params.layers.wk, 0).shape[-1] // cfg.head_dim
    cache = jnp.zeros((cfg.n_layers, 2, B, S, K_local, cfg.head_dim), params.embed.dtype)
    cache = jax.lax.pcast(cache, (MODEL,), to="varying")   # each device caches its own heads
    slot = jnp.arange(S)
    valid = slot[None] >= pad[:, None]                                     # (B, S) not padding

    def run(tokens, start, cache):   # tokens (B, t) at cache slots [start, start + t)
        t = tokens.shape[1]
        positions = jnp.maximum(start + jnp.arange(t)[None] - pad[:, None], 0)   # (B, t)
        here = start + jnp.arange(t)[None, :, None]                             # (1, t, 1)
        # Padding queries see only themselves: finite garbage that no real query reads.
        allowed = (valid[:, None] & (slot[None, None] <= here)) | (slot[None, None] == here)

        def body(carry, w, ab, i):
            x, cache = carry                                   # cache (L, 2, B, S, K/tp, H)

            def attn(q, k, v):   # write this step's k, v into layer i's slots, in place
                kv = jnp.stack([k, v]).astype(cache.dtype)[None]
                c = jax.lax.dynamic_update_slice(cache, kv, (i, 0, 0, start, 0, 0))
                return attend_masked(q, c[i, 0], c[i, 1], allowed), c

            return decoder_layer(x, w, ab, positions, attn, cfg, lcfg)

        x, cache = over_layers(body, (params.embed[tokens], cache), params.layers, lora,
                               cfg.n_layers)
        h = rms_norm(x[:, -1], params.final_norm, cfg.norm_eps)               # (B, D)
        local = _vocab_logits(h, params.lm_head, cfg.vocab_size)              # (B, V'/tp)
        # Gather the vocab slices with a psum (an all_gather would leave the value "varying").
        v0 = jax.lax.axis_index(MODEL) * local.shape[-1]
        full = jnp.zeros((B, cfg.padded_vocab), jnp.float32)
        full = jax.lax.psum(jax.lax.dynamic_update_slice(full, local, (0, v0)), MODEL)
        return full[:, :cfg.vocab_size], cache

    logits, cache = run(tokens, 0, cache)
    out = jnp.full((B, max_new), cfg.eos_id, jnp.int32)

    cond = lambda c: (c[0] < max_new) & ~jnp.all(c[3])   # c = (i, logits, cache, done, out)

    def step(c):
        i, logits, cache, done, out = c
        nxt = jnp.where(done, cfg.eos_id, _sample(logits, jax.random.fold_in(key, i),
                                                   temperature, top_k, top_p))
        out = out.at[:, i].set(nxt)
        logits, cache = run(nxt[:, None], T0 + i, cache)
        return i + 1, logits, cache, done | (nxt == cfg.eos_id), out

    init = (jnp.int32(0), logits, cache, jnp.zeros((B,), bool), out)
    return jax.lax.while_loop(cond, step, init)[-1]


@jax.jit(static_argnames=("cfg", "lcfg", "max_new", "top_k", "mesh"))
def _generate_jit(params, lora, tokens, pad, key, temperature, top_p, *, cfg, lcfg, max_new,
                  top_k, mesh):
    fn = lambda *a: _generate_local(*a, cfg=cfg, lcfg=lcfg, max_new=max_new, top_k=top_k)
    return jax.shard_map(fn, mesh=mesh,
                         in_specs=(param_specs(), None if lora is None else lora_specs(lcfg),
                                   P(), P(), P(), P(), P()),
                         out_specs=P())(params, lora, tokens, pad, key, temperature, top_p)


def generate(params: Params, prompts: list[list[int]], cfg: Config, max_new_tokens: int = 128,
             lora: Lora | None = None, lcfg: LoraConfig | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             mesh=None) -> list[list[int]]:
    """Complete a batch of token-id prompts of any lengths -> new token ids per prompt (ending
    at EOS, which is included, or at max_new_tokens). Greedy when temperature is 0."""
    mesh = _mesh_of(params) if mesh is None else mesh
    T0 = max(len(p) for p in prompts)
    T0 = -(-T0 // 16) * 16                       # round up: fewer distinct shapes to compile
    tokens = np.zeros((len(prompts), T0), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, T0 - len(p):] = p
    pad = np.asarray([T0 - len(p) for p in prompts], np.int32)
    out = np.asarray(_generate_jit(params, lora, tokens, pad, jax.random.key(seed),
                                   jnp.float32(temperature), jnp.float32(top_p), cfg=cfg,
                                   lcfg=lcfg, max_new=max_new_tokens, top_k=top_k, mesh=mesh))
    result = []
    for row in out.tolist():
        result.append(row[:row.index(cfg.eos_id) + 1] if cfg.eos_id in row else row)
    return result


def extract_answer(text: str) -> str:
    """The final answer of a RAFT chain of thought: the text after the last '<ANSWER>:'."""
    return text.rsplit("<ANSWER>:", 1)[-1].strip()


def _normal_words(text: str) -> list[str]:   # SQuAD's normalisation: case, punctuation, articles
    import re
    import string
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def answer_scores(prediction: str, reference: str) -> dict:
    """Exact match and token F1 (as in SQuAD) of the final answers of two completions."""
    p, r = _normal_words(extract_answer(prediction)), _normal_words(extract_answer(reference))
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    f1 = 0.0 if not common else 2 * common / (len(p) + len(r))
    return dict(exact_match=float(p == r), token_f1=f1 if p or r else 1.0)


def generate_and_score(params, lora, examples, cfg, lcfg, tok, max_new_tokens: int = 256,
                       mesh=None) -> dict:
    """Greedy answers to the prompts of `examples`, scored against their reference answers."""
    prompts = [ex.tokens[ex.weights == 0].tolist() for ex in examples]
    refs = [tok.decode(ex.tokens[ex.weights > 0]) for ex in examples]
    outs = generate(params, prompts, cfg, max_new_tokens, lora, lcfg, mesh=mesh)
    scores = [answer_scores(tok.decode(o), r) for o, r in zip(outs, refs)]
    return {k: sum(s[k] for s in scores) / len(scores) for k in ("exact_match", "token_f1")}


# ---------------------------------------------------------------------------------------------
# 10. Training loop: checkpoints, resume, logging, evaluation
# ---------------------------------------------------------------------------------------------

def compile_step(step_fn, args, log=print):
    """step_fn.lower(*args).compile(), saying how long it took and whether jax's persistent
    compilation cache (jax_compilation_cache_dir, if set) served it."""
    hits = []
    listen = lambda event, **_: hits.append(1) if event.endswith("/cache_hits") else None
    jax.monitoring.register_event_listener(listen)
    t = time.time()
    try:
        lowered = step_fn.lower(*args)
        t_lower = time.time() - t
        compiled = lowered.compile()
    finally:
        jax.monitoring.unregister_event_listener(listen)
    spent = time.time() - t
    log(f"compiled in {spent:.1f} s (traced in {t_lower:.1f} s" +
        ("; XLA's part from the compilation cache)" if hits else ")"))
    return compiled, spent


def planned_bytes(compiled) -> int | None:
    """XLA's planned peak device memory for a compiled step (per device), or None."""
    plan = compiled.memory_analysis()
    if plan is None:
        return None
    return (plan.argument_size_in_bytes + plan.temp_size_in_bytes + plan.output_size_in_bytes
            - plan.alias_size_in_bytes)


# remat="auto" tries these, fastest first, and takes the first whose memory plan fits.
AUTO_PLANS = (dict(remat="none"), dict(remat="min"),
              dict(remat="attn", mlp_chunk=2048, chunk_layers=4),
              dict(remat="attn", mlp_chunk=2048), dict(remat="full", mlp_chunk=2048))


def choose_remat(cfg: Config, lcfg: LoraConfig, tcfg: TrainConfig, mesh, opts: Options,
                 state, params: Params, batch: Batch, key, *, margin: float = 0.9,
                 limit: int | None = None, log=print):
    """remat="auto": the fastest of AUTO_PLANS whose compiled step, at this batch's shape, plans
    at most `margin` of `limit` (default: the device's memory) -> (Options, step_fn, compiled
    step or None, seconds spent). Where no limit is known (XLA's CPU backend), the plain plan.
    The line it logs says why."""
    local = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    limit = limit or (local.memory_stats() or {}).get("bytes_limit")
    if not limit:   # (XLA's CPU backend): nothing to fit, so nothing to compile yet
        o = dataclasses.replace(opts, **AUTO_PLANS[0])
        log(f"remat auto: {_plan_name(o)} (no device memory limit to fit here)")
        return o, make_train_step(cfg, lcfg, tcfg, mesh, o), None, 0.0
    unrolled = isinstance(params.layers.wq, tuple)
    tried, spent = [], 0.0
    for plan in AUTO_PLANS:
        if plan.get("chunk_layers") and not unrolled:
            continue
        o = dataclasses.replace(opts, **{"mlp_chunk": 0, "chunk_layers": 0, **plan})
        step_fn = make_train_step(cfg, lcfg, tcfg, mesh, o)
        log(f"remat auto: compiling the step with {_plan_name(o)} ...")
        compiled, t = compile_step(step_fn, (state, params, batch, key), log)
        spent += t
        need = planned_bytes(compiled)
        if need is None or need <= margin * limit or plan is AUTO_PLANS[-1]:
            why = (f"plans {(need or 0) / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB" +
                   (f"; {', '.join(tried)} would not fit" if tried else "; the fastest plan"))
            log(f"remat auto: {_plan_name(o)} ({why})")
            return o, step_fn, compiled, spent
        tried.append(f"{_plan_name(o)} {need / 2**30:.1f} GiB")


def _plan_name(o: Options) -> str:
    chunks = "" if not o.mlp_chunk else f" + MLP chunks of {o.mlp_chunk}" + (
        f" in the last {o.chunk_layers} layers" if o.chunk_layers else "")
    return o.remat + chunks


PEAK_FLOPS = {"gpu": 800e12}   # measured bf16 matmul rate of one H200; MFU is reported against it


def flops_per_token(cfg: Config, seq_len: int) -> float:
    """Model FLOPs per token of LoRA training with frozen weights: forward 2N + input-gradients
    2N over the N matmul parameters (lm_head included; no weight gradients), plus causal
    attention 6*T*D*L (forward 2TDL, backward twice that). Recomputation is not counted."""
    n = sum(math.prod(proj_shape(cfg, t)) for t in PROJ) * cfg.n_layers
    n += cfg.d_model * cfg.vocab_size
    return 4 * n + 6 * seq_len * cfg.n_heads * cfg.head_dim * cfg.n_layers


def mfu(flops_per_s: float, devices: int) -> float | None:
    """Model FLOPs utilisation of `devices` against PEAK_FLOPS (None: no peak for this backend)."""
    peak = PEAK_FLOPS.get(jax.default_backend())
    return flops_per_s / (peak * devices) if peak else None


def is_oom(e: Exception) -> bool:   # XLA's out-of-device-memory error
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


LESS_MEMORY = ("To use less: --remat full (or attn, with --full-layers N for the first N layers "
               "full) with --mlp-chunk 2048 (in every layer: no --chunk-layers), a smaller "
               "--batch-size with a larger --grad-accum, a shorter --seq-len, or more devices "
               "(--tp). `--benchmark --size 7b --seq-len N --bench-steps 0 ...` prints XLA's "
               "planned peak (planned_gib) without running.")


def _flat(lora: Lora, prefix: str) -> dict:
    return {f"{prefix}.{t}.{part}": getattr(ab, part) for t, ab in lora._asdict().items()
            if ab is not None for part in ("a", "b")}


def save_checkpoint(folder: str, state: TrainState, meta: dict):
    """LoRA factors, AdamW moments and counters (safetensors) + run metadata (JSON); atomic."""
    from safetensors.numpy import save_file
    tensors = {**_flat(state.lora, "lora"), **_flat(state.opt.mu, "mu"),
               **_flat(state.opt.nu, "nu"), "step": state.opt.step, "bad_step": state.bad_step}
    tensors = {k: np.ascontiguousarray(to_host(v)) for k, v in tensors.items()}
    bad = next((k for k, v in tensors.items() if not np.isfinite(v).all()), None)
    if bad:   # a checkpoint is good only if every tensor in it is finite
        raise FloatingPointError(f"{folder}: not saved, tensor '{bad}' is not finite")

    def write(tmp):
        if tmp is None:
            return
        save_file(tensors, os.path.join(tmp, "state.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"format": "jora-train/1", **meta}, f, indent=2)

    _atomic_dir(folder, write)


def load_checkpoint(folder: str, cfg: Config, lcfg: LoraConfig, mesh) -> tuple[TrainState, dict]:
    """Inverse of save_checkpoint; refuses a checkpoint of another model or LoRA shape."""
    t, meta = read_checkpoint(folder)
    for key, want in (("config", dataclasses.asdict(cfg)), ("lora", dataclasses.asdict(lcfg))):
        have = meta.get(key, {})
        diff = {k: (have.get(k), v) for k, v in json.loads(json.dumps(want)).items()
                if have.get(k) != v}
        if diff:
            k, (a, b) = next(iter(diff.items()))
            raise ValueError(f"{folder}: checkpoint was made with {key}.{k}={a!r}, this run has "
                             f"{b!r} ({len(diff)} difference(s)); use another --out or the same "
                             f"model and LoRA settings")

    def tree(prefix):
        return Lora(**{x: LoraAB(a=t[f"{prefix}.{x}.a"], b=t[f"{prefix}.{x}.b"])
                       for x in lcfg.targets})

    scalar = lambda name: t[name].reshape(())   # safetensors stores a scalar as shape (1,)
    state = TrainState(lora=tree("lora"), opt=AdamW(step=scalar("step"), mu=tree("mu"),
                                                    nu=tree("nu")), bad_step=scalar("bad_step"))
    return shard(state, state_specs(lcfg), mesh), meta


def read_checkpoint(folder: str) -> tuple[dict, dict]:
    """-> (tensors, state.json) of a checkpoint, refusing (ValueError) one that does not read
    back whole or holds a non-finite tensor: a checkpoint is good only if every tensor is."""
    meta = read_json(os.path.join(folder, "state.json"), dict, "a JSON object (jora-train/1)")
    for key in ("step", "data_position"):
        if key not in meta:
            raise ValueError(f"{folder}/state.json: missing field '{key}'")
    t = load_tensors(os.path.join(folder, "state.safetensors"))
    bad = next((k for k, v in t.items() if not np.isfinite(v).all()), None)
    if bad:
        raise ValueError(f"{folder}/state.safetensors: tensor '{bad}' is not finite")
    return t, meta


def _steps(out: str, ext=("",)) -> list[str]:   # OUT/checkpoints/step_N(.tmp, .old), sorted
    root = os.path.join(out, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return [os.path.join(root, n) for n in sorted(names) if (p := n.partition("."))[0][:5] ==
            "step_" and p[0][5:].isdigit() and p[2] in ext]


def checkpoints(out: str) -> list[str]:   # OUT/checkpoints/step_N folders, oldest first
    return _steps(out)


def latest_checkpoint(out: str) -> str | None:
    return (checkpoints(out) or [None])[-1]


def good_checkpoint(out: str) -> tuple[str | None, list[str]]:
    """-> (the newest checkpoint that read_checkpoint accepts or None, why each newer one is
    not good)."""
    skipped = []
    for path in reversed(checkpoints(out)):
        try:
            read_checkpoint(path)
            return path, skipped
        except (ValueError, OSError) as e:
            skipped.append(str(e))
    return None, skipped


def check_out(out: str, resume: bool = False, overwrite: bool = False):
    """Refuse an `out` holding another run (unless resume or overwrite), and a resume with no
    good checkpoint; -> (the checkpoint to resume from or None, why each newer one is not
    good). Reads only: call it before writing."""
    if (os.path.exists(os.path.join(out, "metrics.jsonl")) or checkpoints(out)) and not (
            resume or overwrite):
        raise FileExistsError(f"--out {out} holds another run; pass --resume to continue it or "
                              f"--overwrite to start again there")
    if not resume:
        return None, []
    path, skipped = good_checkpoint(out)
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out}/checkpoints" +
                                (f" reads back whole: {skipped[0]}" if skipped else ""))
    return path, skipped


def resume_info(out: str) -> tuple[str, dict]:
    """-> (the checkpoint a resume starts from, the run_info it was saved with, its steps
    included)."""
    path, _ = check_out(out, resume=True)
    meta = read_json(os.path.join(path, "state.json"))
    return path, dict(meta.get("run") or {}, steps=meta.get("train", {}).get("steps"))


RUN_FILES = ("run.json", "metrics.jsonl", "adapter", "merged")   # what a run writes in OUT,
                                                    # besides checkpoints/step_N (.tmp, .old)


def run_info(out: str) -> dict | None:
    """The run_info of the run in `out` (from OUT/run.json, else its newest checkpoint): None if
    `out` holds no run, {} if that cannot be read."""
    for f in (os.path.join(out, "run.json"),
              os.path.join(latest_checkpoint(out) or out, "state.json")):
        if os.path.isfile(f):
            try:
                return dict(read_json(f).get("run") or {})
            except (ValueError, OSError):
                return {}
    return {} if os.path.exists(os.path.join(out, "metrics.jsonl")) else None


def clean_run(out: str, extra=()):
    """--overwrite: remove what a run wrote in `out` (RUN_FILES, `extra`, checkpoints/step_N),
    never anything else."""
    names = [n + s for n in RUN_FILES + tuple(extra) for s in ("", ".tmp", ".old")]
    root = os.path.join(out, "checkpoints")
    for path in [os.path.join(out, n) for n in names] + _steps(out, ("", "tmp", "old")):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    if os.path.isdir(root) and not os.listdir(root):
        os.rmdir(root)


_LOCKS = {}   # lock file -> its open file: the run folders this process holds


def lock_run(out: str) -> bool:
    """One run a folder: take an exclusive flock on OUT/.lock, which the kernel drops when the
    process ends however it ends (kill -9 too). -> False if this process held it already;
    OSError if another process holds it."""
    import fcntl
    path = os.path.abspath(os.path.join(out, ".lock"))
    if path in _LOCKS:
        return False
    os.makedirs(out, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise OSError(f"--out {out} is in use by another run ({who}); wait for it to end or "
                      f"use another --out") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    _LOCKS[path] = f
    return True


def unlock_run(out: str):
    f = _LOCKS.pop(os.path.abspath(os.path.join(out, ".lock")), None)
    if f:
        f.close()


def _drop_metrics_after(out: str, step: int) -> int:
    """Resume: remove metric rows past the checkpoint's step (they will be logged again) and a
    row cut short by kill -9; -> how many."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
    return len(lines) - len(keep)


def export_run(out: str, cfg: Config, params: Params, lora: Lora, lcfg: LoraConfig,
               source: str, dtype=jnp.bfloat16, log=print):
    """OUT/adapter (PEFT) and OUT/merged (HF). An old merged/ goes first: a crash between the two
    leaves a new adapter/ and no merged/, never a merged/ of other factors beside it."""
    merged, t = os.path.join(out, "merged"), time.time()
    size = sum(x.size for x in jax.tree.leaves(params)) * jnp.dtype(dtype).itemsize
    log(f"writing {out}/adapter (PEFT) and {merged} (HF, {jnp.dtype(dtype).name}, "
        f"{size / 2**20:,.0f} MiB) ...")
    if jax.process_index() == 0 and os.path.exists(merged):
        shutil.rmtree(merged)
    export_adapter(os.path.join(out, "adapter"), cfg, lora, lcfg, base_model=source)
    export_merged(merged, cfg, params, lora, lcfg, source=source, dtype=dtype)
    log(f"wrote {out}/adapter and {merged} in {time.time() - t:.1f} s")


def evaluate(params, lora, examples, cfg, lcfg, mesh, rows: int, seq_len: int, opts=Options()):
    """Mean answer-token loss over `examples`, one pass (the last batch filled with empties)."""
    nll = n = 0.0
    empty = Example(np.zeros(1, np.int32), np.zeros(1, np.float32))   # predicts nothing
    for i in range(0, len(examples), rows):
        chunk = examples[i:i + rows]
        tokens, weights, segs, _ = next(batches(chunk + [empty] * (rows - len(chunk)), rows,
                                                seq_len, False, 0))
        b = shard(make_batch(tokens, weights, segs), batch_specs(), mesh)
        a, c = loss_sums(params, lora, b, cfg, lcfg, opts, mesh=mesh)
        nll, n = nll + float(a), n + float(c)
    return nll / max(n, 1.0)


def train(cfg: Config, params: Params, lcfg: LoraConfig, tcfg: TrainConfig, examples,
          out: str, mesh, eval_examples=(), opts: Options = Options(), pack: bool = False,
          log_every: int = 10, eval_every: int = 0, save_every: int = 0, keep: int = 3,
          resume: bool = False, overwrite: bool = False, run_info: dict | None = None,
          eval_generate: int = 0, tokenizer: Tokenizer | None = None,
          log=print) -> tuple[Lora, dict]:
    """Fine-tune LoRA adapters on `examples`; -> (trained Lora, summary).

    Writes OUT/metrics.jsonl (one JSON object per log or eval row) and OUT/checkpoints/step_N
    every save_every steps, on SIGINT/SIGTERM and at the end; holds OUT's lock (lock_run) while
    it writes. A signal stops after the step in flight with a checkpoint (summary["interrupted"]
    = the step, ["signal"] = the signal); a second one stops at once (KeyboardInterrupt).
    resume=True continues from the newest good checkpoint exactly (same data order, same
    dropout masks, same optimizer state), dropping metric rows logged after it.
    eval_generate=N: every N steps, greedy answers to 8 held-out prompts, scored (exact match
    and token F1 of the text after '<ANSWER>:', or of the whole answer), decoded by `tokenizer`.
    """
    import signal
    main = jax.process_index() == 0      # on several hosts, process 0 logs and writes
    log = log if main else (lambda *_: None)
    for name, value, least in (("log_every", log_every, 1), ("save_every", save_every, 0),
                               ("eval_every", eval_every, 0), ("keep", keep, 1)):
        if value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    path, skipped = check_out(out, resume, overwrite)   # all is checked before anything is written
    check_tp(cfg, mesh.shape[MODEL])
    opts = dataclasses.replace(opts, packed=pack)
    rows = tcfg.batch_size * tcfg.grad_accum
    if tcfg.batch_size % mesh.shape[DATA]:
        raise ValueError(f"--batch-size {tcfg.batch_size} must be a multiple of the data-parallel "
                         f"size {mesh.shape[DATA]}")
    meta = dict(config=dataclasses.asdict(cfg), lora=dataclasses.asdict(lcfg),
                train=dataclasses.asdict(tcfg), opts=dataclasses.asdict(opts), pack=pack,
                run=run_info or {})
    position, start = (0, 0), 0
    if resume:
        state, saved = load_checkpoint(path, cfg, lcfg, mesh)
        position, start = tuple(saved["data_position"]), int(saved["step"])
    data = batches(examples, rows, tcfg.seq_len, pack, tcfg.seed, position,
                   max_segments=opts.max_segments)   # refuses too few examples, here
    locked = main and lock_run(out)
    if resume:
        for why in skipped:
            log(f"warning: {why}; resuming from the checkpoint before it")
        dropped = _drop_metrics_after(out, start) if main else 0
        log(f"resumed from {path} at step {start}" +
            (f" (dropped {dropped} metric rows logged after it)" if dropped else ""))
    else:
        if overwrite and main:
            clean_run(out)
        if main:   # what this run is: checkpoints repeat it; the demo looks here
            with open(os.path.join(out, "run.json"), "w") as f:
                json.dump(meta, f, indent=2)
        lora = init_lora(jax.random.key(tcfg.seed), cfg, lcfg)
        state = shard(TrainState(lora, adamw_init(lora), jnp.zeros((), jnp.int32)),
                      state_specs(lcfg), mesh)
    compiled = {}   # tokens' shape -> compiled step
    if opts.remat == "auto":   # decided at the longest rows the data can make
        full = accum_batch(make_batch(np.zeros((rows, tcfg.seq_len + 1), np.int32)),
                           tcfg.grad_accum, mesh)
        opts, step_fn, done_full, _ = choose_remat(cfg, lcfg, tcfg, mesh, opts, state, params,
                                                   full, jax.random.key(0), log=log)
        if done_full is not None:
            compiled[(rows, tcfg.seq_len + 1)] = done_full
        meta["opts"] = dataclasses.asdict(opts)
    else:
        step_fn = make_train_step(cfg, lcfg, tcfg, mesh, opts)
    key = jax.random.key(tcfg.seed + 1)   # dropout: step s uses fold_in(key, s)
    interrupted, handlers = [], {}

    def on_signal(sig, frame):   # the first asks for a checkpoint after the step in flight,
        if interrupted:          # then a clean stop; a second one stops now (no print here:
            raise KeyboardInterrupt   # the signal may have come in the middle of one)
        interrupted.append(sig)

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, on_signal)
    except ValueError:   # not the main thread: no handlers, no graceful stop
        pass
    names = ["loss", "gradient"] + [f"lora.{t}.{p}" for t in lcfg.targets for p in "ab"]

    def stop_if_bad():   # a non-finite step: name what went bad and the last good checkpoint
        bad = int(state.bad_step)
        if bad:
            finite = [np.asarray(m["finite"]) for m in jax.device_get(pending)]
            what = next((names[i] for f in finite for i in np.flatnonzero(~f)), "a tensor")
            good = good_checkpoint(out)[0]
            raise FloatingPointError(
                f"non-finite {what} at step {bad}; stopped. " +
                (f"The last good checkpoint (every tensor finite) is {good}" if good else
                 "No good checkpoint was saved") + "; a lower --lr or --clip may help")

    def checkpoint(step):
        nonlocal last_saved
        stop_if_bad()
        save_checkpoint(os.path.join(out, "checkpoints", f"step_{step:08d}"), state,
                        dict(meta, step=step, data_position=list(position)))
        for old in (checkpoints(out) if main else [])[:-keep]:   # keep >= 1: never this one
            shutil.rmtree(old)
        last_saved = step

    def record(row):
        if main:
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    def run_eval(step):
        ev = evaluate(params, state.lora, eval_examples, cfg, lcfg, mesh, tcfg.batch_size,
                      tcfg.seq_len, opts)
        log(f"step {step}/{tcfg.steps}  eval_loss {ev:.4f}  perplexity {math.exp(ev):.2f}")
        record(dict(step=step, eval_loss=ev, eval_perplexity=math.exp(ev)))
        summary["eval_loss"] = ev

    def run_generate(step):
        scores = generate_and_score(params, state.lora, eval_examples[:8], cfg, lcfg, tokenizer,
                                    mesh=mesh)
        log(f"step {step}/{tcfg.steps}  exact_match {scores['exact_match']:.3f}  "
            f"token_f1 {scores['token_f1']:.3f}")
        record(dict(step=step, **scores))
        summary.update(scores)

    def report(done):   # a metrics row for the steps since the last: the loop's only host sync
        nonlocal pending, tokens_seen, flops_seen, t0
        stop_if_bad()
        ms = jax.device_get(pending)
        dt = time.time() - t0
        row = dict(step=done, loss=float(np.mean([x["loss"] for x in ms])),
                   lr=float(ms[-1]["lr"]), grad_norm=float(ms[-1]["grad_norm"]),
                   tokens_per_s=tokens_seen / dt)
        line = (f"step {done}/{tcfg.steps}  loss {row['loss']:.4f}  lr {row['lr']:.2e}"
                f"  grad_norm {row['grad_norm']:.3f}  tokens/s {row['tokens_per_s']:,.0f}")
        if (u := mfu(flops_seen / dt, mesh.size)) is not None:
            row["mfu"] = u
            line += f"  MFU {u:.1%}"
        eta = (time.time() - t_start) / (done - start) * (tcfg.steps - done)
        log(line + f"  ETA {eta / 60:.1f} min")
        record(row)
        summary.update(row)
        pending, tokens_seen, flops_seen, t0 = [], 0, 0.0, time.time()

    pending, tokens_seen, flops_seen, summary = [], 0, 0.0, {}
    done = last_saved = start
    try:
        if eval_every and eval_examples and start == 0:
            run_eval(0)   # the baseline that later evaluations are compared with
        if interrupted:   # a signal before the first step: there is nothing to save, stop now
            raise KeyboardInterrupt
        t0 = t_start = time.time()
        for step in range(start, tcfg.steps):
            tokens, weights, segs, after = next(data)
            b = accum_batch(make_batch(tokens, weights, segs), tcfg.grad_accum, mesh)
            if tokens.shape not in compiled:   # a new length: compile it here, in view and
                # off the clocks (minutes for 7B at long T, seconds from the cache)
                log(f"compiling the training step for {tokens.shape[1] - 1} positions ...")
                compiled[tokens.shape], spent = compile_step(step_fn, (state, params, b, key),
                                                             log)
                t0, t_start = t0 + spent, t_start + spent
            state, m = compiled[tokens.shape](state, params, b, key)
            position = after   # where the data continues once this step counts as done
            pending.append(m)
            real = int((segs > 0).sum())   # tokens; attention FLOPs at this batch's length
            tokens_seen, flops_seen = tokens_seen + real, flops_seen + real * flops_per_token(
                cfg, tokens.shape[1] - 1)
            done = step + 1
            if done % log_every == 0 or done == tcfg.steps or interrupted:
                report(done)
            if eval_every and eval_examples and (done % eval_every == 0 or done == tcfg.steps):
                run_eval(done)
            if eval_generate and eval_examples and done % eval_generate == 0:
                run_generate(done)
            if interrupted:
                checkpoint(done)
                log(f"interrupted at step {done}: checkpoint saved; continue with --resume")
                summary.update(interrupted=done, signal=interrupted[0])
                return state.lora, summary
            if save_every and done % save_every == 0 and done < tcfg.steps:
                checkpoint(done)
        checkpoint(tcfg.steps)
    except Exception as e:   # a crash (out of memory at a new length, ...): keep the steps done
        # if their state survived (a failed step may have consumed its donated input); with
        # several processes the others may be gone, so they cannot save together
        if (done > last_saved and not isinstance(e, FloatingPointError)
                and jax.process_count() == 1
                and not any(x.is_deleted() for x in jax.tree.leaves(state))):
            if pending:   # the steps since the last row: their metrics too
                report(done)
            checkpoint(done)
            log(f"stopped by an error after step {done}: checkpoint saved; continue with --resume")
        raise
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
        if locked:
            unlock_run(out)
    return state.lora, summary
