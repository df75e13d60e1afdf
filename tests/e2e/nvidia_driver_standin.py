"""STAND-IN NVIDIA driver user space on a test host: packages with Debian's names, no GPU code.

No NVIDIA driver can be installed on these machines, so the tests build two releases of
``libnvidia-ml1`` and ``libcuda1`` with dpkg-deb under Debian's names and source
(``nvidia-graphics-drivers``), each holding only a text file where Debian puts NVML
(/usr/lib/<triplet>/nvidia/current/libnvidia-ml.so.<release>), and serve them from a flat
local apt repository (``file:``, trusted: it never leaves the host). With
nvidia_standin.simulate_driver's /proc/driver text, that is what a host looks like after an
unattended upgrade moved the user space past the loaded module. ``mokutil`` is a stand-in
script that prints what the real one prints with Secure Boot on. Every file says STAND-IN.
"""

from __future__ import annotations

import shlex

from .harness.hosts import TestHost, host_exec

REPO = "/srv/labfleet-driver-standin"
SOURCES = "/etc/apt/sources.list.d/labfleet-driver-standin.list"
MOKUTIL = "/usr/local/bin/mokutil"
PACKAGES = ("libnvidia-ml1", "libcuda1")


def _build(name: str, release: str) -> str:
    version = f"{release}-1"
    root = f"$tmp/{name}_{version}"
    library = "libnvidia-ml" if name == "libnvidia-ml1" else "libcuda"
    control = (
        f"Package: {name}\\nSource: nvidia-graphics-drivers\\nVersion: {version}\\nArchitecture: $arch\\n"
        "Maintainer: labfleet tests <standin@test>\\n"
        f"Description: STAND-IN for Debian's {name} (labfleet tests; no GPU code)\\n"
    )
    return "\n".join(
        [
            f"mkdir -p {root}/DEBIAN {root}/usr/lib/$triplet/nvidia/current",
            f"echo 'STAND-IN (labfleet tests)' > {root}/usr/lib/$triplet/nvidia/current/{library}.so.{release}",
            f'printf "{control}" > {root}/DEBIAN/control',
            f"dpkg-deb --root-owner-group --build {root} {REPO}/{name}_{version}_$arch.deb >/dev/null",
        ]
    )


def build_repo(host: TestHost, releases: tuple[str, ...]) -> None:
    """Build the stand-in packages of each release into a flat repository the host's apt reads."""
    script = [
        "set -eu",
        f"rm -rf {REPO}; mkdir -p {REPO}; tmp=$(mktemp -d)",
        'arch=$(dpkg --print-architecture); triplet=$(basename "$(ls -d /usr/lib/*-linux-gnu | head -n1)")',
        *(_build(name, release) for release in releases for name in PACKAGES),
        f"cd {REPO}",
        'for deb in *.deb; do dpkg-deb -f "$deb"; echo "Filename: ./$deb"; echo "Size: $(stat -c %s "$deb")"; '
        'echo "SHA256: $(sha256sum "$deb" | cut -d" " -f1)"; echo; done > Packages',
        'printf "Origin: labfleet STAND-IN\\nLabel: labfleet STAND-IN\\n" > Release',
        f"echo 'deb [trusted=yes] file:{REPO} ./' > {SOURCES}",
        'rm -rf "$tmp"',
    ]
    host_exec(host, "\n".join(script), timeout=120)


def install(host: TestHost, release: str) -> None:
    """Install the user space of release, as an unattended upgrade would have."""
    names = " ".join(f"{name}={release}-1" for name in PACKAGES)
    host_exec(
        host,
        f"apt-get -q update -o Dir::Etc::sourcelist={shlex.quote(SOURCES)} -o Dir::Etc::sourceparts=- >/dev/null && "
        f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q --allow-downgrades {names} >/dev/null",
        timeout=120,
    )


def secure_boot(host: TestHost, on: bool | None) -> None:
    """A stand-in mokutil that reports Secure Boot on (True) or off (False); None removes it."""
    if on is None:
        host_exec(host, f"rm -f {MOKUTIL}")
        return
    state = "enabled" if on else "disabled"
    host_exec(
        host,
        f"printf '#!/bin/sh\\n# STAND-IN for mokutil (labfleet tests)\\necho \"SecureBoot {state}\"\\n' > {MOKUTIL} "
        f"&& chmod 755 {MOKUTIL}",
    )
