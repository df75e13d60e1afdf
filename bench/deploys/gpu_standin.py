"""deploy.py as it is, on hosts with the STAND-IN NVIDIA toolkit, less its last GPU check (bench/run.py).

The stand-in packages (tests/e2e/nvidia_standin.py) put no nvidia-smi into a container, so
``nvidia.verify_gpu``, which starts the lab image with ``--gpus`` on every deploy of a real
GPU host (a container start per host and run, by design), would fail here. It is the one
step replaced; everything else, the NVIDIA steps' reads and skips included, is deploy.py's,
the deploy.py of the working directory (so a baseline checkout's too).
"""

from typing import Any

from pyinfra import host, local

from labfleet import nvidia


def skip_gpu_check(settings: Any) -> None:
    host.noop("stand-in NVIDIA toolkit: the GPU check needs a real GPU (bench/deploys/gpu_standin.py)")


nvidia.verify_gpu = skip_gpu_check
local.include("deploy.py")
