"""Progress lines for long work, so that a first deploy that moves gigabytes does not look hung.

pyinfra prints a command's output when the command ends (live only with -vvv, and then all
of it), so a build, a save, a copy, a load or a pull of several GB says nothing for minutes.
labfleet prints one line per host every LABFLEET_PROGRESS_SECONDS (30 s) while such work runs:

    [lab-pc-3] Copy labfleet/jupyterlab:pytorch-1a2b3c4d5e6f: 2.1 GiB of 5.3 GiB (39%), 71.3 MiB/s, 30s so far

Where the controller moves the bytes (`docker save` into the archive, the copy to each host),
it counts them as they pass (ProgressReader). Where the host does the work (a build, a load, a
pull or push), the command runs as a WatchedCommand: while it runs, the controller asks the
host how far it got with a short second command on the same connection (the archive's read
offset, the builder's last step, the layers done) and prints what the answer says. Each line
goes through pyinfra's logger with the host's prefix, as pyinfra's own lines do, so a line never
lands inside another (pyinfra's spinner clears its line before any log line). Nothing is
printed for work shorter than the interval, so a no-change run prints no progress at all.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Literal

import gevent
from pyinfra import logger
from pyinfra.api import StringCommand

# How often a line is printed; tests make it shorter (an internal knob, not a setting).
INTERVAL_ENV = "LABFLEET_PROGRESS_SECONDS"
DEFAULT_INTERVAL_S = 30.0
CONTROLLER = "controller"
Unit = Literal["bytes", "layers", "steps"]
# Connector arguments that belong to the long command alone, not to the short question beside it.
_COMMAND_ONLY = ("_stdin", "_timeout", "_success_exit_codes", "_get_pty")


def interval_seconds() -> float:
    """Seconds between two lines of one piece of work (LABFLEET_PROGRESS_SECONDS, default 30)."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, ""))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value > 0 else DEFAULT_INTERVAL_S


@dataclass(frozen=True)
class Reading:
    """How far a piece of work got: done of total units (None where unknown), and what it does now."""

    done: int | None
    total: int | None = None
    detail: str = ""


def size_text(value: float) -> str:
    """Bytes in binary units, one decimal: 512 B, 12.0 KiB, 2.1 GiB."""
    if value < 1024:
        return f"{value:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def duration_text(seconds: float) -> str:
    """45s, 2m05s, 1h02m."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_line(what: str, unit: Unit, reading: Reading, rate: float | None, elapsed: float) -> str:
    """One progress line, without the host prefix: what, how far, how fast, for how long."""
    done, total = reading.done, reading.total
    if done is None:
        parts = ["still running"]
    elif unit == "bytes":
        amount = size_text(done)
        if total:
            amount += f" of {size_text(total)} ({min(done * 100 // total, 100)}%)"
        # A detail says what the work does once no bytes move; a rate would then only fall.
        if reading.detail:
            parts = [amount, reading.detail]
        else:
            parts = [amount] + ([f"{size_text(rate)}/s"] if rate is not None else [])
    elif unit == "layers":
        parts = [f"{done} of {total} layers done" if total else f"{done} layers done"]
    else:
        parts = [f"step {done} of {total}" if total else f"step {done}"]
        if reading.detail:
            parts[0] += f" ({reading.detail})"
    return f"{what}: {', '.join(parts)}, {duration_text(elapsed)} so far"


class Meter:
    """One piece of long work: when its next line is due, and its rate since the line before.

    + what: the step as the line names it, e.g. "Copy labfleet/jupyterlab:jupyter-1a2b"
    + unit: what done and total count; a rate is given for bytes only
    + every: seconds between lines (default: interval_seconds())
    + clock: monotonic seconds (tests pass a fake one)
    """

    def __init__(self, what: str, unit: Unit = "bytes", every: float | None = None, clock=time.monotonic) -> None:
        self.what = what
        self.unit: Unit = unit
        self.every = interval_seconds() if every is None else every
        self.clock = clock
        self.restart()

    def restart(self) -> None:
        """Count from now: the work (re)starts."""
        self.started = self.clock()
        self.lines = 0
        self._sampled: tuple[float, int] = (self.started, 0)

    def next_line_in(self) -> float:
        """Seconds until the next line is due: lines keep the cadence, however long a reading took."""
        return max(0.0, self.started + (self.lines + 1) * self.every - self.clock())

    def due(self) -> bool:
        return self.next_line_in() == 0.0

    def line(self, reading: Reading) -> str:
        """The line for this reading; the rate is the one since the last reading that had a count."""
        now = self.clock()
        rate = None
        if reading.done is not None:
            since, before = self._sampled
            if self.unit == "bytes" and now > since:
                rate = max(reading.done - before, 0) / (now - since)
            self._sampled = (now, reading.done)
        # A line that comes late (a slow reading) does not make the next ones come early.
        self.lines = max(self.lines + 1, int((now - self.started) // self.every))
        return format_line(self.what, self.unit, reading, rate, now - self.started)


def report(prefix: str, text: str) -> None:
    """Print one line the way pyinfra prints its own (prefix: host.print_prefix, or controller_prefix())."""
    logger.info(f"{prefix}{text}")


def controller_prefix() -> str:
    return f"[{CONTROLLER}] "


class ProgressReader:
    """A binary file that prints a progress line as it is read, for work the controller drives.

    + path: the file (its size is the total)
    + meter: the work's Meter
    + prefix: whose line it is (host.print_prefix, or controller_prefix())
    + active: whether lines are printed now (pyinfra may also read a source to compare it, at planning)

    The file is opened at the first read or seek (pyinfra plans every host before it copies to
    any), and seeking to the start (an upload begins, or is retried) starts the count again.
    """

    def __init__(self, path: str, meter: Meter, prefix: str, active: Callable[[], bool] = lambda: True) -> None:
        self.path = path
        self.meter = meter
        self.prefix = prefix
        self.active = active
        self.total = os.path.getsize(path)
        self.done = 0
        self._file: BinaryIO | None = None

    def _opened(self) -> BinaryIO:
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115  # held as long as pyinfra holds the reader
        return self._file

    def read(self, size: int = -1) -> bytes:
        data = self._opened().read(size)
        self.done += len(data)
        if data and self.active() and self.meter.due():
            report(self.prefix, self.meter.line(Reading(self.done, self.total)))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self._opened().seek(offset, whence)
        if position == 0:
            self.meter.restart()
        self.done = position
        return position

    def tell(self) -> int:
        return self._opened().tell()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"ProgressReader({self.path})"


class WatchedCommand(StringCommand):
    """A long shell command on a host whose progress the controller asks for while it runs.

    + command: the shell command
    + what: the step as the lines name it
    + unit: what the readings count
    + question: a short shell command that prints how far the work got; it must always exit 0
    + answer: turns the question's stdout into a Reading

    The question runs with the command's own sudo and environment, on the same connection.
    """

    def __init__(self, command: str, what: str, unit: Unit, question: str, answer: Callable[[str], Reading]) -> None:
        super().__init__(command)
        self.what = what
        self.unit: Unit = unit
        self.question = question
        self.answer = answer

    def execute(self, state, host, connector_arguments):
        work = gevent.spawn(super().execute, state, host, dict(connector_arguments))
        arguments = {key: value for key, value in connector_arguments.items() if key not in _COMMAND_ONLY}
        arguments.update(self.connector_arguments)
        meter = Meter(self.what, self.unit)
        while True:
            work.join(timeout=meter.next_line_in())
            if work.ready():
                return work.get()
            report(host.print_prefix, meter.line(self._ask(host, arguments)))

    def _ask(self, host, arguments) -> Reading:
        try:
            asked, output = host.run_shell_command(StringCommand(self.question), **arguments)
        except Exception as error:  # a question that fails must not fail the work it asks about
            logger.debug(f"{host.name}: progress question failed: {error}")
            return Reading(None)
        return self.answer(output.stdout) if asked else Reading(None)


def run_on_controller(
    argv: list[str],
    what: str,
    unit: Unit,
    answer: Callable[[str], Reading],
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> tuple[int, str]:
    """Run argv on the controller and return its exit status and output (stdout and stderr),
    printing a line every interval from what its output says so far.

    + argv: the command
    + what: the step as the lines name it
    + unit: what the readings count
    + answer: turns the output so far into a Reading
    + env: the command's environment (default: this process's)
    + timeout: seconds before the command is killed and subprocess.TimeoutExpired raised
    """
    meter = Meter(what, unit)
    output: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as process:
        assert process.stdout is not None  # stdout=PIPE
        reader = threading.Thread(target=output.extend, args=(process.stdout,), daemon=True)
        reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = meter.next_line_in()
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() >= deadline:
                    process.kill()
                    raise
                report(controller_prefix(), meter.line(answer("".join(output))))
        reader.join()
    return process.returncode, "".join(output)


# --- What the hosts answer -------------------------------------------------------------


def read_offset_question(archive: str, pid_file: str, size: int | None = None) -> str:
    """How far the process whose pid is in pid_file has read its stdin, and the archive's size
    (size, where the archive is removed once open).

    `docker load` closes its stdin once it has sent the whole archive and then waits for the
    engine to load the layers: a live process without its stdin has read everything, and so
    has a decompressor that has ended while the load goes on (the pid file lasts as long as it).
    """
    measured = f"{size}" if size is not None else f"$(stat -c %s {archive} 2>/dev/null)"
    return (
        f"size={measured}; pid=$(cat {pid_file} 2>/dev/null); "
        "pos=$(sed -n 's/^pos:[[:space:]]*//p' /proc/$pid/fdinfo/0 2>/dev/null); "
        'if [ -n "$pos" ]; then echo "$pos $size"; elif [ -n "$pid" ]; then echo "all $size"; fi; '
        "true"
    )


LOADING = "all read, the engine loads the layers"


def read_offset_answer(text: str) -> Reading:
    """`<offset> <size>`, or `all <size>` once the whole file is read; nothing before the reader starts."""
    words = text.split()
    if len(words) == 2 and words[1].isdigit():
        if words[0].isdigit():
            return Reading(int(words[0]), int(words[1]))
        if words[0] == "all":
            return Reading(int(words[1]), int(words[1]), LOADING)
    return Reading(None)


# Legacy builder: "Step 5/12 : RUN ..."; BuildKit (plain progress): "#8 [stage-1 5/12] RUN ...".
_BUILD_STEP = re.compile(r"^(?:Step (\d+)/(\d+) : |#\d+ \[(?:[^\]]*\s)?(\d+)/(\d+)\] )(.*)$")
DETAIL_CHARS = 60


def build_step_question(log: str) -> str:
    return f"grep -aE '^(Step [0-9]+/[0-9]+ : |#[0-9]+ \\[)' {log} 2>/dev/null | tail -n 1; true"


def build_step_answer(text: str) -> Reading:
    """The step the builder is on, from its last step line."""
    for line in reversed(text.splitlines()):
        match = _BUILD_STEP.match(line.strip())
        if match:
            step, total = (match[1], match[2]) if match[1] else (match[3], match[4])
            detail = " ".join(match[5].split())
            if len(detail) > DETAIL_CHARS:
                detail = detail[: DETAIL_CHARS - 3] + "..."
            return Reading(int(step), int(total), detail)
    return Reading(None)


_LAYER_LINE = re.compile(r"^([0-9a-f]{12}): (.+)$")
_LAYER_DONE = ("Pull complete", "Already exists", "Pushed", "Layer already exists", "Mounted from")


def layers_question(log: str) -> str:
    return f"cat {log} 2>/dev/null; true"


def layers_answer(text: str) -> Reading:
    """Layers done of the layers named so far, from `docker pull` or `docker push` output without a terminal."""
    seen: set[str] = set()
    done: set[str] = set()
    for line in text.splitlines():
        match = _LAYER_LINE.match(line.strip())
        if not match:
            continue
        seen.add(match[1])
        if match[2].startswith(_LAYER_DONE):
            done.add(match[1])
    return Reading(len(done), len(seen)) if seen else Reading(None)
