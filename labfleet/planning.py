"""Planning: the one batched read per host, and the one way to skip an operation it shows current.

pyinfra 3 keeps no fact cache, and every fact a step reads costs a round trip to the host.
So each step declares the facts it decides from by name (``reads(settings)``, a mapping of
field name to ``Read``), deploy.py asks for all steps' reads at once (``read_ahead``), and
one command per host (``FactBatch``) answers them while pyinfra plans. Each step then turns
its readings into its own typed snapshot (a frozen dataclass whose fields are the names it
declared), with ``snapshot(StateClass, reads(settings))``.

A reading taken while planning is what the host was when the run began: pyinfra plans every
operation before running any. An operation that the snapshot shows has nothing to do is
planned through ``unless_current``: not planned at all while nothing before it on this host
may have changed anything, and otherwise planned so that, when it runs, it reads the host
again only if an earlier operation of this run changed the host. Operations themselves stay
plain pyinfra operations: they read their facts with ``host.get_fact`` and yield the
difference.

Everything that lives for one run (the readings, the count of operations shown current,
the controller's shared work such as the image archives) is held by one ``Run`` per pyinfra
``State``, never by module globals of the steps.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast
from weakref import WeakKeyDictionary

from pyinfra import host
from pyinfra.api import FactBase, deploy
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.host import Host
from pyinfra.api.state import State

T = TypeVar("T")
P = ParamSpec("P")


def step(title: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """pyinfra's ``@deploy(title)``, typed as the function it wraps.

    pyinfra types a deploy as an operation, whose call signature a type checker cannot match
    with a step's own arguments; at run time this is ``deploy`` itself.
    """
    return cast(Callable[[Callable[P, T]], Callable[P, T]], deploy(title))


@dataclass(frozen=True)
class Read:
    """One fact a step decides from: the fact class and its arguments.

    **Example:**

    .. code:: python

        def reads(settings):
            return {"packages": Read(DebPackages), "daemon_json": Read(DaemonJson, {"path": DAEMON_JSON})}
    """

    fact: type[FactBase]
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return (self.fact, repr(sorted(self.kwargs.items())))


class FactBatch(FactBase):
    """Several facts in one command, so one round trip per host instead of one per fact.

    + parts: ``((FactClass, {kwargs}), ...)``

    Returns a list with each part's value, parsed by that fact's own ``process`` (its
    ``default()`` when the part printed nothing).

    **Example:**

    .. code:: python

        packages, arch = host.get_fact(FactBatch, parts=((DebPackages, {}), (DebArch, {})))
    """

    MARK = "--labfleet-fact-batch--"

    def command(self, parts) -> str:
        # The parts run in parallel, each into its own file after its marker, and one `cat`
        # prints them in order: every program started costs the host a fork and an exec.
        self.parts = [(fact_class(), dict(kwargs)) for fact_class, kwargs in parts]
        started = " ".join(
            f'( echo {self.MARK}; {fact.command(**kwargs)} ) >"$d/{index}" 2>/dev/null &'
            for index, (fact, kwargs) in enumerate(self.parts)
        )
        files = " ".join(f'"$d/{index}"' for index in range(len(self.parts)))
        return f'd=$(mktemp -d) || exit 1; {started} wait; cat {files}; rm -rf "$d"'

    def process(self, output):
        sections: list[list[str]] = []
        for line in output:
            if line.rstrip().endswith(self.MARK):
                # A part whose output has no final newline shares its last line with the mark.
                rest = line.rstrip()[: -len(self.MARK)]
                if rest and sections:
                    sections[-1].append(rest)
                sections.append([])
            elif sections:
                sections[-1].append(line)
        values = []
        for index, (fact, _) in enumerate(self.parts):
            lines = sections[index] if index < len(sections) else []
            values.append(fact.process(lines) if lines else fact.default())
        return values


class Parts(tuple):
    """FactBatch's parts, named briefly: pyinfra prints a failed fact's arguments with str()."""

    def __str__(self) -> str:
        return f"<{len(self)} facts>"


@dataclass
class HostRun:
    """What one host's planning has read and decided so far in this run."""

    readings: dict[tuple, Any] = field(default_factory=dict)
    # Operations planned that the snapshot showed current (see unless_current).
    current_ops: int = 0


@dataclass
class Run:
    """State that lives for one pyinfra run: per host, and the controller's shared work.

    ``shared`` holds the controller's work that several hosts' steps reuse (an image archive
    made once, a push done once), keyed by its owner; ``lock`` serialises making it, since
    pyinfra plans hosts in parallel greenlets and executes them in threads.
    """

    hosts: dict[str, HostRun] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def for_host(self, name: str) -> HostRun:
        return self.hosts.setdefault(name, HostRun())

    def once(self, key: str, make: Callable[[], T]) -> T:
        """``make()`` the first time key is asked for in this run, the same value afterwards."""
        with self.lock:
            if key not in self.shared:
                self.shared[key] = make()
            return self.shared[key]


_runs: WeakKeyDictionary[State, Run] = WeakKeyDictionary()


def current_run() -> Run:
    """The Run of the pyinfra run in progress (one per pyinfra State)."""
    return _runs.setdefault(host.state, Run())


def _this_host() -> HostRun:
    return current_run().for_host(host.name)


def _real_host() -> Host:
    return host.state.inventory.get_host(host.name)


def read_ahead(*steps_reads: Mapping[str, Read]) -> None:
    """Read, in one round trip, what the given steps will decide from (deploy.py calls it first).

    Readings already taken in this run are not taken again. While executing (a step planned
    by another operation), nothing is read ahead: each step reads fresh.
    """
    if host.state.is_executing:
        return
    readings = _this_host().readings
    wanted: dict[tuple, Read] = {}
    for reads in steps_reads:
        for one in reads.values():
            if one.key not in readings:
                wanted.setdefault(one.key, one)
    if not wanted:
        return
    missing = list(wanted.values())
    values = [host.get_fact(missing[0].fact, **missing[0].kwargs)] if len(missing) == 1 else _batched(missing)
    for one, value in zip(missing, values, strict=True):
        readings[one.key] = value


class _HostOutput(logging.Filter):
    """Holds back what pyinfra logs for one host while the batch runs, to say it in one line."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        self.records.append(record)
        return False

    @property
    def lines(self) -> list[str]:
        """What was held back, without the host prefix and the terminal colours."""
        return [re.sub(r"\x1b\[[0-9;]*m", "", r.getMessage()[len(self.prefix) :]).strip() for r in self.records]


def _batched(missing: list[Read]) -> list:
    parts = Parts((one.fact, dict(one.kwargs)) for one in missing)
    logger = logging.getLogger("pyinfra")
    held = _HostOutput(host.print_prefix)
    logger.addFilter(held)
    try:
        values = host.get_fact(FactBatch, parts=parts)
    except PyinfraError:
        # pyinfra stops the run when this was the last host standing ("No hosts remaining"):
        # the line above says why, so the run ends without a pointer into this file.
        logger.removeFilter(held)
        logger.error(f"{host.print_prefix}{read_failure(host.name, held.lines)}")
        raise SystemExit(1) from None
    logger.removeFilter(held)
    if values is not None and _real_host() not in host.state.failed_hosts:
        for record in held.records:
            logger.handle(record)
        return values
    logger.error(f"{host.print_prefix}{read_failure(host.name, held.lines)}")
    # The host is failed and runs nothing; the steps plan against an empty host meanwhile.
    return [one.fact().default() for one in missing]


def read_failure(host_name: str, output: list[str]) -> str:
    """One line that says why a host could not be read, and what to do.

    + output: what the failed command printed (pyinfra's own "could not load fact" line is
      left out: it names the fact, not the cause)

    The common causes on a fresh workstation are a missing sudo and sudo asking for a password.
    """
    said = [line for line in output if line and not line.startswith(("Error: could not load fact", "Error:"))]
    detail = said[0] if said else "the command failed and printed nothing"
    if "sudo: not found" in detail or "sudo: command not found" in detail:
        advice = "sudo is not installed there; install it (apt-get install sudo) or connect as root"
    elif "password is required" in detail or "a terminal is required" in detail:
        advice = "sudo asks for a password; allow the SSH user passwordless sudo, or pass --sudo-password"
    else:
        advice = "check that the SSH user can run commands there with sudo"
    return f"host {host_name}: could not read the host's state: {detail}; {advice}"


def read(reads: Mapping[str, Read]) -> dict[str, Any]:
    """The readings a step declared, by name: taken once per host and run while planning
    (with ``read_ahead``'s batch), fresh while executing."""
    if host.state.is_executing:
        return {name: host.get_fact(one.fact, **one.kwargs) for name, one in reads.items()}
    read_ahead(reads)
    readings = _this_host().readings
    return {name: readings[one.key] for name, one in reads.items()}


def snapshot(state_class: Callable[..., T], reads: Mapping[str, Read]) -> T:
    """A step's typed snapshot: ``state_class(**read(reads))``."""
    return state_class(**read(reads))


def changed_in_this_run() -> bool:
    """Whether an operation has run a command on this host so far in this run."""
    ops = host.state.ops.get(_real_host(), {})
    return any(data.operation_meta.executed for data in ops.values())


def _planned_count() -> int:
    return host.state.get_meta_for_host(_real_host()).ops


def unless_current(operation: Callable[..., T], current: bool, **kwargs) -> T | None:
    """Plan ``operation(**kwargs)`` unless the snapshot shows it current and nothing before it may change the host.

    + operation: a pyinfra operation
    + current: whether the snapshot shows that the operation has nothing to do
    + kwargs: the operation's arguments (``name=`` included)

    pyinfra spends milliseconds of the controller's CPU on every operation it plans, per
    host: on a fleet, most of a no-change run. So an operation shown current is not planned
    at all while every operation planned before it on this host was shown current too:
    nothing can have changed what planning read. Once an operation that may change the host
    is planned, every later one is planned, and one shown current reads nothing from the
    host when it runs unless this run changed the host first; then it checks, as it always
    does. Returns the operation's result, or None when it was not planned.

    **Example:**

    .. code:: python

        unless_current(files.directory, current=state.directory_ok, name="Workspace", path=path)
    """
    if host.state.is_executing:
        return operation(**kwargs)
    mine = _this_host()
    if current and _planned_count() == mine.current_ops:
        return None
    if current:
        mine.current_ops += 1
    return operation(**kwargs, _if=lambda: not current or changed_in_this_run())


def notice(operation: Callable[..., T], **kwargs) -> T:
    """Plan an operation that only tells a person something: it makes no later operation worth planning."""
    result = operation(**kwargs)
    if not host.state.is_executing:
        _this_host().current_ops += 1
    return result
