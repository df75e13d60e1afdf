"""Every GPU's compute capability against the CUDA architectures of the image's torch.

torch's CUDA wheels carry kernels for a list of compute capabilities; on an older GPU every
CUDA call fails with "no kernel image is available for execution on the device", long after
the deploy said the host was ready. deploy.py runs ``check_gpu_architecture`` before the
image and JupyterLab: a Pascal or Volta card on a CUDA line built without it stops that
host, naming the CUDA line that runs it (``cuda = "12.6"``, whose lock keeps them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cache

from pyinfra import host
from pyinfra.api import operation

from labfleet import planning
from labfleet.facts.nvidia import GpuArchitectures
from labfleet.model import lock_file, locked_cudas
from labfleet.nvidia import has_gpu
from labfleet.planning import Read, step
from labfleet.preflight import failing_command
from labfleet.settings import Settings

# The CUDA architectures (compute capabilities) each locked torch wheel is built for, keyed
# by (torch, CUDA line): the wheel's CUDA_ARCH_FLAGS, as torch._C._cuda_getArchFlags() prints
# them (read from libtorch_python.so of the PyPI wheels that container/requirements/
# pytorch-cu*.txt lock). PyTorch dropped Maxwell and Pascal from its CUDA 12.8 builds, and
# Volta from 12.8 in 2.11 and from every 13.0 build (pytorch/pytorch#172352); its 12.6 builds
# keep them all. tests/unit checks that every lock's torch is listed here.
TORCH_ARCHS: dict[tuple[str, str], tuple[str, ...]] = {
    ("2.7.1", "12.6"): ("5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "9.0"),
    ("2.10.0", "12.8"): ("7.0", "7.5", "8.0", "8.6", "9.0", "10.0", "12.0"),
    ("2.11.0", "13.0"): ("7.5", "8.0", "8.6", "9.0", "10.0", "12.0"),
}
_TORCH_PIN = re.compile(r"^torch==(\S+)", re.MULTILINE)


@cache
def locked_torch(profile: str, cuda: str) -> str | None:
    """The torch version that the image's lock for this profile and CUDA line installs, or None."""
    path = lock_file(profile, cuda)
    match = _TORCH_PIN.search(path.read_text()) if path else None
    return match.group(1) if match else None


def _cap(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor)


def runs_on(compute_cap: tuple[int, int], archs: Sequence[str]) -> bool:
    """Whether code built for archs runs on a GPU of compute_cap.

    A cubin runs on its own major version at the same or a higher minor (sm_86 on 8.9); a GPU
    newer than every arch is left to the wheel's PTX, which this check does not judge.
    """
    caps = [_cap(arch) for arch in archs]
    major, minor = compute_cap
    return any(m == major and n <= minor for m, n in caps) or compute_cap > max(caps)


def torch_archs(profile: str, cuda: str) -> tuple[str | None, tuple[str, ...]]:
    """(torch version, its CUDA architectures) of the image for this profile and CUDA line; () when unknown."""
    torch = locked_torch(profile, cuda)
    return torch, TORCH_ARCHS.get((torch or "", cuda), ())


def architecture_problem(host_name: str, profile: str, cuda: str, gpus: Sequence[Mapping]) -> str | None:
    """The one line that refuses a host whose GPUs the image's torch has no kernels for; None when all run.

    + gpus: GpuArchitectures
    """
    torch, archs = torch_archs(profile, cuda)
    old = [gpu for gpu in gpus if archs and not runs_on(gpu["compute_cap"], archs)]
    if not old:
        return None
    named = ", ".join(
        f"GPU {gpu['index']} ({gpu['name']}) has compute capability {'.'.join(map(str, gpu['compute_cap']))}"
        for gpu in old
    )
    # The newest locked CUDA line whose torch runs every GPU here (its torch is the newest too).
    lines = [(other, *torch_archs(profile, other)) for other in locked_cudas(profile)]
    fixes = [c for c in lines if c[2] and all(runs_on(gpu["compute_cap"], c[2]) for gpu in gpus)]
    if fixes:
        line, fix_torch, fix_archs = fixes[-1]
        fix = (
            f'set cuda = "{line}" for this host (torch {fix_torch}, built for {fix_archs[0]} and newer), '
            "then run the deploy again"
        )
    else:
        fix = "no CUDA line labfleet locks has kernels for it; use another GPU or set gpu = false for this host"
    return (
        f"host {host_name}: {named}, and the image's torch {torch} for CUDA {cuda} is built for compute "
        f'capability {archs[0]} and newer (it would fail with "no kernel image is available"); {fix}'
    )


@operation(is_idempotent=True)
def check_gpu_architectures(profile: str, cuda: str):
    """Fail this host unless the image's torch has kernels for every GPU that the loaded driver lists.

    + profile: the image profile
    + cuda: the image's CUDA line

    **Example:**

    .. code:: python

        check_gpu_architectures(name="Check the GPUs", profile="pytorch", cuda="12.8")
    """
    gpus = host.get_fact(GpuArchitectures)
    problem = architecture_problem(host.name, profile, cuda, gpus)
    if problem is None:
        host.noop(f"{len(gpus)} GPU(s) run the image's torch" if gpus else "no GPU listed by nvidia-smi")
        return
    yield failing_command(problem)


def reads(settings: Settings) -> dict[str, Read]:
    """nvidia-smi's GPUs with their compute capability (only where a driver is loaded); none with gpu: false."""
    return {} if settings.gpu is False else {"architectures": Read(GpuArchitectures)}


@step("Check the GPUs against the image's CUDA line")
def check_gpu_architecture(settings: Settings):
    """Refuse, before the image and JupyterLab, a host whose GPUs the image's torch was not built for.

    torch's CUDA wheels carry kernels for a list of compute capabilities; on an older GPU
    every CUDA call fails with "no kernel image is available for execution on the device",
    long after the deploy said the host was ready. A host with a driver loaded is checked
    with nvidia-smi; one without is checked again when this run installed its driver.
    """
    if not has_gpu(settings):
        host.noop("no NVIDIA GPU on this host: no GPU architecture to check")
        return
    gpus = planning.read(reads(settings))["architectures"]
    problem = architecture_problem(settings.host, settings.image_profile, settings.cuda, gpus)
    planning.unless_current(
        check_gpu_architectures,
        current=problem is None,
        name="Check that the image's torch has kernels for every GPU",
        profile=settings.image_profile,
        cuda=settings.cuda,
    )
