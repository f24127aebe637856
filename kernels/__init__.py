"""Pallas kernels for jora.py: the fused LoRA projection (lora_matmul.py, on Hopper GPUs through
hopper_gemm.py) and the MLP gate's one-pass backward (swiglu.py)."""


def ops(kernels: str = "auto"):
    """(project, swiglu) for jora.Plan(kernels=...), with jora's signatures, or None: "pallas"
    everywhere, "auto" on Hopper GPUs only (where they were measured faster than XLA)."""
    from kernels.lora_matmul import projection
    from kernels.swiglu import activation
    proj = projection(kernels)
    return None if proj is None else (proj, activation(kernels))
