"""Run the HF + PEFT baseline (../shared/bench/hf_peft_baseline.py, unchanged, copied to .dev/)
with its model built on the GPU instead of the host.

The script builds Llama-2-7B with random weights on the CPU, which takes over 200 s of a device
call before its first row; built under `torch.device("cuda")` it takes seconds. Only `build` is
wrapped: the timed steps run exactly as in the script, which resets the peak-memory counter
before them, so neither the speed nor the peak memory it reports changes.
Usage: python -P bench/hf_on_gpu.py [the script's arguments]
(-P: bench/ off sys.path, or bench/profile.py would shadow the standard library's `profile`,
which torch imports.)
"""
import importlib.util
import sys

import torch

PATH = ".dev/hf_peft_baseline.py"


def main():
    spec = importlib.util.spec_from_file_location("hf_peft_baseline", PATH)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    build = script.build

    def build_on_gpu(*args, **kwargs):
        with torch.device("cuda"):
            return build(*args, **kwargs)

    script.build = build_on_gpu
    sys.argv = [PATH] + sys.argv[1:]
    script.main()


if __name__ == "__main__":
    main()
