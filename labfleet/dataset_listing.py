"""The controller's listing of each local: dataset, started while pyinfra connects to the hosts.

A no-change run decides from a digest of each local: source's tree (labfleet.dataset_records):
a walk of every file, about 0.4 s per 200,000 files on the controller. Taken while the first
host plans, that walk was most of what declaring an ImageNet-sized dataset added to a run
with nothing to do, and the connections it waited behind had nothing to do with it. So the
inventory file calls ``list_datasets_ahead()``: as pyinfra starts connecting, every local:
source of the hosts in the run is listed by a child process (``python -m
labfleet.dataset_walk SRC``) on the controller's other cores, which keeps the listing for
the next run's changed paths (labfleet.dataset_changes) and prints the digest. Planning then
takes that digest instead of walking (``take``).

Anything unusual, a setting that does not validate, a child that fails or prints something
else, falls back to the walk in planning, which says what is wrong: listing ahead only moves
work earlier, it never decides anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pyinfra.api.state import BaseStateCallback

from labfleet.model import Invalid, datasets

# The directory that holds the labfleet package: the child imports it from there.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
# Listings in progress or done, by source path, for this controller process.
_started: dict[str, subprocess.Popen] = {}


def list_datasets_ahead() -> None:
    """Start listing every local: source as soon as pyinfra connects (called by the inventory file)."""
    from pyinfra import state

    if not any(isinstance(handler, _ListAhead) for handler in state.callback_handlers):
        state.add_callback_handler(_ListAhead())


class _ListAhead(BaseStateCallback):
    @staticmethod
    def host_before_connect(state, host) -> None:
        # The first connection starts them all; the inventory, group data included, is loaded by then.
        for source in local_sources(state.inventory.iter_active_hosts()):
            start(source)


def local_sources(hosts) -> list[str]:
    """The local: source paths the given hosts declare, each once; a host whose datasets do not
    validate is left to the settings check, which names it."""
    found: dict[str, None] = {}
    for host in hosts:
        try:
            declared = datasets(host.data.get("datasets") or {})
        except (Invalid, TypeError, ValueError):
            continue
        for dataset in declared:
            if dataset.source.kind == "local":
                found[str(dataset.source.path)] = None
    return list(found)


def start(src: str) -> None:
    """Start the child that lists src, once per controller process."""
    if src in _started:
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (_PACKAGE_ROOT, os.environ.get("PYTHONPATH"))))}
    try:
        _started[src] = subprocess.Popen(
            [sys.executable, "-m", "labfleet.dataset_walk", src],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
    except OSError:
        return


def take(src: str) -> str | None:
    """The digest a child listed for src (its listing is in the cache), or None: walk it here."""
    child = _started.pop(src, None)
    if child is None:
        return None
    output, _ = child.communicate()
    digest = output.decode(errors="replace").strip()
    if child.returncode != 0 or not digest.startswith("sha256:"):
        return None
    return digest
