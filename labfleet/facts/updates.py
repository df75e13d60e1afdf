"""Facts about updates that wait for idle work (labfleet.updates)."""

from __future__ import annotations

import shlex
from typing import TypedDict

from pyinfra.api import FactBase

UPDATES_DIR = "/opt/labfleet/updates"
BUSY_SCRIPT = f"{UPDATES_DIR}/labfleet-busy"


class BusyState(TypedDict):
    checked: bool  # False: the check script is not on the host yet
    busy: bool
    reasons: list[str]  # what keeps the container busy (the script's "busy:" lines)
    notes: list[str]  # what the script could not tell


def busy_command(container: str, idle_seconds: int) -> str:
    """Run the host's busy check; always exits 0, its verdict is the last line (``exit N``)."""
    script = shlex.quote(BUSY_SCRIPT)
    return (
        f"[ -x {script} ] || {{ echo unchecked; exit 0; }}; "
        f'{script} {shlex.quote(container)} {int(idle_seconds)} 2>&1; echo "exit $?"'
    )


def parse_busy(output) -> BusyState:
    """What the busy script printed: its ``busy:`` and ``note:`` lines and its exit status."""
    state = BusyState(checked=False, busy=False, reasons=[], notes=[])
    status = None
    for line in output:
        line = line.strip()
        if line.startswith("busy: "):
            state["reasons"].append(line[6:])
        elif line.startswith("note: "):
            state["notes"].append(line[6:])
        elif line.startswith("exit ") and line[5:].isdigit():
            status = int(line[5:])
        elif line and line != "unchecked":
            state["notes"].append(line)  # a docker error, a traceback's last words
    if status is None:
        return state
    state["checked"] = True
    # Anything but "idle" (0) defers: a check that failed cannot promise that nothing runs.
    state["busy"] = status != 0
    if state["busy"] and not state["reasons"]:
        state["reasons"].append("the busy check failed: " + ("; ".join(state["notes"]) or f"exit {status}"))
    return state


class ContainerBusy(FactBase[BusyState]):
    """What keeps a JupyterLab container busy: its kernels, terminals and GPU processes.

    + container: the container's name
    + idle_seconds: how long a kernel must have been quiet to count as idle

    Returns ``{"checked", "busy", "reasons", "notes"}``; ``checked`` is False where the
    check script is not installed yet.
    """

    @staticmethod
    def default() -> BusyState:
        return BusyState(checked=False, busy=False, reasons=[], notes=[])

    def command(self, container: str, idle_seconds: int) -> str:
        return busy_command(container, idle_seconds)

    def process(self, output):
        return parse_busy(output)


class PendingState(TypedDict):
    armed: bool  # the update timer is enabled: an update waits
    busy: BusyState  # checked only while armed


class PendingUpdate(FactBase[PendingState]):
    """Whether an update waits for this user's container (its timer is armed), and why.

    + timer: the update timer unit
    + container: the container's name
    + idle_seconds: the idle window

    The busy check runs only while the timer is armed, so reading this costs nothing else
    on a host without a pending update.
    """

    @staticmethod
    def default() -> PendingState:
        return PendingState(armed=False, busy=ContainerBusy.default())

    def command(self, timer: str, container: str, idle_seconds: int) -> str:
        return f"systemctl is-enabled --quiet {shlex.quote(timer)} 2>/dev/null || exit 0; echo armed; " + busy_command(
            container, idle_seconds
        )

    def process(self, output):
        armed = bool(output) and output[0].strip() == "armed"
        return PendingState(armed=armed, busy=parse_busy(output[1:] if armed else []))


class TimersArmed(FactBase[dict[str, bool]]):
    """Which of some systemd timers are enabled (armed): ``{timer: bool}``.

    + timers: the timer units
    """

    @staticmethod
    def default() -> dict[str, bool]:
        return {}

    def command(self, timers: tuple[str, ...]) -> str:
        self.timers = timers
        checks = [
            f"systemctl is-enabled --quiet {shlex.quote(timer)} 2>/dev/null && echo armed {shlex.quote(timer)}"
            for timer in timers
        ]
        return "; ".join([*checks, "true"])

    def process(self, output):
        armed = {line.split(" ", 1)[1].strip() for line in output if line.startswith("armed ")}
        return {timer: timer in armed for timer in getattr(self, "timers", sorted(armed))}
