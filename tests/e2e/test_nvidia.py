"""labfleet/nvidia.py end to end: the real pyinfra CLI over SSH against systemd test hosts.

No GPU and no NVIDIA package is reachable here. The toolkit path runs against STAND-IN
packages under the four real names, from a GPG-signed local repository that the test host
serves on its own 127.0.0.1 with NVIDIA's layout (tests/e2e/nvidia_standin.py): their
runtime shim only execs runc, which is what the real runtime does for a container that
asks for no GPU. A "driver" is simulated by a tmpfs over /proc/driver that holds the text
a loaded driver exposes; no GPU is ever used. The image's GPU check (nvidia.verify_gpu)
runs only where a GPU machine is lent.

Every deploy here runs tests/e2e/deploys/nvidia_step.py (preflight, NVIDIA, Docker) and
is run again to show that the second run changes nothing.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest

from labfleet import nvidia
from labfleet.planning import FactBatch

from . import nvidia_standin
from .harness.hosts import TestHost, host_exec
from .harness.runner import assert_converged, assert_no_changes

pytestmark = pytest.mark.e2e

NVIDIA_STEP = "tests/e2e/deploys/nvidia_step.py"
DEAD_MIRROR = "http://127.0.0.1:9"
BASE = {"extra_ca_certificates": [], "docker_source": "distro", "docker_apt_mirror": DEAD_MIRROR}
TINY_IMAGE = "labfleet-test/tiny-sh"
# /bin/sh and the libraries it loads, as an image: the hosts have no registry to pull from.
IMPORT_TINY_IMAGE = (
    'd=$(mktemp -d) && for f in /bin/sh $(ldd /bin/sh | grep -o "/[^ ]*"); do cp --parents -L "$f" "$d"; done && '
    f'tar -C "$d" -c . | docker import - {TINY_IMAGE} >/dev/null && rm -rf "$d"'
)


def sh(host: TestHost, command: str) -> str:
    return host_exec(host, command, timeout=180).stdout


def write_file(host: TestHost, path: str, text: str) -> None:
    host_exec(host, f"mkdir -p $(dirname {shlex.quote(path)}) && cat > {shlex.quote(path)}", input=text)


def installed_versions(host: TestHost) -> dict[str, str]:
    names = " ".join(nvidia.TOOLKIT_PACKAGES)
    out = sh(host, f"dpkg-query -W -f '${{Package}} ${{Version}} ${{db:Status-Status}}\\n' {names} 2>/dev/null; true")
    rows = (line.split() for line in out.splitlines())
    return {name: version for name, version, status in rows if status == "installed"}


def test_cpu_only_host_skips_the_nvidia_steps(make_hosts, pyinfra_run):
    """gpu and nvidia_toolkit left at "auto" on a host without a GPU: Docker only, and the output says why."""
    (host,) = make_hosts(1)
    first = pyinfra_run([host], deploy=NVIDIA_STEP, data=BASE)
    assert_converged(first)
    assert first.status(host, "Skip the NVIDIA steps: no NVIDIA GPU on this host") == "no_change"
    assert "the NVIDIA driver check, toolkit and runtime are skipped" in first.stderr
    assert installed_versions(host) == {}
    assert sh(host, f"ls {nvidia.SOURCES_FILE} 2>/dev/null; true") == ""
    assert "nvidia" not in sh(host, "cat /etc/docker/daemon.json 2>/dev/null; true")
    assert "nvidia" not in sh(host, "docker info --format '{{json .Runtimes}}'")

    assert_no_changes(pyinfra_run([host], deploy=NVIDIA_STEP, data=BASE))


def test_toolkit_from_a_signed_repository_of_stand_ins(make_hosts, pyinfra_run):
    """nvidia_toolkit: true on a host without a GPU, as a lab prepares a machine for its card.

    The stand-in packages come through labfleet's deb822 source, keyring and version pin;
    dockerd gets the runtime and the cgroupfs driver in one merge, and `docker run
    --runtime nvidia` starts a container through the stand-in shim. NVIDIA's guide's
    .list file is replaced, and an exec-opts key set by hand is kept.
    """
    (host,) = make_hosts(1)
    assert nvidia_standin.build_standin_repo(host) == 2 * len(nvidia.TOOLKIT_PACKAGES)
    mirror = nvidia_standin.serve(host)
    guide_list = "/etc/apt/sources.list.d/nvidia-container-toolkit.list"
    write_file(
        host,
        guide_list,
        f"deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] {mirror}/$(ARCH) /\n",
    )
    write_file(host, "/etc/docker/daemon.json", '{"exec-opts": ["native.umask=normal"]}\n')
    pinned = nvidia_standin.VERSIONS[0]
    data = {**BASE, "nvidia_toolkit": True, "nvidia_toolkit_apt_mirror": mirror, "nvidia_toolkit_version": pinned}

    first = pyinfra_run([host], deploy=NVIDIA_STEP, data=data)
    assert_converged(first)
    assert first.status(host, "Install NVIDIA's repository key") == "success"
    assert first.status(host, "Install the NVIDIA Container Toolkit packages") == "success"
    # The toolkit came before the engine, so the engine's own start found it: no second restart.
    assert first.status(host, "Restart dockerd so that it registers NVIDIA's GPU driver") == "no_change"

    assert installed_versions(host) == dict.fromkeys(nvidia.TOOLKIT_PACKAGES, pinned)
    arch = sh(host, "dpkg --print-architecture").strip()
    sources = sh(host, f"cat {nvidia.SOURCES_FILE}")
    assert f"URIs: {mirror}/{arch}\n" in sources and "Suites: /\n" in sources and "Components" not in sources
    assert f"Signed-By: {nvidia.KEYRING}" in sources
    assert sh(host, f"sha256sum < {nvidia.KEYRING}") == sh(
        host, f"sha256sum < {nvidia_standin.ROOT}/libnvidia-container/gpgkey"
    )
    assert f"Pin: version {pinned}" in sh(host, f"cat {nvidia.PIN_FILE}")
    assert sh(host, f"ls {guide_list} 2>/dev/null; true") == ""

    config = json.loads(sh(host, "cat /etc/docker/daemon.json"))
    assert config["runtimes"] == {"nvidia": {"path": "nvidia-container-runtime", "args": []}}
    assert config["exec-opts"] == ["native.umask=normal", "native.cgroupdriver=cgroupfs"]
    assert "default-runtime" not in config
    assert "nvidia" in json.loads(sh(host, "docker info --format '{{json .Runtimes}}'"))
    assert sh(host, "docker info --format '{{.CgroupDriver}}'").strip() == "cgroupfs"

    host_exec(host, IMPORT_TINY_IMAGE, timeout=120)
    said = sh(host, f"docker run --rm --runtime nvidia {TINY_IMAGE} /bin/sh -c 'echo hello through nvidia'")
    assert said.strip() == "hello through nvidia"
    assert " create " in sh(host, f"cat {nvidia_standin.RUNTIME_LOG}"), "the stand-in shim did not run the container"

    # No driver is loaded, so there is no CDI spec to generate; the refresh unit is enabled.
    assert first.status(host, "Generate the CDI spec for the loaded driver") == "no_change"
    assert sh(host, f"ls {nvidia.CDI_SPEC} 2>/dev/null; true") == ""
    assert sh(host, f"systemctl is-enabled {nvidia.CDI_REFRESH_UNIT}").strip() == "enabled"

    assert_no_changes(pyinfra_run([host], deploy=NVIDIA_STEP, data=data))

    # A simulated driver: gpu: auto now detects a GPU, the floor holds, and the CDI spec is
    # generated for that driver, then again only when the driver changes.
    gpu_data = {**data, "nvidia_toolkit": "auto"}
    for driver in ("570.86.15", "580.65.06"):
        nvidia_standin.simulate_driver(host, driver)
        run = pyinfra_run([host], deploy=NVIDIA_STEP, data=gpu_data)
        assert_converged(run)
        assert run.changed(host) == ["Configure the NVIDIA runtime | Generate the CDI spec for the loaded driver"]
        assert f"# driver: {driver}" in sh(host, f"cat {nvidia.CDI_SPEC}")
        assert sh(host, f"cat {nvidia.CDI_MARKER}").strip() == driver
        assert_no_changes(pyinfra_run([host], deploy=NVIDIA_STEP, data=gpu_data))
    assert sh(host, f"grep -c 'cdi generate' {nvidia_standin.CTK_LOG}").strip() == "2"

    # A converged GPU host costs one round trip while planning: every NVIDIA and Docker fact
    # comes in one batch. Running, only the repository key is fetched (only the host can
    # tell whether the served key changed).
    debug = pyinfra_run([host], deploy=NVIDIA_STEP, data=gpu_data, args=["--debug"])
    assert_no_changes(debug)
    commands = re.findall(rf"Running command on {re.escape(host.name)}: (.*)", debug.stderr)
    assert len(commands) == 2, "\n".join(command[:200] for command in commands)
    assert FactBatch.MARK in commands[0]
    assert "gpgkey" in commands[1]

    # A driver below the floor stops the host before anything changes, saying what to do.
    nvidia_standin.simulate_driver(host, "520.61.05")
    old = pyinfra_run([host], deploy=NVIDIA_STEP, data=gpu_data, expect_fail=True)
    output = old.stdout + old.stderr
    assert f"host {host.name}: NVIDIA driver 520.61.05 is below 525.60.13, the floor for CUDA 12.8" in output
    assert "nvidia-driver" in output and "nvidia_driver_install: true" in output
    assert old.errors() == [(host.name, "Check the NVIDIA driver | Check that the NVIDIA driver is at least 525.60.13")]
    nvidia_standin.simulate_driver(host, None)
