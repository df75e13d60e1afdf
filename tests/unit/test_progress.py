"""Progress lines: their text, their cadence and rate on a fake clock, and what hosts answer."""

from __future__ import annotations

import logging
import subprocess
from types import SimpleNamespace

import gevent
import gevent.event
import pytest
from pyinfra.connectors.util import CommandOutput, OutputLine

from labfleet import progress
from labfleet.progress import Meter, ProgressReader, Reading

MIB = 2**20
GIB = 2**30


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


def test_the_interval_is_30_seconds_unless_the_knob_says_otherwise(monkeypatch):
    monkeypatch.delenv(progress.INTERVAL_ENV, raising=False)
    assert progress.interval_seconds() == 30.0
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.5")
    assert progress.interval_seconds() == 0.5
    for wrong in ("", "soon", "0", "-3"):
        monkeypatch.setenv(progress.INTERVAL_ENV, wrong)
        assert progress.interval_seconds() == 30.0, wrong


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536 * MIB, "1.5 GiB"), (3 * 2**40, "3.0 TiB")],
)
def test_sizes_are_in_binary_units(value, text):
    assert progress.size_text(value) == text


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59.9, "59s"), (125, "2m05s"), (3720, "1h02m")])
def test_durations(seconds, text):
    assert progress.duration_text(seconds) == text


def test_a_bytes_line_says_how_much_of_what_how_fast_and_for_how_long():
    line = progress.format_line("Copy img", "bytes", Reading(GIB, 4 * GIB), 70 * MIB, 30)
    assert line == "Copy img: 1.0 GiB of 4.0 GiB (25%), 70.0 MiB/s, 30s so far"
    assert progress.format_line("Save img", "bytes", Reading(GIB), None, 5) == "Save img: 1.0 GiB, 5s so far"
    # docker save's tar is a little larger than the image size it is measured against.
    assert "(100%)" in progress.format_line("Save img", "bytes", Reading(5 * GIB, 4 * GIB), 0, 5)


def test_layer_step_and_unknown_lines():
    assert (
        progress.format_line("Pull img", "layers", Reading(3, 9), None, 61)
        == "Pull img: 3 of 9 layers done, 1m01s so far"
    )
    assert (
        progress.format_line("Build img", "steps", Reading(5, 12, "RUN pip install"), None, 90)
        == "Build img: step 5 of 12 (RUN pip install), 1m30s so far"
    )
    assert progress.format_line("Load img", "bytes", Reading(None), None, 30) == "Load img: still running, 30s so far"


def test_lines_are_due_every_interval_and_the_rate_is_the_one_since_the_last_reading(clock):
    meter = Meter("Copy img", every=30, clock=clock)
    clock.now += 29
    assert not meter.due()
    clock.now += 1
    assert meter.due()
    assert meter.line(Reading(300 * MIB, GIB)) == "Copy img: 300.0 MiB of 1.0 GiB (29%), 10.0 MiB/s, 30s so far"
    assert not meter.due()
    assert meter.next_line_in() == 30
    clock.now += 30
    assert meter.line(Reading(900 * MIB, GIB)).endswith("(87%), 20.0 MiB/s, 1m00s so far")


def test_a_reading_without_a_count_keeps_the_rate_honest(clock):
    meter = Meter("Load img", every=30, clock=clock)
    clock.now += 30
    meter.line(Reading(30 * MIB, 90 * MIB))
    clock.now += 30
    assert meter.line(Reading(None)) == "Load img: still running, 1m00s so far"
    clock.now += 30
    # 60 MiB since the last count, 60 s ago: 1 MiB/s, not 2.
    assert "1.0 MiB/s" in meter.line(Reading(90 * MIB, 90 * MIB))


def test_a_late_line_does_not_bring_the_next_one_early(clock):
    meter = Meter("Build img", "steps", every=30, clock=clock)
    clock.now += 45  # the question took 15 s
    meter.line(Reading(2, 9))
    assert meter.next_line_in() == 15
    clock.now += 15
    assert meter.due()


def test_a_rate_is_given_for_bytes_only(clock):
    meter = Meter("Pull img", "layers", every=30, clock=clock)
    clock.now += 30
    assert meter.line(Reading(3, 9)) == "Pull img: 3 of 9 layers done, 30s so far"


def read_all(reader: ProgressReader, clock: FakeClock, chunk: int, seconds_per_chunk: float) -> None:
    reader.seek(0)
    while reader.read(chunk):
        clock.now += seconds_per_chunk


def test_a_read_file_prints_a_line_per_interval_while_active(tmp_path, clock, caplog):
    path = tmp_path / "archive.tar.gz"
    path.write_bytes(b"x" * 100 * 1024)
    meter = Meter("Copy img", every=30, clock=clock)
    clock.now += 500  # planned long before it is copied: the count starts at the copy
    reader = ProgressReader(str(path), meter, "[pc01] ")
    with caplog.at_level(logging.INFO, logger="pyinfra"):
        read_all(reader, clock, 10 * 1024, 10)
    assert [record.getMessage() for record in caplog.records] == [
        "[pc01] Copy img: 40.0 KiB of 100.0 KiB (40%), 1.3 KiB/s, 30s so far",
        "[pc01] Copy img: 70.0 KiB of 100.0 KiB (70%), 1.0 KiB/s, 1m00s so far",
        "[pc01] Copy img: 100.0 KiB of 100.0 KiB (100%), 1.0 KiB/s, 1m30s so far",
    ]
    assert reader.done == 100 * 1024
    reader.close()


def test_a_read_file_starts_again_on_a_retry_and_is_quiet_while_inactive(tmp_path, clock, caplog):
    path = tmp_path / "archive.tar.gz"
    path.write_bytes(b"x" * 100 * 1024)
    executing = False
    reader = ProgressReader(str(path), Meter("Copy img", every=30, clock=clock), "[pc01] ", lambda: executing)
    with caplog.at_level(logging.INFO, logger="pyinfra"):
        read_all(reader, clock, 10 * 1024, 10)  # pyinfra comparing the file while it plans
        assert caplog.records == []
        executing = True
        read_all(reader, clock, 10 * 1024, 10)
    assert caplog.records[0].getMessage().startswith("[pc01] Copy img: 40.0 KiB of 100.0 KiB (40%)")
    reader.close()


def test_the_offset_answer():
    assert progress.read_offset_answer("1048576 4194304\n") == Reading(MIB, 4 * MIB)
    assert progress.read_offset_answer("all 4194304\n") == Reading(4 * MIB, 4 * MIB, progress.LOADING)
    assert progress.read_offset_answer("") == Reading(None)  # the loader has not started, or has ended
    assert progress.read_offset_answer(" 4194304\n") == Reading(None)


def test_a_loader_that_has_read_everything_says_what_it_waits_for():
    line = progress.format_line("Load img", "bytes", Reading(GIB, GIB, progress.LOADING), 0, 40)
    assert line == f"Load img: 1.0 GiB of 1.0 GiB (100%), {progress.LOADING}, 40s so far"


def ask_about_a_reader(tmp_path, python: str) -> str:
    """The question in a real shell, asked of a real reader: a python3 that reads some of its
    stdin (the archive), says so, and waits to be killed."""
    archive = tmp_path / "archive.tar"
    archive.write_bytes(b"x" * 20000)
    pid_file = tmp_path / "archive.tar.pid"
    script = f"import os, signal; {python}; print(1, flush=True); signal.pause()"
    reader = subprocess.Popen(
        ["sh", "-c", f'echo $$ >"$0"; exec python3 -c "{script}"', str(pid_file)],
        stdin=archive.open("rb"),
        stdout=subprocess.PIPE,
    )
    try:
        assert reader.stdout is not None
        reader.stdout.readline()
        question = progress.read_offset_question(str(archive), str(pid_file))
        return subprocess.run(["sh", "-c", question], capture_output=True, text=True, check=True).stdout
    finally:
        reader.kill()
        reader.wait()


def test_the_offset_question_reads_how_far_a_process_read_its_stdin(tmp_path):
    assert progress.read_offset_answer(ask_about_a_reader(tmp_path, "os.read(0, 5000)")) == Reading(5000, 20000)


def test_the_offset_question_knows_a_reader_that_closed_its_stdin_has_read_it_all(tmp_path):
    answer = progress.read_offset_answer(ask_about_a_reader(tmp_path, "os.close(0)"))
    assert answer == Reading(20000, 20000, progress.LOADING)


LEGACY_BUILD = """\
Sending build context to Docker daemon  52.22kB
Step 1/14 : ARG BASE_IMAGE=ubuntu:24.04
Step 7/14 : RUN sh /tmp/labfleet/install-profile.sh "$PROFILE" "$CUDA" && rm -rf /tmp/labfleet
"""
BUILDKIT_BUILD = """\
#4 [internal] load metadata for labfleet-test/debian:trixie
#9 [stage-1 3/11] RUN set -eux;     if command -v update-ca-certificates >/dev/null; then update-ca-certificates; fi;
"""


def test_the_build_answer_names_the_step_for_either_builder():
    assert progress.build_step_answer(LEGACY_BUILD) == Reading(
        7, 14, 'RUN sh /tmp/labfleet/install-profile.sh "$PROFILE" "$CUDA" && rm -rf /tmp/labfleet'[:57] + "..."
    )
    answer = progress.build_step_answer(BUILDKIT_BUILD)
    assert (answer.done, answer.total) == (3, 11)
    assert answer.detail.startswith("RUN set -eux; if command -v") and len(answer.detail) == progress.DETAIL_CHARS
    assert progress.build_step_answer("#4 [internal] load build definition\n") == Reading(None)


PULL = """\
jupyter-0123456789ab: Pulling from labfleet/jupyterlab
8f3b5c1e9a7d: Already exists
4f4fb700ef54: Pulling fs layer
0a1b2c3d4e5f: Pulling fs layer
4f4fb700ef54: Verifying Checksum
4f4fb700ef54: Download complete
4f4fb700ef54: Pull complete
"""
PUSH = """\
The push refers to repository [127.0.0.1:5000/labfleet/jupyterlab]
5f70bf18a086: Preparing
a1b2c3d4e5f6: Preparing
9c8b7a6f5e4d: Preparing
5f70bf18a086: Layer already exists
a1b2c3d4e5f6: Pushed
"""


def test_the_layer_answer_counts_layers_done_of_those_named():
    assert progress.layers_answer(PULL) == Reading(2, 3)
    assert progress.layers_answer(PUSH) == Reading(2, 3)
    assert progress.layers_answer("Using default tag: latest\n") == Reading(None)


class SlowHost:
    """A host whose long command ends after its second progress question."""

    name = "pc01"
    print_prefix = "[pc01] "

    def __init__(self) -> None:
        self.finished = gevent.event.Event()
        self.questions: list[tuple[str, dict]] = []

    def run_shell_command(self, command, print_output=False, print_input=False, **arguments):
        if str(command).startswith("cat "):
            self.questions.append((str(command), arguments))
            if len(self.questions) == 2:
                self.finished.set()
            return True, CommandOutput([OutputLine("stdout", PUSH)])
        self.finished.wait()
        return True, CommandOutput([OutputLine("stdout", "pushed")])


def test_a_watched_command_asks_while_it_runs_and_returns_the_command_s_own_result(monkeypatch, caplog):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.01")
    host = SlowHost()
    command = progress.WatchedCommand(
        "docker push img", "Push img", "layers", progress.layers_question("log"), progress.layers_answer
    )
    state = SimpleNamespace(print_output=False, print_input=False)
    with caplog.at_level(logging.INFO, logger="pyinfra"):
        status, output = command.execute(state, host, {"_sudo": True, "_timeout": 5, "_success_exit_codes": [0]})
    assert (status, output.stdout) == (True, "pushed")
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert all(line.startswith("[pc01] Push img: 2 of 3 layers done, ") for line in lines)
    # The question runs as the command does (sudo), without the command's own limits.
    assert host.questions[0][1] == {"_sudo": True}


def test_a_failing_question_does_not_fail_the_work(monkeypatch, caplog):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.01")
    host = SlowHost()

    def broken(command, **arguments):
        if str(command).startswith("cat "):
            host.questions.append((str(command), arguments))
            if len(host.questions) == 2:
                host.finished.set()
            raise OSError("channel closed")
        host.finished.wait()
        return True, CommandOutput([])

    host.run_shell_command = broken  # type: ignore[method-assign,assignment]
    command = progress.WatchedCommand("work", "Load img", "bytes", "cat pid", progress.read_offset_answer)
    with caplog.at_level(logging.INFO, logger="pyinfra"):
        status, _ = command.execute(SimpleNamespace(print_output=False, print_input=False), host, {})
    assert status is True
    assert next(r.getMessage() for r in caplog.records if r.levelno == logging.INFO).startswith(
        "[pc01] Load img: still running, "
    )


def test_work_on_the_controller_is_reported_from_its_output_so_far(monkeypatch, caplog, tmp_path):
    """A real command that prints two build steps and waits until a line has reported the second."""
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.01")
    gate = tmp_path / "gate"

    def answer(text: str) -> Reading:
        if "Step 2/3" in text:
            gate.touch()
        return progress.build_step_answer(text)

    script = f'echo "Step 1/3 : FROM base"; echo "Step 2/3 : RUN make"; while [ ! -e {gate} ]; do sleep 0.01; done'
    with caplog.at_level(logging.INFO, logger="pyinfra"):
        returncode, output = progress.run_on_controller(["sh", "-c", script], "Build img", "steps", answer)
    assert (returncode, output) == (0, "Step 1/3 : FROM base\nStep 2/3 : RUN make\n")
    lines = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("[controller] Build img: step 2 of 3 (RUN make), ") for line in lines), lines


def test_work_on_the_controller_past_its_timeout_is_killed(monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "30")
    with pytest.raises(subprocess.TimeoutExpired):
        progress.run_on_controller(["sleep", "30"], "Push img", "layers", progress.layers_answer, timeout=0.05)


def test_the_offset_question_knows_a_decompressor_that_ended_has_read_it_all(tmp_path):
    # A zstd archive is read by the decompressor, which ends before the engine has loaded it.
    pid_file = tmp_path / "archive.tar.zst.pid"
    pid_file.write_text("999999999\n")  # no such process any more
    question = progress.read_offset_question(str(tmp_path / "gone.tar.zst"), str(pid_file), size=20000)
    answer = subprocess.run(["sh", "-c", question], capture_output=True, text=True, check=True).stdout
    assert progress.read_offset_answer(answer) == Reading(20000, 20000, progress.LOADING)
