"""The Hugging Face reference for the README's table: transformers + PEFT LoRA training steps of a
random-initialised Llama-2-7B-shaped model, one JSON row per sequence length.

  pip install torch transformers peft          # and liger-kernel for --liger
  python bench/hf_peft.py --seq 2048 [--targets all] [--liger] [--remat] [--dropout 0]

It times what ../shared/bench/hf_peft_baseline.py times, step for step:
- model: LlamaConfig of the size's shape, rms_norm_eps 1e-5, every other field at transformers'
  default (use_cache, rope theta 1e4); torch.manual_seed(0), then transformers builds it in bf16
  (dtype=bfloat16, attn_implementation "sdpa"). It is built on the GPU: seconds instead of minutes
  of host time; nothing that is timed changes.
- --liger: apply_liger_kernel_to_llama (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy) before
  the model is built, so the patched classes are the ones instantiated. Its fused loss runs
  because the model is in train mode and gets the labels: the logits are never materialised.
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
                           rope_theta=5e5)}
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


def build(shape: dict, targets: list[str], dropout: float, remat: bool):
    """The PEFT model; transformers is imported here, after any Liger patch."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig
    config = LlamaConfig(**shape, max_position_embeddings=1 << 20, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, lora_dropout=dropout,
                                            target_modules=targets))
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
    args = p.parse_args(argv)
    if args.liger:   # patches transformers' Llama module: before the model is built
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True,
                                    fused_linear_cross_entropy=True, cross_entropy=False)
    shape, targets = SIZES[args.size], targets_of(args.targets)
    model = build(shape, targets, args.dropout, args.remat)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for seq in args.seq:
        row = dict(impl="hf-peft-liger" if args.liger else "hf-peft", size=args.size, seq=seq,
                   batch=args.batch, targets=",".join(targets), r=16, lora_dropout=args.dropout,
                   remat=args.remat)
        try:
            row.update(run(model, opt, shape, seq, args.batch, args.steps))
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            opt.zero_grad(set_to_none=True)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
