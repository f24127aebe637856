"""jora.py: tensor-parallel LoRA fine-tuning of Llama-family models in JAX, in one file.

SPDX-License-Identifier: MIT.  Last checked with Python 3.12 and jax 0.11.2.

Read it top to bottom (nothing calls anything defined further down): 1 config, 2 parameters,
3 model, 4 speed and memory, 5 loss, 6 AdamW and the step, 7 data, 8 generation, 9 Hugging Face
files. trainer.py runs a whole training run on it. Copy this file alone into a project: it needs
jax, numpy and einops (safetensors, and sentencepiece or tokenizers, only to read and write
files).

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
gradient meets lm_head in `dtype`, like every other matmul's: see logits_matmul). Config.fp8:
the seven frozen projections in float8 e4m3 with a scale per output channel (Fp8), their GEMMs
in float8 too (fp8_matmul); everything else as above.

Errors in what a user gives (files, records, flags) are ValueError or OSError with one line that
names the file, record, field or flag.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"   # the two mesh axes
PROJ = ("q", "k", "v", "o", "gate", "up", "down")   # the seven projections LoRA may target
COLUMN = ("q", "k", "v", "gate", "up")               # split on output; "o", "down" on input
JSON_KIND = {dict: "a JSON object", list: "a JSON list", str: "a JSON string", int: "a number",
         float: "a number", bool: "true/false", type(None): "null"}


def read_text(path: str) -> str:
    """A UTF-8 text file's contents, without the byte-order mark some editors write first; an
    error names the file."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (gzipped?): byte {e.start} is "
                         f"{raw[e.start]:#04x}") from None


def read_json(path: str, expect=dict, shape: str = "a JSON object"):
    """A JSON file's value, which must be of type `expect` (described as `shape` if not)."""
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(value, expect):
        raise ValueError(f"{path}: holds {JSON_KIND.get(type(value), 'JSON')} where {shape} was "
                         f"expected")
    return value


# 1. Config --------------------------------------------------------------------------------------

# The families Config.from_hf reads: HF model_type -> the architecture its exports name.
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class Config:
    """Architecture of a Llama-family model: Llama-2 and 3.x, Mistral, Qwen2 and Qwen2.5, Qwen3.
    They share one decoder; the fields after max_positions say where they differ. Frozen, hence
    hashable: a static jit argument."""
    vocab_size: int = 32_000      # V
    d_model: int = 4096           # D
    d_ff: int = 11_008            # F
    n_layers: int = 32            # L
    n_heads: int = 32             # N
    n_kv_heads: int = 32          # K (fewer than N: grouped-query attention)
    head_dim: int = 128           # H (Qwen3: N * H need not be D)
    rope_theta: float = 10_000.0
    rope_scale: float = 1.0       # linear: positions are divided by it; llama3: its `factor`
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # lm_head = embed^T (small models)
    max_positions: int = 4096
    bos_id: int = 1
    eos_id: int = 2
    family: str = "llama"         # HF model_type, a key of FAMILIES
    rope_type: str = "default"    # default | linear | llama3 (Llama-3.1's frequency scaling)
    rope_low_freq: float = 1.0    # llama3: low_freq_factor
    rope_high_freq: float = 4.0   # llama3: high_freq_factor
    rope_original: int = 8192     # llama3: original_max_position_embeddings
    qkv_bias: bool = False        # Qwen2: a bias on the q, k and v projections
    qk_norm: bool = False         # Qwen3: RMSNorm over each head of q and of k, before RoPE
    sliding_window: int = 0       # Mistral v0.1: attend to the last W positions only (0: all)
    stop_ids: tuple[int, ...] = ()   # generation also stops at these (Llama-3's <|eot_id|>)
    fp8: bool = False             # the frozen projections held in float8 (Fp8): jora's choice,
                                  # not a field of HF's config
    fp8_transposed: bool = False  # and each also transposed (Fp8.qt): faster backward, the
                                  # weights' bytes doubled (to bf16's)

    @property
    def padded_vocab(self) -> int:   # lm_head columns: a multiple of 128, so any tp divides it
        return -(-self.vocab_size // 128) * 128

    @property
    def end_ids(self) -> tuple[int, ...]:   # every id that ends a generation
        return (self.eos_id, *[i for i in self.stop_ids if i != self.eos_id])

    @classmethod
    def from_hf(cls, config) -> "Config":
        """Read an HF config.json (a path, a folder or a dict) of a model_type in FAMILIES, as
        written by transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`)."""
        src = "config"
        if not isinstance(config, dict):
            src = os.path.join(config, "config.json") if os.path.isdir(config) else config
            config = read_json(src, dict, "a JSON object (an HF model's config)")

        def get(key, default=...):
            if config.get(key) is None:
                if default is ...:
                    raise ValueError(f"{src}: missing field '{key}'")
                return default
            return config[key]

        def refuse(key, value, why):
            raise ValueError(f"{src}: unsupported {key}={value!r} ({why})")

        def number(key, default=..., kind=int, least=1, value=...):
            """An integer >= least, or a float > 0: config[key], or `value` when given."""
            v = get(key, default) if value is ... else value
            if (isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int)
                    or not (least <= v if kind is int else 0 < v < math.inf)):
                raise ValueError(f"{src}: field '{key}' is {v!r}; it must be " +
                                 (f"an integer >= {least}" if kind is int else "a number > 0"))
            return kind(v)

        family = get("model_type", "llama")
        if family not in FAMILIES:
            refuse("model_type", family, f"supported: {', '.join(FAMILIES)}")
        if get("hidden_act", "silu") != "silu":
            refuse("hidden_act", config["hidden_act"], "these families use silu")
        for key in ("attention_bias", "mlp_bias"):   # (Qwen2's q, k, v biases need no flag)
            if get(key, False):
                refuse(key, True, f"{family} projections here have no bias")
        if get("use_sliding_window", False):
            refuse("use_sliding_window", True, "Qwen's sliding window is not implemented")
        window = get("sliding_window", None) if family == "mistral" else None
        scaling = dict(get("rope_scaling", None) or {})   # transformers 5: rope_parameters
        scaling.update(get("rope_parameters", None) or {})
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            refuse("rope_scaling.rope_type", rope_type, "default, linear and llama3 are "
                   "implemented")
        llama3 = rope_type == "llama3"
        d, n = number("hidden_size"), number("num_attention_heads")
        eos = get("eos_token_id", 2)   # a list in Llama-3's configs: all of them end a reply
        ends = eos if isinstance(eos, list) and eos else [eos]
        generation = os.path.join(os.path.dirname(src), "generation_config.json")
        if src != "config" and os.path.exists(generation):   # its end ids stop generation too
            more = read_json(generation).get("eos_token_id")
            more = more if isinstance(more, list) else [] if more is None else [more]
            ends = list(dict.fromkeys(ends + more))
        cfg = cls(vocab_size=number("vocab_size"), d_model=d, d_ff=number("intermediate_size"),
                  n_layers=number("num_hidden_layers"), n_heads=n,
                  n_kv_heads=number("num_key_value_heads", n),
                  head_dim=number("head_dim", d // n),
                  rope_theta=number("rope_theta", kind=float,
                                    value=scaling.get("rope_theta", get("rope_theta", 1e4))),
                  rope_scale=1.0 if rope_type == "default" else
                  number("rope_scaling.factor", kind=float, value=scaling.get("factor")),
                  norm_eps=number("rms_norm_eps", 1e-6, float),
                  tie_embeddings=bool(get("tie_word_embeddings", False)),
                  max_positions=number("max_position_embeddings", 4096),
                  bos_id=number("bos_token_id", 1, least=0),
                  eos_id=number("eos_token_id", least=0, value=ends[0]),
                  family=family, rope_type=rope_type,
                  rope_low_freq=number("rope_scaling.low_freq_factor", kind=float,
                                       value=scaling.get("low_freq_factor")) if llama3 else 1.0,
                  rope_high_freq=number("rope_scaling.high_freq_factor", kind=float,
                                        value=scaling.get("high_freq_factor")) if llama3 else 4.0,
                  rope_original=number("rope_scaling.original_max_position_embeddings",
                                       value=scaling.get("original_max_position_embeddings"))
                  if llama3 else 8192,
                  qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
                  sliding_window=0 if window is None else number("sliding_window", value=window),
                  stop_ids=tuple(number("eos_token_id", least=0, value=i) for i in ends[1:]))
        if cfg.n_heads % cfg.n_kv_heads:
            refuse("num_key_value_heads", cfg.n_kv_heads,
                   f"must divide num_attention_heads={cfg.n_heads}")
        return cfg

    def to_hf(self) -> dict:
        """The config.json that transformers needs to load an exported model."""
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type != "default":
            rope["factor"] = self.rope_scale
        if self.rope_type == "llama3":
            rope.update(low_freq_factor=self.rope_low_freq, high_freq_factor=self.rope_high_freq,
                        original_max_position_embeddings=self.rope_original)
        out = dict(architectures=[FAMILIES[self.family]], model_type=self.family,
                   vocab_size=self.vocab_size, hidden_size=self.d_model,
                   intermediate_size=self.d_ff, num_hidden_layers=self.n_layers,
                   num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
                   head_dim=self.head_dim, rope_theta=self.rope_theta,
                   rope_scaling=None if self.rope_type == "default" else
                   dict(rope, type=self.rope_type),   # transformers 4 reads these two,
                   rope_parameters=rope,              # 5 this one
                   rms_norm_eps=self.norm_eps, tie_word_embeddings=self.tie_embeddings,
                   max_position_embeddings=self.max_positions, hidden_act="silu",
                   bos_token_id=self.bos_id, eos_token_id=list(self.end_ids)
                   if self.stop_ids else self.eos_id, torch_dtype="bfloat16")
        if self.family in ("llama", "qwen3"):
            out.update(attention_bias=False)
        if self.family == "llama":
            out.update(mlp_bias=False)
        if self.family == "mistral":
            out.update(sliding_window=self.sliding_window or None)
        if self.family in ("qwen2", "qwen3"):
            out.update(use_sliding_window=False, sliding_window=None)
        return out


LLAMA2_7B = Config()
LLAMA2_13B = Config(d_model=5120, d_ff=13_824, n_layers=40, n_heads=40, n_kv_heads=40)
LLAMA2_70B = Config(d_model=8192, d_ff=28_672, n_layers=80, n_heads=64, n_kv_heads=8)
LLAMA31_8B = Config(vocab_size=128_256, d_model=4096, d_ff=14_336, n_layers=32, n_heads=32,
                    n_kv_heads=8, rope_theta=5e5, rope_type="llama3", rope_scale=8.0,
                    max_positions=131_072, bos_id=128_000, eos_id=128_001,
                    stop_ids=(128_008, 128_009))
QWEN25_7B = Config(vocab_size=152_064, d_model=3584, d_ff=18_944, n_layers=28, n_heads=28,
                   n_kv_heads=4, rope_theta=1e6, norm_eps=1e-6, max_positions=32_768,
                   bos_id=151_643, eos_id=151_645, family="qwen2", qkv_bias=True)
TINY = Config(vocab_size=256, d_model=64, d_ff=160, n_layers=2, n_heads=4, n_kv_heads=2,
              head_dim=16, max_positions=512)   # tests and the built-in demo
PRESETS = {"7b": LLAMA2_7B, "13b": LLAMA2_13B, "70b": LLAMA2_70B, "llama3-8b": LLAMA31_8B,
           "qwen2.5-7b": QWEN25_7B, "tiny": TINY}


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
    """What the model attends to, and with which attention kernel. (How fast the layers run,
    and in how much memory, is a Plan.)"""
    attention: str = "auto"   # auto (cudnn on GPU, xla elsewhere) | cudnn | xla
    packed: bool = True       # rows hold several examples: attend within each segment only.
                              # False (one example a row, padding at the end) needs no mask,
                              # which lets flash attention skip building a (T, T) one
    max_segments: int = 8     # packed rows: at most M runs of one segment id (the examples and
                              # the padding tail), whose offsets cuDNN takes instead of a
                              # (T, T) mask; memory grows with M. 0: the mask

    def __post_init__(self):
        if self.attention not in ("auto", "cudnn", "xla"):
            raise ValueError(f"attention must be auto, cudnn or xla, got {self.attention!r}")
        if self.max_segments < 0 or self.max_segments == 1:
            raise ValueError(f"max_segments must be 0 (a (T, T) mask) or >= 2 (an example and "
                             f"the padding after it), got {self.max_segments}")


# 2. Parameters, and how each is split over the mesh ---------------------------------------------

class Layer(NamedTuple):
    """One field per weight of a decoder layer, stacked over the L layers: each leaf (L, ...).
    Unrolled (unstack_layers, what train.py runs), each leaf is instead a tuple of L one-layer
    slices (1, ...). With Config.fp8, each of the seven projections is an Fp8 of such leaves."""
    attn_norm: jax.Array      # (L, D)
    wq: jax.Array             # (L, D, N*H)   stored (in, out): HF's weight transposed
    wk: jax.Array             # (L, D, K*H)
    wv: jax.Array             # (L, D, K*H)
    wo: jax.Array             # (L, N*H, D)
    mlp_norm: jax.Array       # (L, D)
    w_gate: jax.Array         # (L, D, F)
    w_up: jax.Array           # (L, D, F)
    w_down: jax.Array         # (L, F, D)
    bq: jax.Array | None = None       # (L, N*H) Qwen2's biases (qkv_bias); None elsewhere
    bk: jax.Array | None = None       # (L, K*H)
    bv: jax.Array | None = None       # (L, K*H)
    q_norm: jax.Array | None = None   # (L, H) Qwen3's per-head norms (qk_norm); None elsewhere
    k_norm: jax.Array | None = None   # (L, H)


BIASES, HEAD_NORMS = ("bq", "bk", "bv"), ("q_norm", "k_norm")


def layer_fields(cfg: Config) -> tuple[str, ...]:
    """The Layer fields a model of this config has (the rest stay None)."""
    extra = BIASES * cfg.qkv_bias + HEAD_NORMS * cfg.qk_norm
    return Layer._fields[:9] + extra


class Fp8(NamedTuple):
    """A frozen projection W (I, O) in float8 (Config.fp8): W = q.T * scale, one scale per
    output channel. q keeps HF's (O, I) layout: Hopper's FP8 GEMMs (cuBLASLt's, and wgmma's)
    read 8-bit operands only along the contracted axis, which is I in the forward and O in the
    input gradient's. That one reads qt, q transposed once (Config.fp8_transposed), or else
    has XLA transpose q at every step (slowly: 8-bit transposes run far below memory speed)."""
    q: jax.Array                 # (L, O, I) float8_e4m3fn
    scale: jax.Array             # (L, O) fp32
    qt: jax.Array | None = None  # (L, I, O) q transposed, or None


E4M3 = jnp.float8_e4m3fn   # 3 mantissa bits: the weights and the activations
# The output gradients too: with a scale per position, e5m2's wider range buys nothing, and its
# 2 mantissa bits round twice as coarsely.
GRAD_FP8 = jnp.float8_e4m3fn


def to_fp8(x, dtype=E4M3, *, reduce=None):
    """x (..., C) -> (q, scale): q (..., C) float8 and scale (..., 1) fp32 with x ~ q * scale,
    one scale per slice along the last axis, mapping the slice's largest |x| to the format's
    largest finite value. reduce(amax): the largest over slices held elsewhere (a mesh axis)."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    if reduce is not None:
        amax = reduce(amax)
    top = float(jnp.finfo(dtype).max)
    scale = jnp.where(amax > 0, amax / top, 1.0)
    # e4m3fn has no infinity: a value rounded past the top would become NaN, so clip first
    return jnp.clip(x / scale, -top, top).astype(dtype), scale


def fp8_weight(w, transposed: bool = False) -> Fp8:
    """w (..., I, O) -> its Fp8, one scale per output channel (transposed: with qt)."""
    q, scale = to_fp8(jnp.swapaxes(w, -1, -2))
    return Fp8(q=q, scale=scale[..., 0], qt=jnp.swapaxes(q, -1, -2) if transposed else None)


def dequantize(w: Fp8, dtype=jnp.float32):
    """Fp8 -> W (..., I, O) in dtype."""
    return jnp.swapaxes(w.q.astype(jnp.float32) * w.scale[..., None], -1, -2).astype(dtype)


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


def param_specs(cfg: Config | None = None) -> Params:
    """Params-shaped tree of PartitionSpecs: how each weight is laid out on the "model" axis.
    cfg: which optional fields the model has (None: a Llama, which has none of them)."""
    cfg = cfg or Config()
    col, row = P(None, None, MODEL), P(None, MODEL, None)
    if cfg.fp8:   # q (L, O, I) split as W (L, I, O) is; the scales with their channels
        t = cfg.fp8_transposed
        col = Fp8(q=P(None, MODEL, None), scale=P(None, MODEL), qt=col if t else None)
        row = Fp8(q=P(None, None, MODEL), scale=P(), qt=row if t else None)
    extra = dict(bq=P(None, MODEL), bk=P(None, MODEL), bv=P(None, MODEL),   # like q, k, v
                 q_norm=P(), k_norm=P())
    return Params(embed=P(), final_norm=P(), lm_head=P(None, MODEL),
                  layers=Layer(attn_norm=P(), mlp_norm=P(), wq=col, wk=col, wv=col, wo=row,
                               w_gate=col, w_up=col, w_down=row,
                               **{f: spec for f, spec in extra.items()
                                  if f in layer_fields(cfg)}))


def lora_specs(lcfg: LoraConfig) -> Lora:
    col = LoraAB(a=P(), b=P(None, None, MODEL))   # A replicated, B split like W's output
    row = LoraAB(a=P(None, MODEL, None), b=P())   # A split like W's input, B replicated
    return Lora(**{t: (col if t in COLUMN else row) for t in lcfg.targets})


def proj_shape(cfg: Config, target: str) -> tuple[int, int]:   # (I, O) of one projection
    D, F, NH, KH = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return dict(q=(D, NH), k=(D, KH), v=(D, KH), o=(NH, D), gate=(D, F), up=(D, F),
                down=(F, D))[target]


def param_shapes(cfg: Config) -> Params:
    L, D, V = cfg.n_layers, cfg.d_model, cfg.vocab_size
    w = {WEIGHT[t]: (L, *proj_shape(cfg, t)) for t in PROJ}
    extra = dict(bq=(L, proj_shape(cfg, "q")[1]), bk=(L, proj_shape(cfg, "k")[1]),
                 bv=(L, proj_shape(cfg, "v")[1]), q_norm=(L, cfg.head_dim),
                 k_norm=(L, cfg.head_dim))
    fields = layer_fields(cfg)
    return Params(embed=(V, D), final_norm=(D,), lm_head=(D, cfg.padded_vocab),
                  layers=Layer(attn_norm=(L, D), mlp_norm=(L, D), **w,
                               **{f: shape for f, shape in extra.items() if f in fields}))


def init_params(key, cfg: Config, dtype=jnp.bfloat16) -> Params:
    """Random weights (normal, std 0.02; norms 1; Fp8 projections with Config.fp8) for tests
    and benchmarks. Jit it with out_shardings to create a large model directly in its sharded
    layout."""
    shapes = param_shapes(cfg)
    keys = iter(jax.random.split(key, 4 + len(layer_fields(cfg))))

    def init(name, shape):
        if name.endswith("norm"):
            return jnp.ones(shape, dtype)
        w = 0.02 * jax.random.normal(next(keys), shape, dtype)
        return fp8_weight(w, cfg.fp8_transposed) if cfg.fp8 and name in TARGET else w

    return Params(embed=init("embed", shapes.embed), final_norm=init("norm", shapes.final_norm),
                  lm_head=init("lm_head", shapes.lm_head),
                  layers=Layer(**{f: init(f, getattr(shapes.layers, f))
                                  for f in layer_fields(cfg)}))


def init_lora(key, cfg: Config, lcfg: LoraConfig) -> Lora:
    """A ~ U(-1/sqrt(I), 1/sqrt(I)) (PEFT's kaiming_uniform_ with a=sqrt(5)), B = 0: fp32."""
    out = {}
    for k, t in zip(jax.random.split(key, len(lcfg.targets)), lcfg.targets):
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
    """Place every array of `tree` on `mesh`, split as the congruent `specs` tree says. On
    several hosts each process passes the same values and sends its own devices' slices."""
    def put(x, spec):
        sharding = NamedSharding(mesh, spec)
        if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(put, tree, specs)


def mesh_of(params: Params):
    """The mesh the parameters were placed on (one device if none)."""
    e = params.embed
    s = None if isinstance(e, jax.core.Tracer) else getattr(e, "sharding", None)
    return s.mesh if isinstance(s, NamedSharding) else make_mesh(1, jax.devices()[:1])


# 3. Model: one decoder layer (it runs inside shard_map, so shapes are per device) ---------------

def rms_norm(x, w, eps):
    """x (..., D) -> same dtype; statistics in fp32 (Zhang & Sennrich 2019)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * y.astype(x.dtype)   # HF multiplies in the activation dtype


def llama3_frequencies(inv_freq, cfg: Config):
    """Llama-3.1's RoPE scaling of the rotation frequencies (H/2,): wavelengths longer than the
    original context / low_freq_factor are stretched by `factor` (slowed down), those shorter
    than original / high_freq_factor are kept, and those between move smoothly from one to
    the other. Positions themselves are not scaled."""
    wavelength = 2 * math.pi / inv_freq
    long = wavelength > cfg.rope_original / cfg.rope_low_freq
    short = wavelength < cfg.rope_original / cfg.rope_high_freq
    # 0 at the long end of the band, 1 at the short end.
    smooth = ((cfg.rope_original / wavelength - cfg.rope_low_freq)
              / (cfg.rope_high_freq - cfg.rope_low_freq))
    between = (1 - smooth) * inv_freq / cfg.rope_scale + smooth * inv_freq
    return jnp.where(long, inv_freq / cfg.rope_scale, jnp.where(short, inv_freq, between))


def rope(x, positions, cfg: Config):
    """Rotary embedding in HF's rotate-half layout: pairs (x[i], x[i + H/2]) are rotated.
    x (B, T, X, H), positions (B, T) -> (B, T, X, H). HF checkpoints store q/k rows in this
    layout, so their weights load unpermuted. Linear scaling divides the positions by
    rope_scale; Llama-3's scales the frequencies instead."""
    H = x.shape[-1]
    inv_freq = cfg.rope_theta ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)    # (H/2,)
    if cfg.rope_type == "llama3":
        inv_freq = llama3_frequencies(inv_freq, cfg)
    divide = cfg.rope_scale if cfg.rope_type == "linear" else 1.0
    angle = (positions.astype(jnp.float32) / divide)[..., None] * inv_freq        # (B, T, H/2)
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

        def iota(n, at):   # the global indices at, at + 1, ..., at + n - 1
            return jnp.arange(n, dtype=jnp.uint32) + jnp.asarray(at).astype(jnp.uint32)

        row = mix32(self.seed ^ mix32(iota(B, self.row)))[:, None, None]             # (B, 1, 1)
        pos = mix32(row + iota(T, self.pos)[None, :, None])                           # (B, T, 1)
        bits = mix32(pos ^ (iota(I, self.feat) * jnp.uint32(0x9E3779B9)))             # (B, T, I)
        keep = bits >= jnp.uint32(min(round(p * 2.0**32), 2**32 - 1))
        return jnp.where(keep, x * (1.0 / (1.0 - p)), 0).astype(x.dtype)


def vary_alike(*xs):
    """Inside shard_map: each x cast to the union of the operands' varying mesh axes. Done
    before a custom_vjp (whose rule sees operands already alike), the casts' transposes sum
    the gradient of an operand that is the same on every slice of an axis over that axis
    (a row-parallel LoRA A differs per model slice, B does not; lm_head does, h does not)."""
    types = [getattr(jax.typeof(x), "manual_axis_type", None) for x in xs]
    if any(t is None for t in types):   # not inside shard_map
        return xs
    union = frozenset().union(*(t.varying for t in types))
    return tuple(jax.lax.pcast(x, tuple(sorted(union - t.varying)), to="varying")
                 if union - t.varying else x for x, t in zip(xs, types))


def _lora_fwd(x, a, b, scale):
    xa = (scale * jnp.einsum("BTI,IR->BTR", x, a.astype(x.dtype),
                             preferred_element_type=jnp.float32)).astype(x.dtype)   # (B, T, R)
    return jnp.einsum("BTR,RO->BTO", xa, b.astype(x.dtype)), (x, xa, a, b)


def _lora_bwd(scale, res, g):   # g (B, T, O): the output's gradient, in x's dtype
    x, xa, a, b = res
    f32, dt = jnp.float32, x.dtype
    gb = (scale * jnp.einsum("BTO,RO->BTR", g, b.astype(dt), preferred_element_type=f32)
          ).astype(dt)                                  # (B, T, R): the gradient of x @ A
    dx = jnp.einsum("BTR,IR->BTI", gb, a.astype(dt))                            # (B, T, I)
    da = jnp.einsum("BTI,BTR->IR", x, gb, preferred_element_type=f32)
    db = jnp.einsum("BTR,BTO->RO", xa, g, preferred_element_type=f32)
    return dx, da.astype(a.dtype), db.astype(b.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_delta(x, a, b, scale: float):
    """scale * x (B, T, I) @ A (I, R) @ B (R, O) -> (B, T, O) in x's dtype.
    Every (B, T, .) tensor stays in x's dtype, so that XLA adds the result to x @ W in that
    GEMM's epilogue; every matmul accumulates in fp32, and the scale multiplies only (B, T, R)
    tensors. The backward is written out so that dA and dB, sums over all positions, are fp32
    (autodiff's would be rounded to x's dtype). Call it on vary_alike operands."""
    return _lora_fwd(x, a, b, scale)[0]


lora_delta.defvjp(_lora_fwd, _lora_bwd)


def model_max(a):
    """The largest of `a` over the "model" axis's slices (inside shard_map), else `a`."""
    try:
        return jax.lax.pmax(a, MODEL)
    except NameError:   # not inside shard_map: nothing else holds a slice
        return a


def model_size() -> int:
    """The "model" axis's size (inside shard_map), else 1."""
    try:
        return jax.lax.axis_size(MODEL)
    except NameError:
        return 1


def fp8_rows(x, c, dtype, *, split: bool, kernel=None):
    """x (B, T, C) [* c (C,) fp32] -> to_fp8's (q (B, T, C), scale (B, T, 1)), one scale per
    position. split: the rows' features are split over "model" (their amax is a pmax then).
    kernel: (x (M, C), c, dtype) -> (q, s (M,)), the same in one kernel for rows held whole
    (kernel_fp8_rows)."""
    if kernel is None or (split and model_size() > 1):
        x = x if c is None else x.astype(jnp.float32) * c
        return to_fp8(x, dtype, reduce=model_max if split else None)
    q, s = kernel(x.reshape(-1, x.shape[-1]), c, dtype)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


def fp8_dot(a, w: Fp8, *, back: bool = False, dtype=jnp.bfloat16, s=None):
    """a (..., K) float8 against W's float8 values, fp32 accumulation -> (..., N) in dtype:
    forward, K = I against q (O, I); back (the input gradient), K = O against qt (I, O), or
    q's axis 0 where there is no qt (XLA transposes it). s (..., 1): a's scale per row, so
    that the result is the true product: times s, and in the forward times W's scales (the
    backward's a carries them already); None: the raw product."""
    wt, k_axis = (w.q, 1) if not back else (w.q, 0) if w.qt is None else (w.qt, 1)
    y = jax.lax.dot_general(a, wt, (((a.ndim - 1,), (k_axis,)), ((), ())),
                            preferred_element_type=dtype)
    if s is None:
        return y
    return y * s if back else y * s * w.scale


def _fp8_fwd(x, w: Fp8, row: bool, kernel):
    xq, sx = fp8_rows(x, None, E4M3, split=row, kernel=kernel)      # (B, T, I), (B, T, 1)
    y = fp8_dot(xq, w, dtype=x.dtype, s=sx)                           # (B, T, O)
    return y.astype(x.dtype), w


def _fp8_bwd(row: bool, kernel, w: Fp8, g):   # g (B, T, O)
    # scale (O,) is on the contracted axis now: folded into g before it is quantized
    gq, sg = fp8_rows(g, w.scale, GRAD_FP8, split=not row, kernel=kernel)
    dx = fp8_dot(gq, w, back=True, dtype=g.dtype, s=sg)               # (B, T, I)
    return dx.astype(g.dtype), None   # W is frozen: no gradient


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fp8_matmul(x, w: Fp8, row: bool = False, kernel=None):
    """x (B, T, I) @ W (I, O) for an Fp8 W, in float8 GEMMs with fp32 accumulation: x is
    quantized to e4m3 with a scale per position, and in the backward the output's gradient
    likewise, so each GEMM's scales are a row and a column factor of its result. row: the
    projection is row-parallel (x's features split over "model"; else its outputs are): the
    scales are taken over whole rows then, so that any tp quantizes alike. kernel: how rows
    are quantized (fp8_rows)."""
    return _fp8_fwd(x, w, row, kernel)[0]


fp8_matmul.defvjp(_fp8_fwd, _fp8_bwd)


def vary_with_fp8(x, *ws: Fp8):
    """vary_alike for x and Fp8 weights (whose qt may be None) -> (x, *ws), cast alike."""
    x, *leaves = vary_alike(x, *(a for w in ws for a in w if a is not None))
    leaves = iter(leaves)
    return (x, *(Fp8(*(None if a is None else next(leaves) for a in w)) for w in ws))


def project(x, w, ab: LoraAB | None, lcfg: LoraConfig | None, drop: Dropout | None = None,
            *, row: bool = False, fp8_kernel=None):
    """x (B, T, I) @ w (I, O) [+ scale * dropout(x) @ A @ B] -> (B, T, O); never forms A @ B.
    drop: where x sits, for the dropout mask (None: no dropout, as in evaluation). w may be an
    Fp8 (row: it is row-parallel; fp8_kernel: see fp8_matmul)."""
    if isinstance(w, Fp8):
        y = fp8_matmul(*vary_with_fp8(x, w), row, fp8_kernel)
    else:
        y = jnp.einsum("BTI,IO->BTO", x, w)
    if ab is None:
        return y
    if drop is not None and lcfg.dropout > 0:
        x = drop.apply(x, lcfg.dropout)
    return y + lora_delta(*vary_alike(x, ab.a, ab.b), lcfg.scale)


def swiglu(g, u):   # the MLP's gate (Shazeer 2020), g and u (B, T, F/tp)
    return jax.nn.silu(g) * u


def attend_masked(q, k, v, allowed):
    """Grouped-query attention. q (B, T, N, H), k/v (B, S, K, H), allowed (B, T, S) bool
    -> (B, T, N, H). Query head n reads KV head n // G, so no KV head is ever copied."""
    qg = rearrange(q, "B T (K G) H -> B T K G H", K=k.shape[2])
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    s = jnp.where(allowed[:, None, None], s * q.shape[-1] ** -0.5, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)                                 # (B,K,G,T,S)
    return rearrange(jnp.einsum("BKGTS,BSKH->BTKGH", p, v), "B T K G H -> B T (K G) H")


def segment_starts(segment_ids):
    """(..., T) -> (..., T) bool: True where a run of one segment id begins (numpy or jnp)."""
    xp = np if isinstance(segment_ids, np.ndarray) else jnp
    first = xp.ones_like(segment_ids[..., :1], dtype=bool)
    return xp.concatenate([first, segment_ids[..., 1:] != segment_ids[..., :-1]], -1)


def segment_runs(segment_ids, max_runs: int):
    """segment_ids (B, T) -> (starts (B, M + 1), lengths (B, M)) int32 of each row's runs of
    equal id, in order, -1 past the last (cuDNN's packed layout); M = max_runs. A row with
    more runs than M does not fit: its starts[:, M] is then >= 0."""
    run = jnp.cumsum(segment_starts(segment_ids), axis=1, dtype=jnp.int32) - 1   # (B, T)
    r = jnp.arange(max_runs + 1, dtype=jnp.int32)
    starts = jnp.sum(run[:, :, None] < r, axis=1, dtype=jnp.int32)   # (B, M+1): T past the end
    present = r < run[:, -1:] + 1                                            # (B, M+1)
    lengths = jnp.where(present[:, :-1], starts[:, 1:] - starts[:, :-1], -1)
    return jnp.where(present, starts, -1), lengths


def attend(q, k, v, segment_ids, opts: Options, window: int = 0):
    """Causal self-attention. q (B, T, N, H), k/v (B, T, K, H) -> like q. segment_ids (B, T) or
    None: a position attends only within its own segment (packed rows). window > 0 (Mistral
    v0.1's sliding window): position t attends to positions t - window + 1 ... t only. cuDNN
    with max_segments > 0 attends within each row's runs of one segment id, given as offsets,
    skipping the blocks across runs; else a (T, T) mask (flash attention: an additive bias)."""
    impl = opts.attention
    if impl == "auto":
        impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    if impl == "cudnn" and segment_ids is not None and opts.max_segments:
        # jax's public API takes no offsets (0.11.2); its cuDNN wrapper does
        from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
        starts, lengths = segment_runs(segment_ids, opts.max_segments)
        o = dot_product_attention(q, k, v, None, None, lengths, lengths, starts, starts,
                                  scale=q.shape[-1] ** -0.5, mask_type=MaskType.CAUSAL,
                                  sliding_window_length=window or None)
        # A row with more runs than the offsets hold spoils other rows too: all NaN, so that
        # the step's finiteness check flags it instead of training on attention across examples.
        return jnp.where(jnp.any(starts[:, -1] >= 0), jnp.nan, o)
    same = None if segment_ids is None else segment_ids[:, :, None] == segment_ids[:, None, :]
    if impl == "cudnn":   # flash attention: (T, T) scores are never stored
        return jax.nn.dot_product_attention(q, k, v, mask=None if same is None else
                                            same[:, None], is_causal=True, implementation="cudnn",
                                            local_window_size=(window - 1, 0) if window else None)
    T = q.shape[1]
    allowed = jnp.tril(jnp.ones((T, T), bool))[None]                               # s <= t
    if window:
        allowed = allowed & ~jnp.tril(jnp.ones((T, T), bool), -window)[None]       # t - s < W
    return attend_masked(q, k, v, allowed if same is None else allowed & same)


def tag(x, name: str):
    """Names a value for the remat policies (Plan.remat): "min" keeps the tagged values and
    recomputes the rest. Without a policy it is the identity."""
    return checkpoint_name(x, name)


class Ops(NamedTuple):
    """How a decoder layer computes its heavy parts. The defaults are the plain functions
    above; the speed-and-memory section swaps in kernels and MLP chunks as a Plan says. None
    of them changes what the layer computes, only how fast and in how much memory."""
    project: Callable = project        # (x, w, ab, lcfg, drop, row=) -> x @ w [+ LoRA]
    swiglu: Callable = swiglu          # (g, u) -> silu(g) * u
    gate_up: Callable | None = None    # (h, w_gate, w_up) -> swiglu(h @ w_gate, h @ w_up)
    fp8_mlp: Callable | None = None    # (h, w_gate, w_up, w_down) -> the MLP, all three Fp8
    mlp_over: Callable | None = None   # (mlp, h) -> mlp(h, s) over chunks of positions


def decoder_layer(x, w: Layer, ab: Lora, positions, attn, *, cfg: Config,
                  lcfg: LoraConfig | None, drop: Dropout | None = None, sp: bool = False,
                  ops: Ops = Ops()):
    """One pre-norm Llama block: x (B, T, D), replicated over "model" -> (x', attn's aux).
    attn(q, k, v) -> (o, aux): plain causal attention when training, attention over a KV cache
    (aux = the updated cache) when generating. drop: this layer's dropout seed and this device's
    first global row (None: no dropout). sp (sequence parallelism, Korthikanti et al. 2022): x is
    (B, T/tp, D), this device's slice of the positions, all-gathered before the column-parallel
    projections; the row-parallel sums are reduce-scattered back to slices instead of
    all-reduced. The same bytes move, but norms, residuals and the activations remat keeps
    shrink by tp. ops: how the projections and the MLP run (plain XLA by default)."""

    def gather(h):   # (B, T/tp, D) slices -> (B, T, D) under sp
        return jax.lax.all_gather(h, MODEL, axis=1, tiled=True) if sp else h

    def reduce(y):   # the row-parallel projections' partial sums -> their sum
        if sp:
            return jax.lax.psum_scatter(y, MODEL, scatter_dimension=1, tiled=True)
        return jax.lax.psum(y, MODEL)

    def linear(t, x, pos=0):   # projection t of x, with its own dropout mask
        d = None
        if drop is not None:   # row-parallel inputs (o, down) hold a slice of the features
            feat = 0 if t in COLUMN else jax.lax.axis_index(MODEL) * x.shape[-1]
            d = drop._replace(seed=mix32(drop.seed + PROJ.index(t)), pos=pos, feat=feat)
        return ops.project(x, getattr(w, WEIGHT[t]), getattr(ab, t), lcfg, d,
                           row=t not in COLUMN)

    def heads(y):   # (B, T, X*H) -> (B, T, X, H), X: N/tp or K/tp
        return rearrange(y, "B T (X H) -> B T X H", H=cfg.head_dim)

    h = gather(rms_norm(x, w.attn_norm, cfg.norm_eps))
    def heads_of(t, bias):   # projection t of h, plus its bias (Qwen2's q, k, v), as heads
        y = linear(t, h)
        return heads(y if bias is None else y + bias)

    q, k, v = heads_of("q", w.bq), heads_of("k", w.bk), heads_of("v", w.bv)
    if w.q_norm is not None:   # Qwen3: each head of q and k normalised on its own
        q, k = rms_norm(q, w.q_norm, cfg.norm_eps), rms_norm(k, w.k_norm, cfg.norm_eps)
    # Tags mark what remat "min" keeps: every matmul output the backward needs.
    q, k, v = tag(rope(q, positions, cfg), "q"), tag(rope(k, positions, cfg), "k"), tag(v, "v")
    o, aux = attn(q, k, v)                                                 # (B, T, N/tp, H)
    o = tag(rearrange(o, "B T N H -> B T (N H)"), "attn")
    x = tag(x + reduce(linear("o", o)), "resid")
    h = gather(rms_norm(x, w.mlp_norm, cfg.norm_eps))

    act, gate_up = ops.swiglu, ops.gate_up
    if ab.down is not None and drop is not None and lcfg.dropout > 0:
        # With dropout on down's adapter, XLA's gate is faster than the kernel's.
        act, gate_up = swiglu, None

    fp8_mlp = None
    if isinstance(w.w_gate, Fp8):   # the fused gate and up kernel takes bf16 weights
        gate_up = None
        if ab.gate is None and ab.up is None and ab.down is None and model_size() == 1:
            fp8_mlp = ops.fp8_mlp   # (rows split over "model" need a pmax for their scales)

    def mlp(h, s):   # h (B, C, D) at positions [s, s + C) -> this device's partial (B, C, D)
        if fp8_mlp is not None:
            return fp8_mlp(h, w.w_gate, w.w_up, w.w_down)
        if gate_up is not None and ab.gate is None and ab.up is None:
            return linear("down", gate_up(h, w.w_gate, w.w_up), s)
        g, u = tag(linear("gate", h, s), "gate"), tag(linear("up", h, s), "up")  # (B, C, F/tp)
        return linear("down", act(g, u), s)

    out = mlp(h, 0) if ops.mlp_over is None else ops.mlp_over(mlp, h)
    return x + reduce(out), aux


# 4. Speed and memory: how the layers run. Nothing here changes what they compute. ---------------

def keep_attention(prim, *_, **__) -> bool:
    """Remat policy: save only the cuDNN attention forward's outputs (result and softmax stats).
    Its backward rule reads those very outputs: a tag on the result would not stop a rerun."""
    return prim.name.startswith("dot_product_attention_fwd")


# What the backward keeps of each layer's forward. none: all autodiff wants, and the loss's
# logits (fast, most memory); min: the tagged matmul outputs, recomputing norms, RoPE, SiLU and
# attention; dots: every matmul output; full: the layer's input alone, recomputing the layer
# (least memory, ~1/3 more FLOPs); attn: full, but cuDNN's O(T^2) attention forward runs once.
REMAT = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
         "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
         "min": jax.checkpoint_policies.save_only_these_names(
             "q", "k", "v", "attn", "resid", "gate", "up"), "attn": keep_attention}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the layers run: fast, or in less memory. Every plan computes the same loss and
    gradients, to rounding. train's remat="auto" picks one that fits the device (AUTO_PLANS)."""
    remat: str = "none"       # what the backward keeps: REMAT, or "auto" (train only)
    loss_chunk: int = 2048    # positions per cross-entropy chunk: (B, chunk, V/tp) fp32 logits
    mlp_chunk: int = 0        # positions per MLP chunk (0: all): the MLP's (B, T, F) backward
                              # transients, the largest at long T, shrink to (B, chunk, F)
    chunk_layers: int = 0     # only the last N layers chunk their MLP (0: all): the peak is
                              # there, where every earlier layer's saved tensors are alive
    full_layers: int = 0      # the first N layers remat "full" whatever `remat` says
    sequence_parallel: bool = False   # split positions over "model" between parallel regions
    kernels: str = "auto"     # LoRA projections and MLP gate: xla | pallas | auto (kernel_ops)

    def __post_init__(self):
        if self.remat not in (*REMAT, "auto"):
            raise ValueError(f"remat must be one of {list(REMAT)} or auto, got {self.remat!r}")
        if self.kernels not in ("xla", "pallas", "auto"):
            raise ValueError(f"kernels must be xla, pallas or auto, got {self.kernels!r}")
        for f, least in (("loss_chunk", 1), ("mlp_chunk", 0), ("chunk_layers", 0),
                         ("full_layers", 0)):
            if getattr(self, f) < least:
                raise ValueError(f"{f} must be >= {least}, got {getattr(self, f)}")
        if self.chunk_layers and not self.mlp_chunk:
            raise ValueError(f"chunk_layers={self.chunk_layers} chooses which layers run their "
                             f"MLP over chunks: it needs mlp_chunk > 0, the chunk size")


def unstack_layers(params: Params, free: bool = False) -> Params:
    """Stacked layers (each leaf (L, ...)) -> each leaf a tuple of L one-layer slices (1, ...).
    Under lax.scan XLA copies each layer's weights out of the stack for its GEMMs; unrolled,
    each GEMM reads its weight in place (faster steps, longer compiles). Slices keep their
    ranks, so param_specs() holds. free: delete each stacked leaf once split (peak: one leaf
    more, not two models), only if no other array shares its buffer."""
    def slices(a):   # (L, ...) -> L slices (1, ...)
        return tuple(a[i:i + 1] for i in range(a.shape[0]))

    split = jax.jit(slices)

    def unstack(leaf):
        if isinstance(leaf, Fp8):   # its arrays, each split alike
            return Fp8(*(unstack(x) for x in leaf))
        if leaf is None or isinstance(leaf, tuple):   # absent, or unstacked already
            return leaf
        parts = split(leaf)
        if free and isinstance(leaf, jax.Array):
            leaf.delete()
        return parts

    return params._replace(layers=Layer(*(unstack(leaf) for leaf in params.layers)))


def unstacked(layers: Layer) -> bool:
    wq = layers.wq.q if isinstance(layers.wq, Fp8) else layers.wq
    return isinstance(wq, tuple)


def layer_at(leaf, i: int):
    """Layer i of a stacked (L, ...) or unstacked (tuple of (1, ...)) leaf, as (...); None for
    a field the family does not have."""
    if isinstance(leaf, Fp8):
        return Fp8(*(layer_at(x, i) for x in leaf))
    if leaf is None:
        return None
    return leaf[i][0] if isinstance(leaf, tuple) else leaf[i]


def over_positions(f, h, *, chunk: int, policy):
    """f(h (B, C, D), s) -> (B, C, O), over the chunks h[:, s:s + C] of h (B, T, D) in turn.
    Each chunk is checkpointed under `policy` (the layer's), so the backward recomputes one
    chunk at a time: the MLP's (B, T, F) transients shrink to (B, C, F)."""
    if chunk >= h.shape[1]:
        return f(h, 0)
    if policy is not None:   # (None: the layer is not rematerialised, nor are its chunks)
        f = jax.checkpoint(f, policy=policy, static_argnums=(1,))
    return jnp.concatenate([f(h[:, s:s + chunk], s) for s in range(0, h.shape[1], chunk)], 1)


def kernel_fp8_rows(x, c, dtype):
    """fp8_rows' kernel: kernels.fp8_rows (Pallas' interpreter off GPUs)."""
    from kernels.fp8_rows import quantize_rows
    return quantize_rows(x, c, dtype=dtype, interpret=jax.default_backend() != "gpu")


def _fp8_mlp_fwd(h, w_gate, w_up, w_down, interpret):
    from kernels.fp8_rows import quantize_rows, swiglu_rows
    x = rearrange(h, "B T D -> (B T) D")
    xq, sx = quantize_rows(x, dtype=E4M3, interpret=interpret)                   # (M, D), (M,)
    g, u = fp8_dot(xq, w_gate, dtype=h.dtype), fp8_dot(xq, w_up, dtype=h.dtype)  # (M, F) raw
    hq, sh = swiglu_rows(g, u, sx, w_gate.scale, w_up.scale, dtype=E4M3, interpret=interpret)
    y = fp8_dot(hq, w_down, dtype=h.dtype, s=sh[:, None])                       # (M, D)
    y = rearrange(y.astype(h.dtype), "(B T) D -> B T D", B=h.shape[0])
    return y, (g, u, sx, w_gate, w_up, w_down)


def _fp8_mlp_bwd(interpret, residuals, dy):   # dy (B, T, D)
    from kernels.fp8_rows import quantize_rows, swiglu_grad_rows
    g, u, sx, w_gate, w_up, w_down = residuals
    dyq, sdy = quantize_rows(rearrange(dy, "B T D -> (B T) D"), w_down.scale, dtype=GRAD_FP8,
                             interpret=interpret)
    dh = fp8_dot(dyq, w_down, back=True, dtype=g.dtype)                        # (M, F) raw
    qg, sg, qu, su = swiglu_grad_rows(g, u, sx, w_gate.scale, w_up.scale, dh, sdy,
                                      dtype=GRAD_FP8, interpret=interpret)
    dx = (fp8_dot(qg, w_gate, back=True, dtype=jnp.float32, s=sg[:, None])
          + fp8_dot(qu, w_up, back=True, dtype=jnp.float32, s=su[:, None]))    # (M, D)
    return rearrange(dx.astype(dy.dtype), "(B T) D -> B T D", B=dy.shape[0]), None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def kernel_fp8_mlp(h, w_gate: Fp8, w_up: Fp8, w_down: Fp8, interpret: bool = False):
    """h (B, T, D) -> down(silu(gate(h)) * up(h)) (B, T, D) for Fp8 gate, up and down without
    adapters, on rows held whole (tp = 1): fp8_matmul's arithmetic, with the gate in
    kernels.fp8_rows. Its forward reads the gate and up GEMMs' raw outputs and writes down's
    float8 input; its backward reads them again with down's raw input gradient and writes the
    float8 gradients of gate and up. So no (B, T, F) tensor is written in bf16 but the GEMMs'
    outputs, and g, u and their gradients are not rounded to bf16 on the way."""
    return _fp8_mlp_fwd(h, w_gate, w_up, w_down, interpret)[0]


kernel_fp8_mlp.defvjp(_fp8_mlp_fwd, _fp8_mlp_bwd)


def kernel_project(x, w, ab: LoraAB | None, lcfg: LoraConfig | None,
                   drop: Dropout | None = None, *, row: bool = False, anywhere: bool = False):
    """`project` through kernels.lora_matmul: x @ w and the LoRA product in one GEMM, forward
    and backward. The glue between the model and the kernel is all here: (B, T, I) rows to
    the kernel's 2-D (B*T, I) and back, the dropout mask (the LoRA branch's own input), the
    operands cast alike in shard_map's varying axes, and `project` itself where the kernel
    does not apply: no adapter, or (unless `anywhere`) shapes off the Hopper kernel's tiles.
    An Fp8 weight goes to `project` too, with kernels.fp8_rows to quantize its rows."""
    from kernels.lora_matmul import fits_hopper, lora_matmul
    if isinstance(w, Fp8):   # its GEMMs are XLA's; its rows quantized by kernels.fp8_rows
        return project(x, w, ab, lcfg, drop, row=row, fp8_kernel=kernel_fp8_rows)
    if ab is None:
        return project(x, w, ab, lcfg, drop, row=row)
    rows = rearrange(x, "B T I -> (B T) I")
    if not anywhere and not fits_hopper(rows, w, ab.a):
        return project(x, w, ab, lcfg, drop, row=row)
    dropped = None
    if drop is not None and lcfg.dropout > 0:
        dropped = rearrange(drop.apply(x, lcfg.dropout), "B T I -> (B T) I")
    rows, w, a, b, x_lora = vary_alike(rows, w, ab.a, ab.b,
                                       rows if dropped is None else dropped)
    y = lora_matmul(rows, w, a, b, lcfg.scale, x_lora=None if dropped is None else x_lora,
                    interpret=jax.default_backend() != "gpu")
    return rearrange(y, "(B T) O -> B T O", B=x.shape[0])


def kernel_ops(plan: Plan) -> Ops | None:
    """The Ops of kernels/ as plan.kernels asks, or None for XLA's: "pallas" everywhere (Pallas'
    interpreter off GPUs), "auto" on Hopper GPUs, where they were measured faster than XLA.
    The LoRA projection under "auto" keeps to the shapes the Hopper kernel fits."""
    if plan.kernels == "xla":
        return None
    try:
        from kernels import lora_matmul, swiglu as gate
    except ImportError:   # jora.py copied alone: "auto" is XLA
        if plan.kernels == "pallas":
            raise
        return None
    if plan.kernels == "auto" and not lora_matmul.on_hopper():
        return None
    interpret = jax.default_backend() != "gpu"

    def gate_kernel(g, u):
        return gate.swiglu(g, u, interpret)

    def gate_up_kernel(h, w_gate, w_up):
        return gate.gate_up(h, w_gate, w_up, interpret)

    def fp8_mlp_kernel(h, *ws):   # (the operands cast alike, as in project)
        return kernel_fp8_mlp(*vary_with_fp8(h, *ws), interpret)

    return Ops(project=functools.partial(kernel_project, anywhere=plan.kernels == "pallas"),
               swiglu=gate_kernel, gate_up=gate_up_kernel, fp8_mlp=fp8_mlp_kernel)


def run_layers(layer, x, layers: Layer, lora: Lora, plan: Plan, *args):
    """x = layer(x, w, ab, i, *args, ops=) for each layer i, as the plan says: the remat policy,
    MLP chunks and kernels (Ops) wrap the same layer from outside. Stacked layers: one
    lax.scan, so one compiled layer. Unstacked layers are unrolled, and each layer is a call of
    one jitted body per (remat policy, MLP chunks), which jax traces once and reuses for every
    layer alike. *args are the same for every layer."""
    norms = layers.attn_norm
    n = len(norms) if isinstance(norms, tuple) else norms.shape[0]
    kernels = kernel_ops(plan) or Ops()
    for f in ("full_layers", "chunk_layers"):
        if getattr(plan, f) and not unstacked(layers):
            raise ValueError(f"Plan.{f} needs unrolled layers (jora.unstack_layers)")

    @functools.cache
    def body(remat: str, chunked: bool):
        ops = kernels
        if chunked and plan.mlp_chunk:
            ops = ops._replace(mlp_over=functools.partial(
                over_positions, chunk=plan.mlp_chunk, policy=REMAT[remat]))
        if remat in ("min", "dots"):   # they rerun the gate and up GEMMs: no fused gate_up
            ops = ops._replace(gate_up=None, fp8_mlp=None)
        f = functools.partial(layer, ops=ops)
        if remat != "none":
            f = jax.checkpoint(f, policy=REMAT[remat])
        return jax.jit(f) if unstacked(layers) else f

    if not unstacked(layers):
        def scan_step(x, layer_i):
            return body(plan.remat, True)(x, *layer_i, *args), None
        return jax.lax.scan(scan_step, x, (layers, lora, jnp.arange(n)))[0]
    for i in range(n):
        remat = "full" if i < plan.full_layers else plan.remat
        chunked = not plan.chunk_layers or i >= n - plan.chunk_layers
        w = Layer(*(layer_at(leaf, i) for leaf in layers))
        ab = jax.tree.map(lambda a: a[i], lora)
        x = body(remat, chunked)(x, w, ab, i, *args)
    return x


# 5. Loss and forward: vocab-parallel, chunked cross-entropy, under one shard_map ----------------

class Batch(NamedTuple):
    tokens: jax.Array         # (B, T) int32 model input
    targets: jax.Array        # (B, T) int32 the next token at each position
    weights: jax.Array        # (B, T) fp32 1 where the loss counts (answer tokens + EOS), else 0
    positions: jax.Array      # (B, T) int32 RoPE positions; restart at 0 in each packed example
    segment_ids: jax.Array    # (B, T) int32 packed example id (attention stays inside), 0 = pad


def batch_specs() -> Batch:
    return Batch(*([P(DATA, None)] * len(Batch._fields)))


def hidden_states(params: Params, lora: Lora | None, tokens, positions, segment_ids, *,
                  cfg: Config, lcfg: LoraConfig | None, opts: Options, plan: Plan, key=None):
    """tokens (B, T) -> final-normed hidden states (B, T, D). Inside shard_map.
    key: dropout's (None: none), whose masks depend on the global row, not on the device."""
    x = params.embed[tokens]                                                # (B, T, D)
    B, T = tokens.shape
    seed = None
    if key is not None:   # the key's words hashed into one uint32
        seed = jnp.uint32(0)
        for word in jax.random.key_data(key).ravel():
            seed = mix32(seed ^ word)
    tp = jax.lax.axis_size(MODEL)
    sp = plan.sequence_parallel and tp > 1
    if sp:   # keep only this device's slice of the positions between the parallel regions
        if T % tp:
            raise ValueError(f"sequence parallelism needs the length {T} divisible by tp={tp}")
        x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(MODEL) * (T // tp), T // tp, 1)

    def layer(x, w, ab, i, positions, segment_ids, seed, row, *, ops):
        drop = None if seed is None else Dropout(seed=mix32(seed + mix32(i)), row=row)

        def attn(q, k, v):
            return attend(q, k, v, segment_ids, opts, cfg.sliding_window), None

        return decoder_layer(x, w, ab, positions, attn, cfg=cfg, lcfg=lcfg, drop=drop, sp=sp,
                             ops=ops)[0]

    x = run_layers(layer, x, params.layers, lora or Lora(), plan, positions, segment_ids, seed,
                   jax.lax.axis_index(DATA) * B)   # this device's first global row
    x = rms_norm(x, params.final_norm, cfg.norm_eps)
    return jax.lax.all_gather(x, MODEL, axis=1, tiled=True) if sp else x


@jax.custom_vjp
def logits_matmul(h, w):
    """h (..., D) @ w (D, V) -> fp32 logits, and a backward that multiplies in h's dtype.
    Autodiff's own backward would multiply the fp32 logit gradient by w promoted to fp32: an
    fp32 copy of lm_head (500 MiB at 7B) and fp32 GEMMs. Rounding the gradient to bf16 first is
    what bf16 training does everywhere else (HF's too). Call it on vary_alike operands."""
    return jnp.einsum("...D,DV->...V", h, w, preferred_element_type=jnp.float32)


def _logits_bwd(res, g):                                                    # g (..., V) fp32
    h, w = res
    g = g.astype(h.dtype)
    dh = jnp.einsum("...V,DV->...D", g, w, preferred_element_type=jnp.float32)
    # lm_head is frozen: XLA drops dw, which nothing uses.
    dw = jnp.einsum("...D,...V->DV", h, g, preferred_element_type=jnp.float32)
    return dh.astype(h.dtype), dw.astype(w.dtype)


def _logits_fwd(h, w):
    return logits_matmul(h, w), (h, w)


logits_matmul.defvjp(_logits_fwd, _logits_bwd)


def vocab_logits(h, lm_head, vocab_size: int):
    """h (..., D) @ lm_head (D, V'/tp) -> this device's fp32 logits; padding columns -inf."""
    logits = logits_matmul(*vary_alike(h, lm_head))   # dh summed over the vocab slices
    col = jax.lax.axis_index(MODEL) * logits.shape[-1] + jnp.arange(logits.shape[-1])
    return jnp.where(col < vocab_size, logits, -jnp.inf)


def token_nll(h, lm_head, targets, vocab_size: int):
    """h (B, C, D), lm_head (D, V'/tp) this device's vocab slice, targets (B, C) -> nll (B, C).
    The softmax normaliser and the target's logit are each assembled with one psum over the
    vocab slices, so the full (B, C, V) logits never exist on any device."""
    logits = vocab_logits(h, lm_head, vocab_size)                           # (B, C, V'/tp)
    v_local = logits.shape[-1]
    m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, -1)), MODEL)    # (B, C), for stability
    lse = m + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(logits - m[..., None]), -1), MODEL))
    local = targets - jax.lax.axis_index(MODEL) * v_local                   # target in my slice?
    mine = (local >= 0) & (local < v_local)
    hit = jnp.take_along_axis(logits, jnp.clip(local, 0, v_local - 1)[..., None], -1)[..., 0]
    return lse - jax.lax.psum(jnp.where(mine, hit, 0.0), MODEL)


def _local_loss_sums(params, lora, batch: Batch, key, *, cfg, lcfg, opts, plan):
    """Inside shard_map: (sum of weighted nll, sum of weights) over the whole global batch."""
    h = hidden_states(params, lora, batch.tokens, batch.positions,
                      batch.segment_ids if opts.packed else None, cfg=cfg, lcfg=lcfg,
                      opts=opts, plan=plan, key=key)                        # (B, T, D)
    C = min(plan.loss_chunk, h.shape[1])
    pad = -h.shape[1] % C   # (n, B, C, ...): a scan over chunks
    chunks = [rearrange(jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)),
                        "B (n C) ... -> n B C ...", C=C) for a in (h, batch.targets, batch.weights)]

    def chunk_loss(_, xs):
        hc, tc, wc = xs
        return None, jnp.sum(token_nll(hc, params.lm_head, tc, cfg.vocab_size) * wc)

    # Each chunk's logits are computed again in the backward (one more (T, D) x (D, V) GEMM),
    # unless the plan keeps everything: remat "none" keeps them, (B, T, V/tp) fp32 in all.
    if plan.remat != "none":
        chunk_loss = jax.checkpoint(chunk_loss)
    nll = jax.lax.scan(chunk_loss, None, chunks)[1]                         # (n,)
    return jax.lax.psum(jnp.sum(nll), DATA), jax.lax.psum(jnp.sum(batch.weights), DATA)


def on_mesh(f, mesh, cfg, lcfg, lora, *specs, out_specs, plan: Plan):
    """f(params, lora, *rest) under jax.shard_map, the rest split as `specs` say. The Pallas
    kernels cannot carry shard_map's varying-axis types: they run with its check off (exact
    either way, as gradients are taken outside the shard_map)."""
    lspecs = None if lora is None else lora_specs(lcfg)
    return jax.shard_map(f, mesh=mesh, in_specs=(param_specs(cfg), lspecs, *specs),
                         out_specs=out_specs, check_vma=kernel_ops(plan) is None)


@jax.jit(static_argnames=("cfg", "lcfg", "opts", "plan", "mesh"))
def _loss_sums(params, lora, batch, key, *, cfg, lcfg, opts, plan, mesh):
    f = functools.partial(_local_loss_sums, cfg=cfg, lcfg=lcfg, opts=opts, plan=plan)
    return on_mesh(f, mesh, cfg, lcfg, lora, batch_specs(), P(), out_specs=(P(), P()),
                   plan=plan)(params, lora, batch, key)


def count_runs(segment_ids) -> int:   # on the host: the most runs in any row of a batch
    s = np.asarray(segment_ids)
    return int(segment_starts(s).sum(1).max()) if s.size else 0


def check_runs(segment_ids, opts: Options):
    """Refuse a concrete batch whose packed rows have more runs of one segment id than
    opts.max_segments (traced batches cannot be read: attend turns them into NaN)."""
    if (not opts.packed or not opts.max_segments or segment_ids is None
            or isinstance(segment_ids, jax.core.Tracer)
            or not getattr(segment_ids, "is_fully_addressable", True)):
        return
    n = count_runs(segment_ids)
    if n > opts.max_segments:
        raise ValueError(f"a packed row holds {n} runs of one segment id (examples and "
                         f"padding), more than Options.max_segments={opts.max_segments}: "
                         f"raise it, or pack fewer examples a row")


def loss_sums(params: Params, lora: Lora | None, batch: Batch, cfg: Config,
              lcfg: LoraConfig | None = None, *, opts: Options = Options(),
              plan: Plan = Plan(), key=None, mesh=None):
    """-> (sum of token nll over weighted positions, number of weighted positions), fp32.
    Differentiable in `lora` from the outside: jax.grad of this is correct for every mesh.
    key: for dropout (None: none). Inside your own jit, pass `mesh` (else read from the arrays)."""
    check_runs(batch.segment_ids, opts)
    return _loss_sums(params, lora, batch, key, cfg=cfg, lcfg=lcfg, opts=opts, plan=plan,
                      mesh=mesh_of(params) if mesh is None else mesh)


def loss(params: Params, lora: Lora | None, batch: Batch, cfg: Config,
         lcfg: LoraConfig | None = None, **kw):
    """Mean next-token cross-entropy (nats) where batch.weights is 1; keywords as loss_sums."""
    nll, n = loss_sums(params, lora, batch, cfg, lcfg, **kw)
    return nll / jnp.maximum(n, 1.0)


@jax.jit(static_argnames=("cfg", "lcfg", "opts", "plan", "mesh"))
def _forward(params, lora, tokens, positions, segment_ids, *, cfg, lcfg, opts, plan, mesh):
    def local(p, l, t, pos, seg):
        h = hidden_states(p, l, t, pos, seg, cfg=cfg, lcfg=lcfg, opts=opts, plan=plan)
        return vocab_logits(h, p.lm_head, cfg.vocab_size)
    row = P(DATA, None)
    f = on_mesh(local, mesh, cfg, lcfg, lora, row, row, None if segment_ids is None else row,
                out_specs=P(DATA, None, MODEL), plan=plan)
    return f(params, lora, tokens, positions, segment_ids)[..., :cfg.vocab_size]


def forward(params: Params, tokens, cfg: Config, lora: Lora | None = None,
            lcfg: LoraConfig | None = None, *, opts: Options = Options(), plan: Plan = Plan(),
            segment_ids=None, positions=None, mesh=None):
    """tokens (B, T) int -> logits (B, T, V) fp32, with LoRA adapters when `lora` is given.
    For inspection and tests: it materialises all logits (training uses the chunked loss)."""
    check_runs(segment_ids, opts)
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if (
        positions is None) else jnp.asarray(positions, jnp.int32)
    segment_ids = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    return _forward(params, lora, tokens, positions, segment_ids, cfg=cfg, lcfg=lcfg, opts=opts,
                    plan=plan, mesh=mesh_of(params) if mesh is None else mesh)


# 6. AdamW over the LoRA factors only, and the training step -------------------------------------

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
    def zeros():   # fp32 moments shaped like the factors
        return jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), lora)
    return AdamW(step=jnp.zeros((), jnp.int32), mu=zeros(), nu=zeros())


def learning_rate(step, tcfg: TrainConfig):
    """Linear warmup over tcfg.warmup steps, then cosine decay to min_lr_ratio * lr at the end.
    `step` counts from 0 (the first update uses lr/warmup)."""
    step = jnp.asarray(step, jnp.float32)
    warm = tcfg.lr * (step + 1) / max(tcfg.warmup, 1)
    frac = jnp.clip((step - tcfg.warmup) / max(tcfg.steps - tcfg.warmup, 1), 0.0, 1.0)
    lo = tcfg.lr * tcfg.min_lr_ratio
    return jnp.where(step < tcfg.warmup, warm,
                     lo + 0.5 * (tcfg.lr - lo) * (1 + jnp.cos(jnp.pi * frac)))


def global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def adamw_update(lora: Lora, grads: Lora, opt: AdamW, lr, tcfg: TrainConfig):
    """One AdamW step with bias correction; weight decay acts on the weights, not the gradient."""
    step = opt.step + 1
    mu = jax.tree.map(lambda m, g: tcfg.b1 * m + (1 - tcfg.b1) * g, opt.mu, grads)
    nu = jax.tree.map(lambda n, g: tcfg.b2 * n + (1 - tcfg.b2) * g * g, opt.nu, grads)
    # The moments start at 0: dividing by these undoes that bias.
    c1, c2 = 1 - tcfg.b1 ** step, 1 - tcfg.b2 ** step

    def new(p, m, n):
        return p - lr * ((m / c1) / (jnp.sqrt(n / c2) + tcfg.eps) + tcfg.weight_decay * p)

    return jax.tree.map(new, lora, mu, nu), AdamW(step, mu, nu)


class TrainState(NamedTuple):
    lora: Lora
    opt: AdamW
    bad_step: jax.Array       # () int32: first step whose loss or gradient was not finite, or 0


def state_specs(lcfg: LoraConfig) -> TrainState:
    s = lora_specs(lcfg)
    return TrainState(lora=s, opt=AdamW(step=P(), mu=s, nu=s), bad_step=P())


def make_train_step(cfg: Config, lcfg: LoraConfig, tcfg: TrainConfig, mesh, *,
                    opts: Options = Options(), plan: Plan = Plan()):
    """-> step(state, params, batches, key) -> (state, metrics), jitted, the state donated.
    batches: a Batch whose leaves are (A, B, T) for A = grad_accum micro-batches. The loss is
    normalised by the answer tokens of all A micro-batches together (not a mean of means).
    A step whose loss, gradient or any updated factor is not finite leaves the state unchanged
    and is recorded (bad_step); metrics["finite"] says which: [loss, gradient, *factors]."""
    def step(state: TrainState, params: Params, batches: Batch, key):
        keys = jax.random.split(jax.random.fold_in(key, state.opt.step), tcfg.grad_accum)

        def accumulate(carry, xs):   # the gradient of the *sum* of token losses, outside shard_map
            batch, k = xs

            def sums(lora):
                return loss_sums(params, lora, batch, cfg, lcfg, opts=opts, plan=plan,
                                 key=k if lcfg.dropout else None, mesh=mesh)

            (nll, n), g = jax.value_and_grad(sums, has_aux=True)(state.lora)
            return jax.tree.map(jnp.add, carry, (nll, n, g)), None

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

        def keep(new, old):   # the new tree if the step was finite, else the old one
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        bad = jnp.where(ok | (state.bad_step > 0), state.bad_step, state.opt.step + 1)
        new = TrainState(lora=keep(lora, state.lora), opt=keep(opt, state.opt), bad_step=bad)
        return new, dict(loss=nll / n, grad_norm=norm, lr=lr, tokens=n, finite=finite)

    return jax.jit(step, donate_argnums=(0,))


def accum_batch(b: Batch, grad_accum: int, mesh) -> Batch:
    """(A * B, T) rows -> A micro-batches (A, B, T), split over "data": what the step takes."""
    def split(x):
        return rearrange(np.asarray(x), "(A B) T -> A B T", A=grad_accum)

    specs = Batch(*[P(None, DATA, None)] * len(Batch._fields))
    return shard(Batch(*map(split, b)), specs, mesh)


# 7. Data: the tokenizer, and next-token batches of packed rows ---------------------------------

class Tokenizer:
    """A model's tokenizer: its `tokenizer.json`, read by Hugging Face's `tokenizers` (the code
    transformers runs), when the folder has one, else a sentencepiece `tokenizer.model`.
    bos_id is None where the model's tokenizer adds no BOS (Qwen). eos_id ends each trained
    example: tokenizer_config.json's eos_token, else generation_config.json's first eos_token_id,
    else the model's own. stop_ids are all the model's end ids (generation_config.json's list,
    e.g. Llama-3's <|end_of_text|> and <|eot_id|>), eos_id included."""

    def __init__(self, path: str):
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        if os.path.isdir(path):   # tokenizer.json first: Llama-3's tokenizer.model is tiktoken's
            path = next((os.path.join(path, n) for n in ("tokenizer.json", "tokenizer.model")
                         if os.path.isfile(os.path.join(path, n))), path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model at {path}")
        self.path, self.sp, self.hf = path, None, None
        config = self._json(folder, "tokenizer_config.json")
        if path.endswith(".json"):
            bos = self._load_hf(path)
            # add_bos_token, where the config sets it, wins over the post-processor (transformers
            # rebuilds a Llama tokenizer's post-processor from it).
            if config.get("add_bos_token") is False:
                bos = None
            elif config.get("add_bos_token") and bos is None:
                bos = self._id(config.get("bos_token"))
        else:
            bos = self._load_sentencepiece(path)
        ends = self._json(folder, "generation_config.json").get("eos_token_id")
        ends = [ends] if isinstance(ends, int) else list(ends or [])
        eos = self._id(config.get("eos_token"))
        if eos is None:
            eos = ends[0] if ends else self.sp.eos_id() if self.sp is not None else -1
        if eos < 0:
            raise ValueError(f"{path}: no EOS id: put the model's tokenizer_config.json "
                             "(eos_token) or generation_config.json (eos_token_id) next to it")
        self.bos_id, self.eos_id = bos, eos
        self.stop_ids = tuple(dict.fromkeys([eos] + ends))

    def _load_hf(self, path: str) -> int | None:
        try:
            import tokenizers
        except ImportError:
            raise ImportError(f"{path}: reading it needs `pip install tokenizers`") from None
        try:
            self.hf = tokenizers.Tokenizer.from_file(path)
        except Exception as e:   # the Rust parser's message, e.g. an unknown field
            raise ValueError(f"{path}: not a tokenizers file ({str(e)[:200]})") from None
        # max + 1, not the count: added tokens may leave gaps in the ids.
        self.vocab_size = max(self.hf.get_vocab(with_added_tokens=True).values()) + 1
        # The BOS is whatever the post-processor puts before a text (none for Qwen).
        plain = self.hf.encode("a", add_special_tokens=False).ids
        full = self.hf.encode("a").ids
        return full[0] if len(full) > len(plain) and full[1:1 + len(plain)] == plain else None

    def _load_sentencepiece(self, path: str) -> int | None:
        # Llama-3 ships tiktoken's `base64 rank` lines as tokenizer.model (a sentencepiece model
        # is a protobuf: its first byte is a newline); sentencepiece would only say "parse error".
        with open(path, "rb") as f:
            first = f.readline(256).split()
        if len(first) == 2 and first[1].isdigit():
            raise ValueError(f"{path} is a tiktoken file (lines of `base64 rank`), not "
                             "sentencepiece: the folder needs the model's tokenizer.json")
        import sentencepiece
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as e:   # RuntimeError or OSError, with sentencepiece's C++ message
            raise ValueError(f"{path}: not a sentencepiece tokenizer model "
                             f"({str(e).splitlines()[0][:200]})") from None
        self.vocab_size = self.sp.vocab_size()
        return self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    @staticmethod
    def _json(folder: str, name: str) -> dict:   # a config beside the tokenizer, or {}
        path = os.path.join(folder, name)
        return read_json(path) if os.path.exists(path) else {}

    def _id(self, token) -> int | None:   # a config's special token (text or {"content": text})
        token = token.get("content") if isinstance(token, dict) else token
        if not token:
            return None
        if self.hf is not None:
            return self.hf.token_to_id(token)
        i = self.sp.piece_to_id(token)   # sentencepiece answers unk for a missing piece
        return i if self.sp.id_to_piece(i) == token else None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """The text's ids, no special ids added by the library; BOS only where the model's
        tokenizer adds one, and never a second (a rendered chat may begin with it already)."""
        ids = (self.sp.encode(text) if self.sp is not None else
               self.hf.encode(text, add_special_tokens=False).ids)
        if bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids + [self.eos_id] * eos

    def decode(self, ids) -> str:   # ids past the tokenizer (a padded model vocab) are dropped
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if self.sp is not None:
            return self.sp.decode(ids)
        return self.hf.decode(ids, skip_special_tokens=True)


def make_batch(tokens, weights=None, segment_ids=None) -> Batch:
    """Next-token batch from rows of tokens (B, T+1) (numpy): input = [:-1], target = [1:].
    weights (B, T+1) marks which *target* tokens count (default: all); segment_ids (B, T+1)
    gives packed examples (0 = padding) and restarts positions at each new segment."""
    tokens = np.asarray(tokens, np.int32)
    w = np.ones_like(tokens, np.float32) if weights is None else np.asarray(weights, np.float32)
    seg = np.ones_like(tokens) if segment_ids is None else np.asarray(segment_ids, np.int32)
    idx = np.arange(seg.shape[1])[None].repeat(seg.shape[0], 0)
    pos = idx - np.maximum.accumulate(np.where(segment_starts(seg), idx, 0), axis=1)
    # A target counts only inside the same example as its input (never across a boundary).
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return Batch(tokens=tokens[:, :-1], targets=tokens[:, 1:], weights=w[:, 1:] * same,
                 positions=pos[:, :-1].astype(np.int32), segment_ids=seg[:, :-1])


# 8. Generation: prefill + KV-cache decoding in one jitted loop ----------------------------------

@dataclasses.dataclass(frozen=True)
class Sampling:
    """How generate picks each token: greedy when temperature is 0."""
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0            # keep the k most likely tokens (0: all)
    top_p: float = 1.0        # then the smallest set with probability mass >= top_p
    seed: int = 0


def sample(logits, key, s: Sampling):
    """logits (B, V) fp32 -> token ids (B,)."""   # (s is static: each Sampling compiles once)
    if s.temperature == 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    if s.top_k > 0:
        logits = jnp.where(logits < jax.lax.top_k(logits, s.top_k)[0][:, -1:], -jnp.inf, logits)
    sorted_ = jnp.sort(logits, axis=-1)[:, ::-1]
    mass = jnp.cumsum(jax.nn.softmax(sorted_ / s.temperature, -1), -1)
    keep = jnp.minimum(jnp.sum(mass < s.top_p, -1, keepdims=True), logits.shape[-1] - 1)
    logits = jnp.where(logits < jnp.take_along_axis(sorted_, keep, -1), -jnp.inf, logits)
    return jax.random.categorical(key, logits / s.temperature, axis=-1).astype(jnp.int32)


def _generate_local(params, lora, tokens, pad, key, *, cfg, lcfg, s: Sampling):
    """Inside shard_map. tokens (B, T0) left-padded prompts, pad (B,) pad lengths
    -> (B, max_new) new tokens (EOS repeated once a row has finished)."""
    B, T0 = tokens.shape
    S = T0 + s.max_new_tokens                                              # cache length
    K_local = cfg.n_kv_heads // jax.lax.psum(1, MODEL)   # this device's KV heads
    cache = jnp.zeros((cfg.n_layers, 2, B, S, K_local, cfg.head_dim), params.embed.dtype)
    cache = jax.lax.pcast(cache, (MODEL,), to="varying")   # each device caches its own heads
    slot = jnp.arange(S)
    valid = slot[None] >= pad[:, None]                                     # (B, S) not padding

    def run(tokens, start, cache):   # tokens (B, t) at cache slots [start, start + t)
        t = tokens.shape[1]
        positions = jnp.maximum(start + jnp.arange(t)[None] - pad[:, None], 0)   # (B, t)
        here = start + jnp.arange(t)[None, :, None]                             # (1, t, 1)
        # Padding queries see only themselves: finite values that no real query reads.
        allowed = (valid[:, None] & (slot[None, None] <= here)) | (slot[None, None] == here)
        if cfg.sliding_window:   # a real token's slot is its position plus the row's padding
            allowed = allowed & (here - slot[None, None] < cfg.sliding_window)

        def layer(carry, w, ab, i, *, ops):
            x, cache = carry                                   # cache (L, 2, B, S, K/tp, H)

            def attn(q, k, v):   # write this step's keys and values into layer i's slots
                new = jnp.stack([k, v]).astype(cache.dtype)[None]
                c = jax.lax.dynamic_update_slice(cache, new, (i, 0, 0, start, 0, 0))
                return attend_masked(q, c[i, 0], c[i, 1], allowed), c

            return decoder_layer(x, w, ab, positions, attn, cfg=cfg, lcfg=lcfg, ops=ops)

        x, cache = run_layers(layer, (params.embed[tokens], cache), params.layers,
                              lora or Lora(), Plan())
        h = rms_norm(x[:, -1], params.final_norm, cfg.norm_eps)               # (B, D)
        local = vocab_logits(h, params.lm_head, cfg.vocab_size)               # (B, V'/tp)
        # Gather the vocab slices with a psum (an all_gather would leave the value "varying").
        full = jnp.zeros((B, cfg.padded_vocab), jnp.float32)
        full = jax.lax.dynamic_update_slice(full, local, (0, jax.lax.axis_index(MODEL) *
                                                          local.shape[-1]))
        return jax.lax.psum(full, MODEL)[:, :cfg.vocab_size], cache

    def step(c):   # c = (i, logits, cache, done, out)
        i, logits, cache, done, out = c
        nxt = jnp.where(done, cfg.eos_id, sample(logits, jax.random.fold_in(key, i), s))
        logits, cache = run(nxt[:, None], T0 + i, cache)
        ended = jnp.isin(nxt, jnp.asarray(cfg.end_ids, jnp.int32))   # EOS or a stop id
        return i + 1, logits, cache, done | ended, out.at[:, i].set(nxt)

    logits, cache = run(tokens, 0, cache)
    out = jnp.full((B, s.max_new_tokens), cfg.eos_id, jnp.int32)
    init = (jnp.int32(0), logits, cache, jnp.zeros((B,), bool), out)

    def running(c):   # tokens left to sample, and a row not yet finished
        i, _, _, done, _ = c
        return (i < s.max_new_tokens) & ~jnp.all(done)

    return jax.lax.while_loop(running, step, init)[-1]


@jax.jit(static_argnames=("cfg", "lcfg", "s", "mesh"))
def _generate(params, lora, tokens, pad, key, *, cfg, lcfg, s, mesh):
    f = functools.partial(_generate_local, cfg=cfg, lcfg=lcfg, s=s)
    return on_mesh(f, mesh, cfg, lcfg, lora, P(), P(), P(), out_specs=P(), plan=Plan())(
        params, lora, tokens, pad, key)


def generate(params: Params, prompts: list[list[int]], cfg: Config, lora: Lora | None = None,
             lcfg: LoraConfig | None = None, sampling: Sampling = Sampling(), *,
             mesh=None) -> list[list[int]]:
    """Complete a batch of token-id prompts of any lengths -> the new token ids of each (ending
    at EOS, which is included, or after sampling.max_new_tokens)."""
    T0 = -(-max(len(p) for p in prompts) // 16) * 16   # round up: fewer shapes to compile
    tokens = np.zeros((len(prompts), T0), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, T0 - len(p):] = p
    pad = np.asarray([T0 - len(p) for p in prompts], np.int32)
    out = _generate(params, lora, tokens, pad, jax.random.key(sampling.seed), cfg=cfg,
                    lcfg=lcfg, s=dataclasses.replace(sampling, seed=0),
                    mesh=mesh_of(params) if mesh is None else mesh)

    def until_end(row):   # up to and with the first end id
        ends = [j for j, t in enumerate(row) if t in cfg.end_ids]
        return row[:ends[0] + 1] if ends else row

    return [until_end(row) for row in np.asarray(out).tolist()]


# 9. Hugging Face files: safetensors checkpoints in, merged models and PEFT adapters out ---------

HF_NAME = dict(wq="self_attn.q_proj", wk="self_attn.k_proj", wv="self_attn.v_proj",
               wo="self_attn.o_proj", w_gate="mlp.gate_proj", w_up="mlp.up_proj",
               w_down="mlp.down_proj", attn_norm="input_layernorm",
               mlp_norm="post_attention_layernorm")
PEFT_NAME = {t: HF_NAME[w] for t, w in WEIGHT.items()}   # q -> "self_attn.q_proj", ...
HF_EXTRA = dict(bq="self_attn.q_proj.bias", bk="self_attn.k_proj.bias",
                bv="self_attn.v_proj.bias", q_norm="self_attn.q_norm.weight",
                k_norm="self_attn.k_norm.weight")


def hf_tensor(field: str) -> str:   # a Layer field's tensor in each layer of an HF checkpoint
    return HF_EXTRA.get(field) or HF_NAME[field] + ".weight"


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


def _hf_files(folder: str) -> dict[str, str]:
    """tensor name -> safetensors file, for a single file or an index + shards."""
    from safetensors import safe_open
    index, single = (os.path.join(folder, f) for f in ("model.safetensors.index.json",
                                                       "model.safetensors"))
    if not os.path.exists(index):
        if not os.path.exists(single):
            raise FileNotFoundError(f"{folder}: no model.safetensors or "
                                    f"model.safetensors.index.json")
        try:
            with safe_open(single, "numpy") as f:
                return {k: single for k in f.keys()}
        except Exception as e:
            raise ValueError(f"{single}: not a readable safetensors file ({e})") from None
    weight_map = read_json(index, dict, "an index object").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: no 'weight_map' object (tensor name -> file name)")
    files = set(weight_map.values())
    if os.path.exists(single) and files != {"model.safetensors"}:
        raise ValueError(f"{folder}: holds both model.safetensors and model.safetensors.index.json"
                         f" (naming {len(files)} other file(s)); which is the model? Remove the "
                         f"other")
    for f in sorted(files):
        if not os.path.isfile(os.path.join(folder, f)):
            raise FileNotFoundError(f"{index}: names {f}, which is not in {folder}")
    return {k: os.path.join(folder, v) for k, v in weight_map.items()}


def _read(files: dict[str, str], name: str, want_shape, index) -> np.ndarray:
    """The slice `index` of HF tensor `name`, checked against `want_shape`. The file is opened
    for this read alone: its mapped pages do not stay resident while the rest loads."""
    from safetensors import safe_open
    path = files[name]
    try:
        with safe_open(path, "numpy") as f:
            sl = f.get_slice(name)
            if tuple(sl.get_shape()) != tuple(want_shape):
                raise ValueError(f"{path}: tensor '{name}' has shape {tuple(sl.get_shape())}, "
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
    """A global array on `mesh` from fill(index) -> (piece, offset, axis) numpy pieces of this
    device's slice `index` (hf: in torch's transposed layout). Each piece is read once, sent to
    every local device whose slice it belongs to, cast, transposed and written into place
    there, and dropped: the host holds about one piece, whatever the number of devices."""
    sharding = NamedSharding(mesh, spec)
    where = sharding.addressable_devices_indices_map(shape)
    groups = {}   # devices that hold the same slice
    for device, index in where.items():
        key = tuple((s.start, s.stop, s.step) for s in index)
        groups.setdefault(key, (index, []))[1].append(device)
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
    return jax.make_array_from_single_device_arrays(shape, sharding, [arrays[d] for d in where])


def load_hf(folder: str, dtype=jnp.bfloat16, mesh=None, *, fp8: bool = False,
            fp8_transposed: bool = False) -> tuple[Config, Params]:
    """Load an HF Llama folder -> (Config, Params) placed on `mesh` (default: one device).
    Each device's slice of each parameter is read from the safetensors files one layer at a
    time, sent, and cast and transposed on the device: the host holds about one layer's slice
    at a time, never the model, whatever the number of devices. fp8: the projections are
    quantized on the devices as each layer lands (Config.fp8), and come unstacked (a tuple of
    one-layer slices, as unstack_layers leaves them): no device ever holds them whole in dtype.
    fp8_transposed: each with its transposed copy too (Config.fp8_transposed)."""
    cfg = dataclasses.replace(Config.from_hf(folder), fp8=fp8,
                              fp8_transposed=fp8 and fp8_transposed)
    mesh = make_mesh(1, jax.devices()[:1]) if mesh is None else mesh
    check_tp(cfg, mesh.shape[MODEL])
    files = _hf_files(folder)
    shapes, specs, dt = param_shapes(cfg), param_specs(cfg), jnp.dtype(dtype)
    head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    expected = {"model.embed_tokens.weight", "model.norm.weight", head} | {
        f"model.layers.{i}.{hf_tensor(f)}" for i in range(cfg.n_layers)
        for f in layer_fields(cfg)}
    unexpected = sorted(set(files) - expected - {"lm_head.weight"}
                        - {k for k in files if "rotary_emb" in k})
    if unexpected:
        raise ValueError(f"{folder}: unexpected tensor '{unexpected[0]}' "
                         f"({len(unexpected)} in all) for config {cfg}")
    missing = sorted(expected - set(files))
    if missing:
        raise ValueError(f"{folder}: checkpoint has no tensor '{missing[0]}' "
                         f"({len(missing)} missing in all)")

    def stacked(field):   # (L, I, O) from model.layers.{i}.<name>.weight (O, I), layer by layer
        shape = getattr(shapes.layers, field)   # (or (L, X) from a bias or a norm (X,))

        def fill(index):
            for j, i in enumerate(range(*index[0].indices(shape[0]))):
                name = f"model.layers.{i}.{hf_tensor(field)}"
                yield _read(files, name, shape[1:][::-1], index[1:][::-1])[None], j, 0
        return _place(shape, getattr(specs.layers, field), mesh, dt, fill, hf=len(shape) == 3)

    def fp8_slices(field):   # Fp8 of L one-layer slices (1, O, I), (1, O) [, (1, I, O)]
        spec = getattr(specs.layers, field)
        (_, d_in, d_out), slices = getattr(shapes.layers, field), []

        def quantize_hf(w):   # (1, O, I) as stored -> Fp8
            return fp8_weight(jnp.swapaxes(w, -1, -2), cfg.fp8_transposed)
        quantize = jax.jit(quantize_hf, out_shardings=jax.tree.map(
            lambda s: NamedSharding(mesh, s), spec))
        for i in range(cfg.n_layers):
            name = f"model.layers.{i}.{hf_tensor(field)}"

            def fill(index, name=name):   # this device's slice of layer i's (O, I), as stored
                yield _read(files, name, (d_out, d_in), index[1:])[None], 0, 0
            w = _place((1, d_out, d_in), spec.q, mesh, dt, fill)
            slices.append(quantize(w))
            w.delete()
        return Fp8(*(None if x[0] is None else x for x in zip(*slices)))

    def layer_field(field):
        return fp8_slices(field) if fp8 and field in TARGET else stacked(field)

    def lm_head(index):   # (D, V') from (V, D); the padding columns stay zero
        cols = [c for c in range(*index[1].indices(shapes.lm_head[1])) if c < cfg.vocab_size]
        if cols:
            yield _read(files, head, (cfg.vocab_size, cfg.d_model),
                        (slice(cols[0], cols[-1] + 1), index[0])), 0, 1

    def whole(name, shape):
        return lambda index: [(_read(files, name, shape, index), 0, 0)]

    return cfg, Params(
        embed=_place(shapes.embed, specs.embed, mesh, dt,
                     whole("model.embed_tokens.weight", shapes.embed)),
        layers=Layer(**{f: layer_field(f) for f in layer_fields(cfg)}),
        final_norm=_place(shapes.final_norm, specs.final_norm, mesh, dt,
                          whole("model.norm.weight", shapes.final_norm)),
        lm_head=_place(shapes.lm_head, specs.lm_head, mesh, dt, lm_head, hf=True))


def first_non_finite(tree, prefix: str = "params") -> str | None:
    """The path of the first array of `tree` holding a NaN or an infinity, or None."""
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if x is not None and not bool(jnp.isfinite(x).all()):
            return prefix + jax.tree_util.keystr(path)
    return None


def to_host(x) -> np.ndarray:
    """Gather a (possibly sharded, possibly multi-process) array into host memory. On several
    hosts this is a collective: every process must call it."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _one_device(x):
    """x on this process's first device: a computation there then sees the same inputs
    whatever the mesh, so that every layout exports bit-identical files."""
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
    `dtype` (default W's); hf: in torch's (..., O, I) layout. Computed on one device, in fp32;
    only the result comes to the host."""
    a, b = (None, None) if ab is None else (_one_device(ab.a), _one_device(ab.b))
    return np.asarray(_merged(_one_device(w), a, b, lcfg.scale if ab is not None else 0.0,
                              dtype=jnp.dtype(dtype or w.dtype), hf=hf))


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
                  lcfg: LoraConfig | None = None, *, source: str | None = None,
                  dtype=jnp.bfloat16, shard_bytes: int = 5 * 2**30):
    """Write an HF Llama folder (W + scale*A@B merged) that transformers loads: files of
    about `shard_bytes` (with model.safetensors.index.json when several), config.json from
    `cfg`, tokenizer files copied from `source` (the folder the model came from). Each tensor
    is merged and cast on a device, fetched, written and dropped: the host holds one at a time.
    An Fp8 projection is merged into its original weight, read again from `source`, never into
    its quantized one."""
    dt, lora = jnp.dtype(dtype), lora or Lora()
    if cfg.fp8 and not source:
        raise ValueError("export_merged: the projections are float8; the merge needs their "
                         "original weights: pass source=the folder the model was loaded from")
    originals = _hf_files(source) if cfg.fp8 else {}
    items = [("model.embed_tokens.weight", params.embed.shape,
              lambda: merge_lora(params.embed, None, lcfg, dt))]

    def layer_weight(name, shape, w, i, ab, matrix):   # taken and merged only when written
        def get():
            w_i = layer_at(w, i)
            if isinstance(w_i, Fp8):   # the original weight (O, I) -> (I, O)
                w_i = _read(originals, name, shape, (slice(None),) * 2).T
            return merge_lora(w_i, ab and LoraAB(ab.a[i], ab.b[i]), lcfg, dt, hf=matrix)
        return get

    for i in range(cfg.n_layers):
        for f in layer_fields(cfg):
            w, ab = getattr(params.layers, f), getattr(lora, TARGET.get(f, "_"), None)
            name = f"model.layers.{i}.{hf_tensor(f)}"
            shape = getattr(param_shapes(cfg).layers, f)[1:][::-1]
            items.append((name, shape, layer_weight(name, shape, w, i, ab, matrix=f in TARGET)))
    items.append(("model.norm.weight", params.final_norm.shape,
                  lambda: merge_lora(params.final_norm, None, lcfg, dt)))
    if not cfg.tie_embeddings:   # (V, D): the padding columns stay behind
        items.append(("lm_head.weight", params.embed.shape, lambda: merge_lora(
            params.lm_head, None, lcfg, dt, hf=True)[:cfg.vocab_size]))

    def nbytes(shape):
        return math.prod(shape) * dt.itemsize

    files, size = [[]], 0      # plan the files from the shapes alone
    for item in items:
        if files[-1] and size + nbytes(item[1]) > shard_bytes:
            files, size = files + [[]], 0
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
                [get() for _, _, get in group]
        if not tmp:
            return
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(nbytes(x) for _, x, _ in items)},
                     "weight_map": {n: f for f, g in zip(names, files) for n, _, _ in g}}
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dict(cfg.to_hf(), torch_dtype=dt.name), f, indent=2)
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                     "tokenizer.json", "generation_config.json"):
            if source and os.path.exists(os.path.join(source, name)):
                shutil.copy(os.path.join(source, name), tmp)

    _atomic_dir(folder, write)


def export_adapter(folder: str, cfg: Config, lora: Lora, lcfg: LoraConfig, base_model: str = ""):
    """Write a PEFT LoRA adapter: adapter_config.json + adapter_model.safetensors. Keys
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight (R, I) and
    ...lora_B.weight (O, R): torch.nn.Linear's (out, in) layout."""
    from safetensors.numpy import save_file
    tensors = {}
    for t in lcfg.targets:
        a, b = to_host(getattr(lora, t).a), to_host(getattr(lora, t).b)   # (L, I, R), (L, R, O)
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
        if tmp:
            save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), {"format": "pt"})
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
    layers = set()   # the layer numbers in the tensor names: base_model.model.layers.{i}. ...
    for name in w:
        if ".layers." in name:
            i = name.split(".layers.")[1].split(".")[0]
            if i.isdigit():
                layers.add(int(i))
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
    lcfg = LoraConfig(r=int(c["r"]), alpha=float(c["lora_alpha"]),
                      dropout=float(c.get("lora_dropout", 0.0)),
                      targets=tuple(known[m] for m in modules))

    def factor(t, i, part, want):   # (R, I) or (O, R) in the file -> (I, R) or (R, O)
        name = f"base_model.model.model.layers.{i}.{PEFT_NAME[t]}.{part}.weight"
        if name not in w:
            raise ValueError(f"{folder}: adapter has no tensor '{name}'")
        if w[name].shape != want:
            raise ValueError(f"{folder}: '{name}' has shape {w[name].shape}, expected {want}")
        return w[name].astype(np.float32).T

    def stack(t, part, want):   # (L, ...) from each layer's factor
        return jnp.asarray(np.stack([factor(t, i, part, want) for i in range(cfg.n_layers)]))

    return Lora(**{t: LoraAB(a=stack(t, "lora_A", (lcfg.r, proj_shape(cfg, t)[0])),
                             b=stack(t, "lora_B", (proj_shape(cfg, t)[1], lcfg.r)))
                   for t in lcfg.targets}), lcfg
