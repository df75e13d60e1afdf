"""labfleet/nvidia.py, nvidia_runtime.py and gpu_architecture.py end to end: the real pyinfra CLI over SSH
against systemd test hosts.

No GPU and no NVIDIA package is reachable here. The toolkit path runs against STAND-IN
packages under the four real names, from a GPG-signed local repository that the test host
serves on its own 127.0.0.1 with NVIDIA's layout (tests/e2e/nvidia_standin.py): their
runtime shim only execs runc, which is what the real runtime does for a container that
asks for no GPU. A "driver" is simulated by a tmpfs over /proc/driver that holds the text
a loaded driver exposes; no GPU is ever used. The stand-in hook, which dockerd runs for
`--gpus` and compose's GPU reservations, gives a container a stand-in nvidia-smi, so the
whole deploy.py, verify_gpu included, runs on a stand-in GPU host.

The toolkit's own deploys run tests/e2e/deploys/nvidia_step.py (preflight, NVIDIA, Docker);
the GPU lab runs deploy.py. Every deploy is run again to show that the second run changes
nothing.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest

from labfleet import nvidia, nvidia_runtime
from labfleet.planning import FactBatch

from . import nvidia_standin
from .harness.hosts import TestHost, host_exec
from .harness.runner import assert_converged, assert_no_changes

pytestmark = pytest.mark.e2e

NVIDIA_STEP = "tests/e2e/deploys/nvidia_step.py"
RESTART = "Configure the NVIDIA runtime | Restart dockerd so that it registers NVIDIA's GPU driver"
VERIFY = "Check the GPU in the lab image | Check that the lab image sees the GPU (nvidia-smi and the smoke test)"
DAEMON_MERGE = "Merge settings into /etc/docker/daemon.json and reload or restart dockerd"
CONTAINER = "labfleet-lab-jupyterlab-1"
GPU_UUID = "GPU-00000000-0000-0000-0000-000000000000"
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


def apt_policy(host: TestHost, package: str) -> dict[str, str]:
    """apt-cache policy's Installed and Candidate for package: what apt-get upgrade and unattended-upgrades
    would install (both take apt's candidate, which an apt preferences pin decides)."""
    out = sh(host, f"LC_ALL=C apt-cache policy {package}")
    return dict(re.findall(r"^\s+(Installed|Candidate): (\S+)$", out, re.MULTILINE))


def refresh_nvidia_lists(host: TestHost) -> None:
    """apt-get update for NVIDIA's source alone, as unattended-upgrades' daily update would see it."""
    sh(
        host,
        f"apt-get update -qq -o Dir::Etc::sourcelist={nvidia.SOURCES_FILE} -o Dir::Etc::sourceparts=- "
        "-o APT::Get::List-Cleanup=0",
    )


def test_toolkit_from_a_signed_repository_of_stand_ins(make_hosts, pyinfra_run):
    """nvidia_toolkit: true on a host without a GPU, as a lab prepares a machine for its card.

    STAND-IN toolkit packages (tests/e2e/nvidia_standin.py): the host starts with toolkit
    1.17.7 installed by hand from NVIDIA's guide (a .list, a key in /usr/share/keyrings),
    below the 1.17.8 security floor. The deploy upgrades it through labfleet's deb822 source
    and keyring, holds it there with an apt preferences pin that keeps it when 1.18 appears
    upstream, and moves it only when nvidia_toolkit_version asks. dockerd gets the runtime
    and the cgroupfs driver in one merge, and `docker run --runtime nvidia` starts a container
    through the stand-in shim. The CDI spec follows the simulated driver and the toolkit:
    labfleet's own spec before 1.18, NVIDIA's nvidia-cdi-refresh from 1.18.
    """
    (host,) = make_hosts(1)
    old, floor, refresh = nvidia_standin.VERSIONS
    assert nvidia_standin.build_standin_repo(host, (old, floor)) == 2 * len(nvidia.TOOLKIT_PACKAGES)
    mirror = nvidia_standin.serve(host)
    guide_list = "/etc/apt/sources.list.d/nvidia-container-toolkit.list"
    guide_key = "/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"
    write_file(host, guide_list, f"deb [signed-by={guide_key}] {mirror}/$(ARCH) /\n")
    sh(
        host,
        f"gpg --dearmor < {nvidia_standin.ROOT}/libnvidia-container/gpgkey > {guide_key} && "
        f"dpkg -i {nvidia_standin.POOL}/*_{old}_*.deb >/dev/null",
    )
    assert installed_versions(host) == dict.fromkeys(nvidia.TOOLKIT_PACKAGES, old)
    write_file(host, "/etc/docker/daemon.json", '{"exec-opts": ["native.umask=normal"]}\n')
    data = {**BASE, "nvidia_toolkit": True, "nvidia_toolkit_apt_mirror": mirror}

    first = pyinfra_run([host], deploy=NVIDIA_STEP, data=data)
    assert_converged(first)
    assert first.status(host, "Install NVIDIA's repository key") == "success"
    assert first.status(host, f"Upgrade the NVIDIA Container Toolkit {old} to 1.17.8 or later") == "success"
    assert first.status(host, "Hold the NVIDIA Container Toolkit at its installed version") == "success"
    # The toolkit came before the engine, so the engine's own start found it: no second restart.
    assert RESTART not in first.changed(host)

    assert installed_versions(host) == dict.fromkeys(nvidia.TOOLKIT_PACKAGES, floor)
    arch = sh(host, "dpkg --print-architecture").strip()
    sources = sh(host, f"cat {nvidia.SOURCES_FILE}")
    assert f"URIs: {mirror}/{arch}\n" in sources and "Suites: /\n" in sources and "Components" not in sources
    assert f"Signed-By: {nvidia.KEYRING}" in sources
    assert sh(host, f"sha256sum < {nvidia.KEYRING}") == sh(
        host, f"sha256sum < {nvidia_standin.ROOT}/libnvidia-container/gpgkey"
    )
    assert sh(host, f"ls {guide_list} {guide_key} 2>/dev/null; true") == ""
    hold = sh(host, f"cat {nvidia.PIN_FILE}")
    assert hold.startswith(f"# {nvidia.HOLD_COMMENT}\n") and f"Pin: version {floor}\nPin-Priority: 1001" in hold

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

    # No driver is loaded, so there is no CDI spec to generate; 1.17.8 has no refresh units.
    assert sh(host, f"ls {nvidia_runtime.CDI_SPEC} 2>/dev/null; true") == ""
    assert_no_changes(pyinfra_run([host], deploy=NVIDIA_STEP, data=data))

    # 1.18 appears upstream: apt's candidate stays the held version, so neither apt-get upgrade
    # nor unattended-upgrades moves it, and the deploy leaves it where it is.
    assert nvidia_standin.publish(host, nvidia_standin.VERSIONS) == 3 * len(nvidia.TOOLKIT_PACKAGES)
    refresh_nvidia_lists(host)
    assert apt_policy(host, "nvidia-container-toolkit") == {"Installed": floor, "Candidate": floor}
    assert refresh in sh(host, "LC_ALL=C apt-cache madison nvidia-container-toolkit")
    assert "nvidia" not in sh(host, "LC_ALL=C apt-get -s upgrade; LC_ALL=C apt-get -s dist-upgrade")
    assert_no_changes(pyinfra_run([host], deploy=NVIDIA_STEP, data=data))
    assert installed_versions(host) == dict.fromkeys(nvidia.TOOLKIT_PACKAGES, floor)

    # A simulated driver: gpu: auto now detects a GPU, the floor holds, and labfleet's CDI spec
    # is generated for that driver and toolkit, then again only when the driver changes.
    gpu_data = {**data, "nvidia_toolkit": "auto"}
    for driver in ("570.86.15", "580.65.06"):
        nvidia_standin.simulate_driver(host, driver)
        run = pyinfra_run([host], deploy=NVIDIA_STEP, data=gpu_data)
        assert_converged(run)
        assert run.changed(host) == [
            "Configure the NVIDIA runtime | Keep the CDI spec current for the driver and the toolkit"
        ]
        spec = sh(host, f"cat {nvidia_runtime.CDI_SPEC}")
        assert f"# driver: {driver}\n# toolkit: {floor}\n" in spec
        assert sh(host, f"cat {nvidia_runtime.CDI_MARKER}").strip() == f"{driver} {floor}"
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

    # nvidia_toolkit_version moves it to 1.18, which keeps its own spec with NVIDIA's refresh
    # units: labfleet's /etc/cdi spec goes, the units are enabled, and the service's spec under
    # /var/run/cdi is for the driver and the new toolkit. dockerd found the hook at its start,
    # so an upgrade does not restart it.
    pinned = {**gpu_data, "nvidia_toolkit_version": refresh}
    moved = pyinfra_run([host], deploy=NVIDIA_STEP, data=pinned)
    assert_converged(moved)
    assert RESTART not in moved.changed(host)
    assert installed_versions(host) == dict.fromkeys(nvidia.TOOLKIT_PACKAGES, refresh)
    assert f"Pin: version {refresh}" in sh(host, f"cat {nvidia.PIN_FILE}")
    assert sh(host, f"ls {nvidia_runtime.CDI_SPEC} 2>/dev/null; true") == ""
    for unit in (nvidia_runtime.CDI_REFRESH_UNIT, nvidia_runtime.CDI_REFRESH_SERVICE):
        assert sh(host, f"systemctl is-enabled {unit}").strip() == "enabled", unit
    assert sh(host, f"systemctl is-active {nvidia_runtime.CDI_REFRESH_UNIT}").strip() == "active"
    assert f"# driver: 580.65.06\n# toolkit: {refresh}\n" in sh(host, f"cat {nvidia_runtime.CDI_REFRESH_SPEC}")
    assert sh(host, f"cat {nvidia_runtime.CDI_MARKER}").strip() == f"refresh 580.65.06 {refresh}"
    assert_no_changes(pyinfra_run([host], deploy=NVIDIA_STEP, data=pinned))
    nvidia_standin.simulate_driver(host, "570.86.15")
    again = pyinfra_run([host], deploy=NVIDIA_STEP, data=pinned)
    assert again.changed(host) == [
        "Configure the NVIDIA runtime | Keep the CDI spec current for the driver and the toolkit"
    ]
    assert "# driver: 570.86.15\n" in sh(host, f"cat {nvidia_runtime.CDI_REFRESH_SPEC}")
    assert_no_changes(pyinfra_run([host], deploy=NVIDIA_STEP, data=pinned))

    # nvidia_default_runtime on, then off: the key labfleet wrote goes; one set by hand stays.
    on = pyinfra_run([host], deploy=NVIDIA_STEP, data={**pinned, "nvidia_default_runtime": True})
    assert_converged(on)
    assert json.loads(sh(host, "cat /etc/docker/daemon.json"))["default-runtime"] == "nvidia"
    assert sh(host, "docker info --format '{{.DefaultRuntime}}'").strip() == "nvidia"
    off = pyinfra_run([host], deploy=NVIDIA_STEP, data=pinned)
    assert_converged(off)
    assert "default-runtime" not in json.loads(sh(host, "cat /etc/docker/daemon.json"))
    assert sh(host, "docker info --format '{{.DefaultRuntime}}'").strip() == "runc"
    assert sh(host, f"ls {nvidia_runtime.DEFAULT_RUNTIME_MARKER} 2>/dev/null; true") == ""
    assert_no_changes(pyinfra_run([host], deploy=NVIDIA_STEP, data=pinned))
    by_hand = {**json.loads(sh(host, "cat /etc/docker/daemon.json")), "default-runtime": "nvidia"}
    write_file(host, "/etc/docker/daemon.json", json.dumps(by_hand))
    assert_no_changes(pyinfra_run([host], deploy=NVIDIA_STEP, data=pinned))
    assert json.loads(sh(host, "cat /etc/docker/daemon.json"))["default-runtime"] == "nvidia"

    # GPUs too old for the image's torch stop the host before anything changes, naming each GPU
    # and the CUDA line that runs it. A STAND-IN nvidia-smi on the host answers labfleet's query
    # as a P100 and a GTX 1080 would (their compute capabilities from NVIDIA's table).
    write_file(host, "/usr/local/bin/nvidia-smi", PASCAL_NVIDIA_SMI)
    sh(host, "chmod 755 /usr/local/bin/nvidia-smi")
    pascal = pyinfra_run([host], deploy=NVIDIA_STEP, data={**pinned, "cuda": "12.8"}, expect_fail=True)
    output = pascal.stdout + pascal.stderr
    assert (
        f"host {host.name}: GPU 0 (Tesla P100-PCIE-16GB) has compute capability 6.0, GPU 1 (NVIDIA GeForce GTX "
        "1080) has compute capability 6.1, and the image's torch 2.10.0 for CUDA 12.8 is built for compute "
        'capability 7.0 and newer (it would fail with "no kernel image is available"); set cuda = "12.6"'
    ) in output
    assert pascal.errors() == [
        (
            host.name,
            "Check the GPUs against the image's CUDA line | Check that the image's torch has kernels for every GPU",
        )
    ]
    assert_no_changes(pyinfra_run([host], deploy=NVIDIA_STEP, data={**pinned, "cuda": "12.6"}))
    sh(host, "rm /usr/local/bin/nvidia-smi")

    # A driver below the floor stops the host before anything changes, saying what to do.
    nvidia_standin.simulate_driver(host, "470.256.02")
    old_driver = pyinfra_run([host], deploy=NVIDIA_STEP, data=gpu_data, expect_fail=True)
    output = old_driver.stdout + old_driver.stderr
    assert f"host {host.name}: NVIDIA driver 470.256.02 is below" in output
    assert "nvidia_driver_install: true" in output
    ((failed_host, failed_op),) = old_driver.errors()
    assert failed_host == host.name and failed_op.startswith("Check the NVIDIA driver | Check that the NVIDIA driver")
    nvidia_standin.simulate_driver(host, None)


PASCAL_NVIDIA_SMI = """#!/bin/sh
# STAND-IN nvidia-smi (labfleet tests): labfleet's compute-capability query, as a P100 and a GTX 1080 answer it.
case "$*" in
*--query-gpu=index,name,compute_cap*) printf '0, Tesla P100-PCIE-16GB, 6.0\\n1, NVIDIA GeForce GTX 1080, 6.1\\n';;
*) exit 1;;
esac
"""


def device_requests(host: TestHost) -> list[dict]:
    """The JupyterLab container's HostConfig.DeviceRequests, the fields compose sets."""
    inspect = json.loads(sh(host, f"docker inspect --format '{{{{json .HostConfig.DeviceRequests}}}}' {CONTAINER}"))
    return [{key: request[key] for key in ("Driver", "Count", "DeviceIDs", "Capabilities")} for request in inspect]


def test_gpu_lab_comes_up_through_composes_gpu_reservation(make_hosts, pyinfra_run, lab_data):
    """gpu = true on a host whose engine was installed before the toolkit: the whole deploy.py.

    STAND-IN toolkit packages and a simulated driver (tests/e2e/nvidia_standin.py): dockerd
    registers its nvidia device driver only when it starts and finds the STAND-IN
    nvidia-container-runtime-hook, so the engine, running before the toolkit, is restarted
    once; then compose's GPU reservation (gpu_devices "all", a count, then device ids) starts
    JupyterLab through that driver: dockerd runs the stand-in hook as a prestart hook with
    the devices asked for, and the hook gives the container a stand-in nvidia-smi, which is
    what verify_gpu's `docker run --gpus` then lists. No GPU is used.
    """
    (host,) = make_hosts(1, engine=True)
    nvidia_standin.build_standin_repo(host, (nvidia_standin.FLOOR,))
    mirror = nvidia_standin.serve(host)
    nvidia_standin.simulate_driver(host, "580.65.06")
    # The engine already runs with the keys labfleet wants, so the docker step has nothing to
    # restart it for: only the toolkit's arrival does.
    wanted = {"live-restore": True, "runtimes": {"nvidia": {"path": "nvidia-container-runtime", "args": []}}}
    wanted["exec-opts"] = ["native.cgroupdriver=cgroupfs"]
    write_file(host, "/etc/docker/daemon.json", json.dumps(wanted))
    sh(host, "systemctl restart docker && docker info >/dev/null")
    dockerd = sh(host, "systemctl show --property=MainPID --value docker.service")
    data = {**lab_data, "gpu": True, "nvidia_toolkit_apt_mirror": mirror}
    hook_log = f"cat {nvidia_standin.HOOK_LOG} 2>/dev/null; true"

    for devices, request, visible in (
        ("all", {"Driver": "nvidia", "Count": -1, "DeviceIDs": None, "Capabilities": [["gpu"]]}, "all"),
        (1, {"Driver": "nvidia", "Count": 1, "DeviceIDs": None, "Capabilities": [["gpu"]]}, "0"),
        ([GPU_UUID], {"Driver": "nvidia", "Count": 0, "DeviceIDs": [GPU_UUID], "Capabilities": [["gpu"]]}, GPU_UUID),
    ):
        run = pyinfra_run([host], data={**data, "gpu_devices": devices})
        assert_converged(run)
        assert run.status(host, VERIFY) == "no_change", f"{host.name}: verify_gpu with gpu_devices = {devices!r}"
        assert device_requests(host) == [request], f"{host.name}: gpu_devices = {devices!r}"
        container = sh(host, f"docker inspect --format '{{{{.Id}}}}' {CONTAINER}").strip()
        assert f"prestart {container} NVIDIA_VISIBLE_DEVICES={visible}\n" in sh(host, hook_log), (
            f"{host.name}: the stand-in hook did not run for the JupyterLab container"
        )
        assert sh(host, f"docker exec {CONTAINER} nvidia-smi -L").startswith("GPU "), f"{host.name}: {devices!r}"
        assert sh(host, f"docker inspect --format '{{{{.State.Health.Status}}}}' {CONTAINER}").strip() == "healthy"
        if devices == "all":
            # The engine ran before the toolkit: one restart, by the NVIDIA step, and --gpus works.
            assert RESTART in run.changed(host)
            assert not any(name.endswith(DAEMON_MERGE) for name in run.changed(host))
            assert sh(host, "systemctl show --property=MainPID --value docker.service") != dockerd
        assert_no_changes(pyinfra_run([host], data={**data, "gpu_devices": devices}))

    host_exec(host, IMPORT_TINY_IMAGE, timeout=120)
    said = sh(host, f"docker run --rm --gpus all {TINY_IMAGE} /bin/sh -c 'echo gpus; /usr/bin/nvidia-smi -L'")
    assert said.splitlines() == ["gpus", f"GPU 0: NVIDIA STAND-IN (UUID: {GPU_UUID})"]
