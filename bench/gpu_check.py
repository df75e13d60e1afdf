"""labfleet's GPU facts against this machine's own driver, printed: what a deploy and the status see.

    sudo bench/gpu_check.sh              # on a GPU host, from a checkout of labfleet
    sudo bench/gpu_check.sh --json       # everything, as JSON
    bench/gpu_check.sh --cull 2h         # mark kernels idle longer than 2h (default: group_data's 24h)
    bench/gpu_check.sh --cuda 13.0       # judge the GPUs against that CUDA line's torch (default 12.8)

It runs each fact's own command on this machine with ``sh`` and parses the output with the fact's
own parser, exactly as pyinfra does over SSH: the detection (GpuHost), the driver as the kernel and
the package manager see it (NvidiaDriver: the loaded module against the NVML library on disk, the
"Driver/library version mismatch" that needs a reboot), each GPU's compute capability against the
image's torch (GpuArchitectures, judged by labfleet.gpu_architecture as the deploy judges it), and
who uses which GPU (GpuUsage, attributed by labfleet.gpu_usage). Nothing is changed and nothing
leaves the machine. Run it as root: the process attribution reads docker and other users' processes.

Exit status: 0 when nvidia-smi answered and the module matches the library, 1 when either did
not, 2 when this machine has no NVIDIA GPU or no nvidia-smi at all.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence

from pyinfra.api import FactBase

from labfleet import gpu_usage
from labfleet.facts.gpu_usage import GpuUsage, GpuUsageState
from labfleet.facts.nvidia import GpuArchitecture, GpuArchitectures, GpuHost, GpuHostState
from labfleet.facts.nvidia_driver import DriverState, NvidiaDriver, installed_driver, reboot_needed
from labfleet.gpu_architecture import architecture_problem
from labfleet.model import CUDA_DRIVER_FLOOR, Invalid, cull_idle
from labfleet.nvidia_driver import reboot_line


def run_fact(fact_class: type[FactBase], **kwargs):
    """The fact's value on this machine: its command run by sh, its output through its parser."""
    fact = fact_class()
    done = subprocess.run(["sh", "-c", str(fact.command(**kwargs))], capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return fact.process(lines) if lines else fact.default()


def driver_check(
    name: str,
    host: GpuHostState,
    driver: DriverState,
    usage: GpuUsageState,
    architectures: Sequence[GpuArchitecture] = (),
    cuda: str = "12.8",
) -> list[str]:
    """Problems that a person must act on (empty: none found), in the deploy's own words: the
    reboot-needed line (labfleet.nvidia_driver) where the module differs from the library, and
    the compute-capability refusal (labfleet.gpu_architecture) for the pytorch image of cuda."""
    problems = []
    refused = architecture_problem(name, "pytorch", cuda, architectures)
    if refused:
        problems.append(refused)
    mismatch = reboot_needed(driver)
    if mismatch:
        problems.append(reboot_line(name, *mismatch))
    if usage["error"]:
        problems.append(f"nvidia-smi: {usage['error']}")
    if host["gpus"] and not host["driver"] and not mismatch:
        problems.append("NVIDIA GPUs but no loaded nvidia kernel module")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print everything as JSON")
    parser.add_argument(
        "--cull", default="24h", help='jupyter_cull_idle to mark idle kernels by ("off" or 30m, 24h, ...)'
    )
    parser.add_argument(
        "--cuda", default="12.8", choices=sorted(CUDA_DRIVER_FLOOR), help="the image's CUDA line (cuda setting)"
    )
    args = parser.parse_args(argv)
    try:
        cull_seconds = cull_idle(args.cull)
    except Invalid:
        parser.error(f'--cull {args.cull!r}: expected "off" or a duration like "30m", "12h" or "2d"')

    name = socket.gethostname()
    host = run_fact(GpuHost)
    driver = run_fact(NvidiaDriver)
    usage = run_fact(GpuUsage)
    architectures = run_fact(GpuArchitectures)
    use = gpu_usage.host_gpu_use(usage, cull_seconds)
    problems = driver_check(name, host, driver, usage, architectures, args.cuda)

    if args.json:
        found = {
            "host": name,
            "GpuHost": host,
            "NvidiaDriver": driver,
            "GpuArchitectures": architectures,
            "GpuUsage": usage,
        }
        print(json.dumps({**found, "gpu_use": use, "problems": problems}, indent=2))
    else:
        print(f"labfleet GPU check on {name} (this machine's driver; nothing changed, no network)")
        if os.geteuid() != 0:
            print("note: not root: docker and other users' processes may be unreadable; run it with sudo")
        secure = {True: "on", False: "off", None: "unknown"}[host["secure_boot"]]
        gpus = " ".join(host["gpus"]) or "-"
        print(
            f"GpuHost: {len(host['gpus'])} GPU(s) {gpus}; loaded module {host['driver'] or '-'}; "
            f"nouveau {'loaded' if host['nouveau'] else 'not loaded'}; Secure Boot {secure}"
        )
        libraries = ", ".join(driver["libraries"]) or "-"
        print(
            f"NvidiaDriver: module {driver['module'] or '-'} ({driver['flavour'] or '-'}); NVML library {libraries}; "
            f"installed release {installed_driver(driver) or '-'}; {len(driver['packages'])} driver package(s)"
        )
        for gpu in architectures:
            cap = ".".join(map(str, gpu["compute_cap"]))
            print(f"GpuArchitectures: GPU {gpu['index']} ({gpu['name']}) compute capability {cap}")
        if use is None:
            print("GpuUsage: no nvidia-smi on this machine")
        else:
            print("\n".join(gpu_usage.gpu_lines([(name, use)])) or "GpuUsage: nvidia-smi listed no GPU")
            for gpu in use["gpus"]:
                for user in gpu["users"]:
                    for process in user["processes"]:
                        memory = gpu_usage.gib(process["memory"])
                        print(f"  GPU {gpu['index']}: pid {process['pid']} -> {user['user']} ({memory})")
        for line in gpu_usage.idle_notes([(name, use)]):
            print(f"note: {line}")
        for problem in problems:
            print(f"problem: {problem}")
    if not host["gpus"] and not usage["smi"]:
        return 2
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
