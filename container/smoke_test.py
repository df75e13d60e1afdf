"""Smoke test of a labfleet image: python3 /opt/labfleet/smoke_test.py [--profile NAME].

Imports the profile's libraries, prints the torch and CUDA versions and every GPU's name
and compute capability, and runs a small matmul on the GPU (on the CPU when there is none).
Exits non-zero on any failure. Images without torch (the jupyter profile) skip the torch part.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

JUPYTER_MODULES = ("jupyterlab", "jupyter_lsp", "pylsp", "jupyterlab_git", "jupyterlab_code_formatter",
                   "black", "isort", "jupytext", "bash_kernel", "ipywidgets")  # fmt: skip
TORCH_MODULES = ("torch", "torchvision", "torchaudio", "torchinfo", "sklearn", "pandas", "matplotlib", "PIL",
                 "tensorboard")  # fmt: skip
PROFILE_MODULES = {
    "jupyter": JUPYTER_MODULES,
    "cpu": JUPYTER_MODULES + TORCH_MODULES,
    "pytorch": JUPYTER_MODULES + TORCH_MODULES,
}
MATMUL_SIZE = 512


def import_all(modules: tuple[str, ...]) -> list[str]:
    failed = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as error:  # any import failure is a finding, not a crash
            failed.append(f"{name}: {error}")
            continue
        print(f"ok   {name} {getattr(module, '__version__', '')}".rstrip())
    return failed


def check_torch() -> list[str]:
    import torch

    print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none (CPU build)'}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"CUDA available: {torch.cuda.is_available()}, devices: {count}")
    if count:
        print(f"cuDNN {torch.backends.cudnn.version()}")
    for index in range(count):
        major, minor = torch.cuda.get_device_capability(index)
        print(f"  cuda:{index} {torch.cuda.get_device_name(index)}, compute capability {major}.{minor}")
    device = "cuda:0" if count else "cpu"
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device)
    product = a @ b
    expected = (a.cpu().double() @ b.cpu().double()).float()
    error = (product.cpu() - expected).abs().max().item()
    # TF32 on recent GPUs is about 1e-3 relative; 512-term sums of N(0,1) products are ~22.
    ok = error < 0.5
    print(f"matmul {MATMUL_SIZE}x{MATMUL_SIZE} on {device}: max abs error {error:.2e} {'ok' if ok else 'WRONG'}")
    return [] if ok else [f"matmul on {device} is off by {error}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=os.environ.get("LABFLEET_PROFILE", ""))
    args = parser.parse_args()
    # A profile not listed here is checked by what it has: torch's libraries if torch is in.
    has_torch = importlib.util.find_spec("torch") is not None
    modules = PROFILE_MODULES.get(args.profile, JUPYTER_MODULES + (TORCH_MODULES if has_torch else ()))
    print(f"profile {args.profile or 'unknown'}, Python {sys.version.split()[0]}")
    failed = import_all(modules)
    if "torch" in modules and has_torch:
        try:
            failed += check_torch()
        except Exception as error:
            failed.append(f"torch check: {error!r}")
    elif "torch" not in modules:
        print("this profile has no torch; skipping the torch and CUDA checks")
    for failure in failed:
        print(f"FAIL {failure}", file=sys.stderr)
    print("smoke test passed" if not failed else f"smoke test failed: {len(failed)} problem(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
