"""The NVIDIA layer: whether a host has GPUs to give the container."""

from __future__ import annotations

from pyinfra import host

from labfleet.facts import NvidiaGpus
from labfleet.settings import Settings


def has_gpu(settings: Settings) -> bool:
    """`gpu: true/false` decides; `auto` asks the PCI bus and the driver."""
    if isinstance(settings.gpu, bool):
        return settings.gpu
    return bool(host.get_fact(NvidiaGpus))
