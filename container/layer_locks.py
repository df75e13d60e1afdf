#!/usr/bin/env python3
"""Split one hash-locked profile into the image's layer slices: layer_locks.py LOCK.txt

The image installs its Python stack in SLOTS layers, one RUN per slice (see the Dockerfile),
so that a bump of one package rebuilds and re-ships one small layer instead of the whole
~8 GB stack. The slices are cut from the full lock, never resolved on their own: versions
and hashes are the full lock's, byte for byte, and `pip check` runs on the whole at the end.

The order is by how often a package moves. At the bottom the CUDA wheels, triton and torch,
which move together when torch does and make up nine tenths of the image; at the top the
JupyterLab stack, which releases most often. Within a band a package's slot is a hash of its
name, so adding or dropping one package never moves any other package to another layer.

Writes LOCK.layers/01.txt .. LOCK.layers/<SLOTS>.txt beside the lock (empty slices included:
the Dockerfile names every slot) and prints one line per slot with its packages. Stdlib only:
relock.sh runs it with the machine's python3.
"""

from __future__ import annotations

import re
import sys
import zlib
from pathlib import Path

SLOTS = 20
# (first slot, number of slots) per band, bottom of the image first.
CUDA_WHEELS = (1, 8)  # nvidia-*: 4.4 GB of the default image; a torch bump often keeps some
CUDA_PYTHON = (9, 1)  # cuda-bindings, cuda-pathfinder, ...: torch's own CUDA helpers
TRITON = (10, 1)
TORCH = (11, 1)
TORCH_COMPANIONS = (12, 1)  # torchvision, torchaudio: released in step with torch
LIBRARIES = (13, 4)  # numpy, scipy, pandas, the scientific stack and everything else
FRONTEND = (17, 4)  # JupyterLab, the server, kernels and extensions: bumped most often

_FRONTEND_NAMES = re.compile(r"^(jupyter|ipy|nb|notebook|widgetsnbextension|bash-kernel|python-lsp|comm$)")
_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==")


def canonical(name: str) -> str:
    """PEP 503's normal form, so `Jupyter_Core` and `jupyter-core` land in the same slot."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _in_band(band: tuple[int, int], name: str) -> int:
    first, count = band
    return first + zlib.crc32(name.encode()) % count


def slot(name: str) -> int:
    """The layer (1..SLOTS) a package is installed in."""
    name = canonical(name)
    if name.startswith("nvidia-"):
        return _in_band(CUDA_WHEELS, name)
    if name.startswith("cuda-"):
        return _in_band(CUDA_PYTHON, name)
    if name == "triton":
        return _in_band(TRITON, name)
    if name == "torch":
        return _in_band(TORCH, name)
    if name in ("torchvision", "torchaudio"):
        return _in_band(TORCH_COMPANIONS, name)
    if _FRONTEND_NAMES.match(name):
        return _in_band(FRONTEND, name)
    return _in_band(LIBRARIES, name)


def split(text: str) -> tuple[list[str], dict[int, list[tuple[str, list[str]]]]]:
    """The lock's option lines (an --extra-index-url every slice needs) and its entries by slot.

    An entry is a requirement line with the hash and `# via` lines below it, kept verbatim.
    """
    options: list[str] = []
    slots: dict[int, list[tuple[str, list[str]]]] = {number: [] for number in range(1, SLOTS + 1)}
    current: list[str] | None = None
    for line in text.splitlines():
        match = _REQUIREMENT.match(line)
        if match:
            current = [line]
            slots[slot(match.group(1))].append((canonical(match.group(1)), current))
        elif line.startswith("-"):
            options.append(line)
            current = None
        elif line.startswith((" ", "\t")) and current is not None:
            current.append(line)
        else:
            current = None  # the header's comments stay with the full lock
    return options, slots


def write(lock: Path) -> dict[int, list[str]]:
    """Write LOCK.layers/NN.txt for every slot; return the package names per slot."""
    options, slots = split(lock.read_text())
    directory = lock.with_name(lock.stem + ".layers")
    directory.mkdir(exist_ok=True)
    for stale in directory.glob("*.txt"):
        stale.unlink()
    names: dict[int, list[str]] = {}
    for number, entries in slots.items():
        header = [
            f"# Layer {number:02d} of {SLOTS} of {lock.name}, cut by container/layer_locks.py: do not edit,",
            "# re-run container/relock.sh, which rewrites the lock and every slice from one resolution.",
        ]
        body = [line for _, lines in entries for line in lines]
        (directory / f"{number:02d}.txt").write_text("\n".join([*header, *options, *body]) + "\n")
        names[number] = [name for name, _ in entries]
    return names


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_file():
        print("usage: layer_locks.py LOCK.txt  (a lock written by container/relock.sh)", file=sys.stderr)
        return 2
    for number, packages in write(Path(argv[0])).items():
        print(f"layer {number:02d}: {' '.join(packages) or '(empty)'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
