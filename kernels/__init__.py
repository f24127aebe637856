"""Pallas kernels for jora.py: the fused LoRA projection (lora_matmul.py, on Hopper GPUs through
hopper_gemm.py), the MLP gate's one-pass backward and the frozen gate and up projections with
the gate in one GEMM kernel (swiglu.py)."""


def ops(kernels: str = "auto"):
    """(project, swiglu, gate_up) for jora.Plan(kernels=...), with jora's signatures, or None:
    "pallas" everywhere, "auto" on Hopper GPUs only (where they were measured faster than XLA).
    gate_up(h, w_gate, w_up) = swiglu(h @ w_gate, h @ w_up), for adapter-free gate and up."""
    import jax
    from kernels.lora_matmul import projection
    from kernels.swiglu import gate_up, swiglu
    proj = projection(kernels)   # None for "auto" off Hopper GPUs: then no kernel runs
    interpret = jax.default_backend() != "gpu"   # "pallas" on a CPU: Pallas' interpreter
    return None if proj is None else (proj, lambda g, u: swiglu(g, u, interpret),
                                      lambda h, wg, wu: gate_up(h, wg, wu, interpret))
