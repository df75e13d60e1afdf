"""The controller's listing of each local: dataset, started while pyinfra connects to the hosts.

A no-change run decides from a digest of each local: source's tree (labfleet.dataset_records):
a walk of every file, 0.4-1.1 s per 200,000 files on the 2-core build machine. Taken while
the first host planned, that walk was most of what declaring an ImageNet-sized dataset added
to a run with nothing to do, though nothing about it needs the hosts. So the
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

import atexit
import os
import subprocess
import sys
from pathlib import Path
from weakref import WeakSet

from pyinfra.api.state import StateStage

from labfleet.model import Invalid, datasets

# The directory that holds the labfleet package: the child imports it from there.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
# Listings in progress or done, by source path, for this controller process (None: taken).
_started: dict[str, subprocess.Popen | None] = {}
# The pyinfra states whose run lists ahead.
_waiting: WeakSet = WeakSet()


def list_datasets_ahead() -> None:
    """Start listing every local: source as soon as pyinfra connects (called by the inventory file).

    The inventory file runs before pyinfra has its hosts' group data or its state's callbacks,
    so this leaves a greenlet behind: it first runs when pyinfra starts connecting (the first
    time the CLI yields), before any connection, with the whole inventory loaded.
    """
    import gevent
    from pyinfra.context import ctx_state

    state = ctx_state.get()
    # ./run status reads no listing: it says so, and nothing is walked for it.
    if state is None or state in _waiting or os.environ.get("LABFLEET_LIST_AHEAD") == "0":
        return
    _waiting.add(state)
    gevent.spawn(list_when_connecting, state)


def list_when_connecting(state, tries: int = 1000) -> None:
    """Start the listings of the run's hosts once the state has them (its Connect stage)."""
    import gevent

    for _ in range(tries):
        if state.current_stage >= StateStage.Connect:
            # The hosts pyinfra connects to: the inventory less what --limit leaves out.
            hosts = [host for host in state.inventory if state.is_host_in_limit(host)]
            for source in local_sources(hosts):
                start(source)
            return
        gevent.sleep(0.01)


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
    if not _started:
        atexit.register(stop_untaken)
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
    """The digest a child listed for src (its listing is in the cache), or None: walk it here.

    Either way no child starts for src afterwards: a run whose connections never yield
    (``@local`` alone) plans before the greenlet runs, and a child then would only compete
    with the walk.
    """
    child = _started.get(src)
    _started[src] = None
    if child is None:
        return None
    output, _ = child.communicate()
    digest = output.decode(errors="replace").strip()
    if child.returncode != 0 or not digest.startswith("sha256:"):
        return None
    return digest


def stop_untaken() -> None:
    """Stop the children no planning took (a run that ended before it planned, a command that
    never plans, such as ``pyinfra inventory.py fact``): nothing walks after pyinfra exits."""
    for child in _started.values():
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
