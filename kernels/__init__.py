"""Pallas kernels that jora.py uses where they are faster than XLA. Each takes plain operands
(2-D where the GEMM sees 2-D), keeps a plain-jnp `reference` beside it, and knows nothing of
the model; jora.py imports them lazily, only when its Plan asks for them:
  lora_matmul.py   x @ w + scale * (x @ a) @ b, forward and backward as fused GEMMs
  hopper_gemm.py   the warp-specialized Mosaic GPU GEMMs behind it on Hopper GPUs
  swiglu.py        the MLP gate's one-pass backward, and gate + up + gate in one GEMM kernel
  fp8_rows.py      float8 rows with a scale each, in one read; the gate's forward and backward
                   from FP8 GEMMs' raw outputs straight to float8 rows
"""
