"""What one `python -m bench` run measured, and its raw record, bench/results.json.

Kept apart from the measuring (bench/run.py) and the rendering (bench/report.py) so that each
of them imports this module and neither imports the other's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS_JSON = "results.json"


@dataclass
class Measurements:
    """Everything one benchmark run measured, in the shape results.json keeps."""

    no_change: dict = field(default_factory=dict)  # size -> {"deploy": [s], "floor": [s], "baseline": [s]}
    memory_kb: dict = field(default_factory=dict)  # size -> {"deploy": [kb], "floor": [kb], "baseline": [kb]}
    cpu_s: dict = field(default_factory=dict)  # size -> {"deploy": [s], ...}: the pyinfra process's user+sys
    round_trips: dict = field(default_factory=dict)  # size -> {"deploy": per host, "floor": ..., "baseline": ...}
    round_trip_commands: dict = field(default_factory=dict)  # deploy -> {command head: count} on one host
    provision: dict = field(default_factory=dict)  # size -> [s]
    bare_provision: dict = field(default_factory=dict)  # size -> [s]
    # The same no-change measure on converged hosts with the stand-in NVIDIA toolkit and gpu: true.
    gpu_no_change: dict = field(default_factory=dict)  # size -> {"deploy": [s], "floor": [s], "baseline": [s]}
    gpu_round_trips: dict = field(default_factory=dict)  # size -> {"deploy": per host, "floor": ...}
    gpu_round_trip_commands: dict = field(default_factory=dict)  # deploy -> {command head: count} on one host


def save(found: Measurements, info: dict, output: Path) -> Path:
    """Write results.json under output first, so a failing plot or report loses no figures."""
    output.mkdir(parents=True, exist_ok=True)
    document = {"machine": info, **{key: _jsonable(value) for key, value in asdict(found).items()}}
    path = output / RESULTS_JSON
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def load(path: Path) -> tuple[Measurements, dict]:
    """The measurements and machine description that save() wrote to path."""
    document = json.loads(path.read_text())
    info = document.pop("machine")
    commands = document.pop("round_trip_commands", {})
    gpu_commands = document.pop("gpu_round_trip_commands", {})
    sized = {key: {int(size): value for size, value in sizes.items()} for key, sizes in document.items()}
    return Measurements(round_trip_commands=commands, gpu_round_trip_commands=gpu_commands, **sized), info


def _jsonable(value):
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return value
