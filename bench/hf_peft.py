"""The Hugging Face reference for the README's table: transformers + PEFT LoRA training steps of a
random-initialised Llama-2-7B-shaped model, one JSON row per sequence length.

  pip install torch transformers peft          # and liger-kernel for --liger
  python bench/hf_peft.py --seq 2048 [--targets all] [--liger] [--remat] [--dropout 0]

The model is built directly on the GPU in bf16 (sdpa attention); LoRA r 16, alpha 16 on the
targets (adapter weights fp32, PEFT's default); AdamW at lr 1e-4; labels are the input ids.
Each length: 2 warm-up steps, then --steps timed between torch.cuda.synchronize calls. peak_gib
is torch.cuda.max_memory_allocated over the timed steps; mfu counts the same model FLOPs as
jora's trainer.flops_per_token against 800 TFLOP/s. --liger applies Liger-Kernel's Llama
kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) before the model is built;
--remat turns on gradient checkpointing.
"""
import argparse
import json
import time

import torch

PEAK_FLOPS = 800e12
SIZES = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)}
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


def build(shape: dict, seq: int, targets: list[str], dropout: float, remat: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**shape, max_position_embeddings=max(seq, 4096), rms_norm_eps=1e-5,
                         use_cache=False, attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):   # random weights straight on the GPU: seconds, not minutes
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    if remat:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=dropout, target_modules=targets,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def run(model, shape, seq, batch, steps, warmup=2) -> dict:
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device="cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
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
    if args.liger:   # patches transformers' Llama classes: before the model is built
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
    shape, targets = SIZES[args.size], targets_of(args.targets)
    model = build(shape, max(args.seq), targets, args.dropout, args.remat)
    model.train()
    for seq in args.seq:
        row = dict(impl="hf-peft-liger" if args.liger else "hf-peft", size=args.size, seq=seq,
                   batch=args.batch, targets=",".join(targets), r=16, lora_dropout=args.dropout,
                   remat=args.remat)
        try:
            row.update(run(model, shape, seq, args.batch, args.steps))
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
