"""Pallas kernels for jora.py: the fused LoRA projection (lora_matmul.py, on Hopper GPUs through
hopper_gemm.py) and the MLP gate's one-pass backward (swiglu.py)."""


def ops(kernels: str = "auto"):
    """(project, swiglu) for jora.Plan(kernels=...), with jora's signatures, or None: "pallas"
    everywhere, "auto" on Hopper GPUs only (where they were measured faster than XLA)."""
    import jax
    from kernels.lora_matmul import projection
    from kernels.swiglu import swiglu
    proj = projection(kernels)   # None for "auto" off Hopper GPUs: then neither kernel runs
    interpret = jax.default_backend() != "gpu"   # "pallas" on a CPU: Pallas' interpreter
    return None if proj is None else (proj, lambda g, u: swiglu(g, u, interpret))
