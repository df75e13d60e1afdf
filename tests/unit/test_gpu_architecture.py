"""labfleet/gpu_architecture.py: every GPU's compute capability against the image's torch, from
recorded nvidia-smi output and the locked wheels' CUDA architectures."""

import pytest

from labfleet import gpu_architecture, model
from labfleet.facts.nvidia import GpuArchitectures, parse_gpu_architectures


@pytest.fixture
def fake_host(fake_host_in):
    return lambda facts=None: fake_host_in(gpu_architecture, facts)


# --- The GPUs' architectures against the image's torch ------------------------------------------

# `nvidia-smi --query-gpu=index,name,compute_cap --format=csv,noheader` on a TITAN V and an RTX
# 5880 Ada under driver 570.86.15: the two GPUs that triton-inference-server/server#8070 recorded
# (with `--query-gpu=compute_cap,compute_mode,driver_version,name,index --format=csv`), in this
# query's field order.
TITAN_V_AND_ADA = ["0, NVIDIA TITAN V, 7.0", "1, NVIDIA RTX 5880 Ada Generation, 8.9"]
# Pascal cards by their compute capability (NVIDIA's CUDA GPUs table): a P100 is 6.0, a GTX 1080 6.1.
PASCAL = ["0, Tesla P100-PCIE-16GB, 6.0", "1, NVIDIA GeForce GTX 1080, 6.1"]
# What nvidia-smi prints when the user-space driver is newer than the loaded module, as
# intel/llvm#17614 recorded it: nothing to parse, so nothing is refused.
NVML_MISMATCH = ["Failed to initialize NVML: Driver/library version mismatch", "NVML library version: 550.144"]


def test_gpu_architectures_fact():
    assert parse_gpu_architectures(TITAN_V_AND_ADA) == [
        {"index": 0, "name": "NVIDIA TITAN V", "compute_cap": (7, 0)},
        {"index": 1, "name": "NVIDIA RTX 5880 Ada Generation", "compute_cap": (8, 9)},
    ]
    assert parse_gpu_architectures(NVML_MISMATCH) == []
    # A comma in a name: the index is the first field, the capability the last.
    assert parse_gpu_architectures(["2, Lab GPU, rev 2, 7.5"])[0]["name"] == "Lab GPU, rev 2"


def test_every_cuda_lock_has_its_torch_architectures():
    """A relock that moves torch must say which GPUs the new wheel runs on (gpu_architecture.TORCH_ARCHS)."""
    locks = sorted(model.REQUIREMENTS_DIR.glob("*-cu*.txt"))
    assert locks
    for lock in locks:
        profile, _, line = lock.stem.rpartition("-cu")
        cuda = f"{line[:-1]}.{line[-1]}"
        torch = gpu_architecture.locked_torch(profile, cuda)
        assert torch is None or (torch, cuda) in gpu_architecture.TORCH_ARCHS, (
            f"{lock.name}: torch {torch} for CUDA {cuda}"
        )


@pytest.mark.parametrize(
    ("cap", "archs", "runs"),
    [
        ((6, 1), gpu_architecture.TORCH_ARCHS[("2.7.1", "12.6")], True),  # sm_60 runs on 6.1
        ((6, 1), gpu_architecture.TORCH_ARCHS[("2.10.0", "12.8")], False),
        ((7, 0), gpu_architecture.TORCH_ARCHS[("2.10.0", "12.8")], True),
        ((7, 0), gpu_architecture.TORCH_ARCHS[("2.11.0", "13.0")], False),
        ((8, 9), gpu_architecture.TORCH_ARCHS[("2.11.0", "13.0")], True),  # sm_86 runs on 8.9
        ((12, 1), gpu_architecture.TORCH_ARCHS[("2.10.0", "12.8")], True),
        ((11, 0), gpu_architecture.TORCH_ARCHS[("2.10.0", "12.8")], False),  # no sm_11x, older than sm_120
        ((13, 0), gpu_architecture.TORCH_ARCHS[("2.10.0", "12.8")], True),  # newer than every arch: not judged here
        ((3, 7), gpu_architecture.TORCH_ARCHS[("2.7.1", "12.6")], False),
    ],
)
def test_a_gpu_runs_the_kernels_of_its_major_at_or_below_its_minor(cap, archs, runs):
    assert gpu_architecture.runs_on(cap, archs) is runs


def test_pascal_and_volta_are_refused_with_the_cuda_line_that_runs_them():
    pascal = parse_gpu_architectures(PASCAL)
    problem = gpu_architecture.architecture_problem("pc03", "pytorch", "12.8", pascal)
    assert problem == (
        "host pc03: GPU 0 (Tesla P100-PCIE-16GB) has compute capability 6.0, GPU 1 (NVIDIA GeForce GTX 1080) has "
        "compute capability 6.1, and the image's torch 2.10.0 for CUDA 12.8 is built for compute capability 7.0 "
        'and newer (it would fail with "no kernel image is available"); set cuda = "12.6" for this host '
        "(torch 2.7.1, built for 5.0 and newer), then run the deploy again"
    )
    assert gpu_architecture.architecture_problem("pc03", "pytorch", "12.6", pascal) is None
    volta = parse_gpu_architectures(TITAN_V_AND_ADA)
    assert gpu_architecture.architecture_problem("pc04", "pytorch", "12.8", volta) is None
    on_13 = gpu_architecture.architecture_problem("pc04", "pytorch", "13.0", volta)
    assert on_13 is not None and "GPU 0 (NVIDIA TITAN V) has compute capability 7.0," in on_13
    assert "GPU 1" not in on_13 and 'set cuda = "12.8" for this host' in on_13
    kepler = parse_gpu_architectures(["0, Tesla K80, 3.7"])
    assert "no CUDA line labfleet locks has kernels for it" in gpu_architecture.architecture_problem(
        "pc05", "pytorch", "12.8", kepler
    )
    # The jupyter profile has no torch, and nothing is known without a driver: nothing refused.
    assert gpu_architecture.architecture_problem("pc03", "jupyter", "12.8", pascal) is None
    assert gpu_architecture.architecture_problem("pc03", "pytorch", "12.8", []) is None


def test_check_gpu_architectures_fails_the_host_with_its_line(fake_host):
    fake = fake_host({GpuArchitectures: parse_gpu_architectures(PASCAL)})
    (command,) = list(gpu_architecture.check_gpu_architectures._inner("pytorch", "12.8"))
    assert "labfleet: host pc01: GPU 0 (Tesla P100-PCIE-16GB) has compute capability 6.0" in command
    assert command.endswith("exit 1")
    fake.facts[GpuArchitectures] = parse_gpu_architectures(TITAN_V_AND_ADA)
    assert list(gpu_architecture.check_gpu_architectures._inner("pytorch", "12.8")) == []
    assert fake.noops == ["2 GPU(s) run the image's torch"]
