"""container/layer_locks.py: the image's layer slices are the full lock, cut, never re-resolved."""

import re
import runpy
import shutil
import subprocess
import sys

import pytest

from labfleet.settings import REPO_ROOT

CONTAINER = REPO_ROOT / "container"
REQUIREMENTS = CONTAINER / "requirements"
layer_locks = runpy.run_path(str(CONTAINER / "layer_locks.py"))
LOCKS = sorted(REQUIREMENTS.glob("*.txt"))


def _entries(text: str) -> dict[str, str]:
    """name -> the requirement line and its hashes, as pip reads them (comments dropped)."""
    found: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        if match:
            name = match.group(1)
            found[name] = line
        elif line.startswith(" ") and name and not line.strip().startswith("#"):
            found[name] += line
    return found


@pytest.mark.parametrize("lock", LOCKS, ids=[lock.stem for lock in LOCKS])
def test_the_committed_slices_are_the_lock_cut_by_the_current_rule(lock, tmp_path):
    # A relock by hand that forgot the slices, or an edited slice, would build another stack.
    copy = tmp_path / lock.name
    shutil.copyfile(lock, copy)
    layer_locks["write"](copy)
    fresh = sorted(p.name for p in (tmp_path / f"{lock.stem}.layers").iterdir())
    committed = REQUIREMENTS / f"{lock.stem}.layers"
    assert sorted(p.name for p in committed.iterdir()) == fresh, f"re-run container/relock.sh for {lock.name}"
    for name in fresh:
        assert (committed / name).read_text() == (tmp_path / f"{lock.stem}.layers" / name).read_text(), name


@pytest.mark.parametrize("lock", LOCKS, ids=[lock.stem for lock in LOCKS])
def test_every_package_is_in_exactly_one_slice_with_its_hashes(lock):
    whole = _entries(lock.read_text())
    sliced: dict[str, str] = {}
    for path in sorted((REQUIREMENTS / f"{lock.stem}.layers").glob("*.txt")):
        part = _entries(path.read_text())
        assert not set(part) & set(sliced), f"{path.name} repeats {set(part) & set(sliced)}"
        sliced.update(part)
        # The PyTorch index, where the lock needs it, comes with every slice.
        for option in (line for line in lock.read_text().splitlines() if line.startswith("--")):
            assert option in path.read_text().splitlines()
    assert sliced == whole


def test_the_bottom_holds_the_torch_closure_and_the_top_the_jupyterlab_stack():
    slot = layer_locks["slot"]
    cuda = {slot(name) for name in ("nvidia-cublas-cu12", "nvidia-cudnn-cu12", "nvidia-nccl-cu12")}
    assert max(cuda) < slot("triton") < slot("torch") < slot("torchvision") == slot("torchaudio")
    assert slot("torchvision") < min(slot(name) for name in ("numpy", "scipy", "pandas"))
    assert max(slot(name) for name in ("numpy", "scipy", "pandas")) < min(
        slot(name) for name in ("jupyterlab", "jupyter-server", "ipykernel", "nbconvert")
    )
    assert slot("Jupyter_Server") == slot("jupyter-server"), "names are compared in PEP 503 form"
    assert all(1 <= slot(name) <= layer_locks["SLOTS"] for name in ("a", "zzz", "nvidia-x", "cuda-y"))


def test_a_new_package_moves_no_other_package_to_another_slice(tmp_path):
    lock = REQUIREMENTS / "jupyter.txt"
    before = layer_locks["split"](lock.read_text())[1]
    grown = lock.read_text() + "zzz-new-package==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n"
    after = layer_locks["split"](grown)[1]
    changed = [
        n
        for n in before
        if [name for name, _ in before[n]] != [name for name, _ in after[n] if name != "zzz-new-package"]
    ]
    assert changed == []
    assert sum(1 for n in after if any(name == "zzz-new-package" for name, _ in after[n])) == 1


def test_the_command_line_says_what_it_needs(tmp_path):
    script = str(CONTAINER / "layer_locks.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage: layer_locks.py LOCK.txt" in result.stderr
    shutil.copyfile(REQUIREMENTS / "jupyter.txt", tmp_path / "jupyter.txt")
    result = subprocess.run([sys.executable, script, str(tmp_path / "jupyter.txt")], capture_output=True, text=True)
    assert result.returncode == 0
    assert f"layer {layer_locks['SLOTS']:02d}:" in result.stderr and "layer 01: (empty)" in result.stderr
    assert len(list((tmp_path / "jupyter.layers").glob("*.txt"))) == layer_locks["SLOTS"]
