"""The Hugging Face reference for the README's table: transformers + PEFT LoRA training steps of a
random-initialised Llama-2-7B-shaped model, one JSON row per sequence length.

  pip install torch transformers peft    # and liger-kernel for --liger, bitsandbytes for --4bit
  python bench/hf_peft.py --seq 2048 [--targets all] [--liger] [--remat] [--dropout 0]
  python bench/hf_peft.py --size 70b --4bit --remat --seq 4096         # QLoRA

It times a step as a plain transformers + PEFT training loop runs it:
- model: LlamaConfig of the size's shape, rms_norm_eps 1e-5, every other field at transformers'
  default (use_cache, rope theta 1e4); torch.manual_seed(0), then transformers builds it in bf16
  (dtype=bfloat16, attn_implementation "sdpa"). It is built on the GPU: seconds instead of minutes
  of host time; nothing that is timed changes.
- --liger: apply_liger_kernel_to_llama (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy) before
  the model is built, so the patched classes are the ones instantiated. Its fused loss runs
  because the model is in train mode and gets the labels: the logits are never materialised.
- --4bit (QLoRA): the seven projections of every decoder layer are bitsandbytes NF4 Linear4bit
  layers (double quantization, bf16 compute), and PEFT wraps them with its bnb Linear4bit LoRA
  layer (checked before timing). Embeddings, norms and lm_head stay bf16. The model is never whole
  in bf16 (the 70B shape would be 140 GB): it is built on the meta device, each projection is
  quantized on the GPU from a random bf16 weight (std 0.02) made there, then the embeddings, norms,
  lm_head and RoPE tables are made on the GPU. prepare_model_for_kbit_training is not called: it
  upcasts the norms and embeddings to fp32, which costs memory and does not change the matmul
  work. mfu counts the same model FLOPs; the dequantisation is not counted.
- LoRA: PEFT's LoraConfig(r 16, alpha 16, --dropout, targets), no task_type, bias "none"; PEFT
  keeps the adapters in fp32 (autocast_adapter_dtype). --remat: non-reentrant gradient
  checkpointing with input gradients enabled.
- step: model(input_ids=ids, labels=ids).loss (the model's own shifted cross-entropy), backward,
  AdamW(lr 1e-4, torch's default implementation) over the adapter weights, created once,
  zero_grad(set_to_none=True). ids: random tokens made on the GPU once per length. No TF32 or
  cuDNN flags are set.
- timing, each length: empty_cache and reset_peak_memory_stats, 2 warm-up steps, synchronize,
  --steps steps, synchronize. peak_gib: torch.cuda.max_memory_allocated over warm-up and timed
  steps. mfu: jora's trainer.flops_per_token model FLOPs against 800 TFLOP/s. Compare only rows
of one device call, and mind the order: a GPU fresh from other work clocks lower than an idle one.
"""
import argparse
import json
import time

import torch

PEAK_FLOPS = 800e12
SIZES = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
         # Llama-3.1-8B's shape (its RoPE scaling does not change the cost)
         "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                           rope_theta=5e5),
         "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)}
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def targets_of(spec: str) -> list[str]:   # "q,v", "q_proj,v_proj" or "all"
    if spec == "all":
        return list(ALL)
    return [t if t.endswith("_proj") else t + "_proj" for t in spec.split(",")]


def flops_per_token(shape: dict, seq: int) -> float:
    """Forward 2N + input gradients 2N over the N matmul parameters (lm_head included; frozen
    weights get no gradient) + causal attention 6 T D L. Recomputation is not counted."""
    d, f, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    n = layers * (2 * d * d + 2 * d * kv + 3 * d * f) + d * shape["vocab_size"]
    return 4 * n + 6 * seq * d * layers


def nf4_linear(linear: torch.nn.Linear):
    """A bnb NF4 Linear4bit for one meta nn.Linear, as QLoRA sets it up (double quantization, bf16
    compute). Its weight is random bf16 (std 0.02, transformers' init) made on the GPU and
    quantized there: Params4bit quantizes when it is moved to a device while not yet quantized."""
    import bitsandbytes as bnb
    if linear.bias is not None:   # Llama's projections have none; a meta bias would stay behind
        raise ValueError("--4bit expects projections without bias")
    out_features, in_features = linear.weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4", device="meta")
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", module=layer).to("cuda")
    return layer


def materialise_rest(model):
    """Embeddings, norms and lm_head, still on meta: allocated on the GPU and initialised as
    transformers does (normal std 0.02; norms ones). The NF4 layers are left alone: to_empty
    would replace their packed weights."""
    import bitsandbytes as bnb
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            continue
        if not any(p.is_meta for p in module.parameters(recurse=False)):
            continue
        module.to_empty(device="cuda", recurse=False)
        if isinstance(module, (torch.nn.Embedding, torch.nn.Linear)):   # embed_tokens, lm_head
            torch.nn.init.normal_(module.weight, std=0.02)
        elif "RMSNorm" in type(module).__name__:   # transformers' or Liger's
            torch.nn.init.ones_(module.weight)
        else:
            raise RuntimeError(f"--4bit does not know how to initialise {type(module).__name__}")


def build_nf4(config):
    """The base model with NF4 projections, never whole in bf16: the skeleton on meta, then each
    projection quantized on the GPU, then the rest made on the GPU."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    for layer in model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name, child in list(block.named_children()):
                if name in ALL:
                    setattr(block, name, nf4_linear(child))
    materialise_rest(model)
    # RoPE's inv_freq is computed in __init__, so on meta it holds nothing: build it again on the
    # GPU (under the device context: not every transformers version takes a device argument)
    with torch.device("cuda"):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"--4bit left {len(left)} tensors on the meta device: {left[:4]}")
    # PEFT's LoraModel picks its bnb LoRA layers only where the model says it is loaded in 4
    # bits, which transformers' bnb loader (bypassed here) would have set
    model.is_loaded_in_4bit = True
    return model


def check_lora_4bit(model):
    """Every LoRA layer must be PEFT's bnb Linear4bit one, or the row would time something else."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.bnb import Linear4bit
    lora = [m for m in model.modules() if isinstance(m, LoraLayer)]
    wrong = sorted({type(m).__module__ + "." + type(m).__name__
                    for m in lora if not isinstance(m, Linear4bit)})
    if not lora or wrong:
        raise RuntimeError(f"PEFT did not wrap the NF4 projections with its bnb Linear4bit: "
                           f"{wrong}")


def build(shape: dict, targets: list[str], dropout: float, remat: bool, four_bit: bool = False):
    """The PEFT model; transformers is imported here, after any Liger patch."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig
    config = LlamaConfig(**shape, max_position_embeddings=1 << 20, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    if four_bit:
        base = build_nf4(config)
    else:
        with torch.device("cuda"):
            base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                    attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, lora_dropout=dropout,
                                            target_modules=targets))
    if four_bit:
        check_lora_4bit(model)
    if remat:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    return model


def run(model, opt, shape, seq, batch, steps, warmup=2) -> dict:
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device="cuda")

    def step():
        loss = model(input_ids=ids, labels=ids).loss   # the output (logits) is dropped here
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / steps
    tokens_per_s = batch * seq / dt
    return dict(tokens_per_s=round(tokens_per_s), step_s=round(dt, 4), loss=round(loss.item(), 4),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                mfu=round(tokens_per_s * flops_per_token(shape, seq) / PEAK_FLOPS, 4))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="7b", choices=list(SIZES))
    p.add_argument("--seq", type=int, nargs="+", default=[2048], help="lengths, increasing")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--targets", default="q,v", help="q,v (or q_proj,v_proj), or all")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--remat", action="store_true", help="gradient checkpointing")
    p.add_argument("--liger", action="store_true", help="Liger-Kernel's Llama kernels")
    p.add_argument("--4bit", dest="four_bit", action="store_true",
                   help="QLoRA: NF4 projections (bitsandbytes)")
    args = p.parse_args(argv)
    if args.four_bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SystemExit("--4bit needs bitsandbytes: pip install bitsandbytes")
    if args.liger:   # patches transformers' Llama module: before the model is built
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True,
                                    fused_linear_cross_entropy=True, cross_entropy=False)
    shape, targets = SIZES[args.size], targets_of(args.targets)
    model = build(shape, targets, args.dropout, args.remat, args.four_bit)
    impl = "hf-peft" + "-liger" * args.liger + "-4bit" * args.four_bit
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for seq in args.seq:
        row = dict(impl=impl, size=args.size, seq=seq, batch=args.batch, targets=",".join(targets),
                   r=16, lora_dropout=args.dropout, remat=args.remat)
        if args.four_bit:
            row["base"] = "nf4"
        try:
            row.update(run(model, opt, shape, seq, args.batch, args.steps))
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            opt.zero_grad(set_to_none=True)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
