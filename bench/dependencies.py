"""Checked before a benchmark measures anything: a missing module found after twenty minutes of
measuring throws those minutes away (the report step used to die importing matplotlib)."""

from __future__ import annotations

import importlib

# module -> what needs it; all of them are in requirements-bench.txt.
REPORT_MODULES = {"matplotlib": "the results plot (bench/report.py)"}


def require(modules: dict[str, str]) -> None:
    """Exit with one line per missing module, naming what needs it and how to install it."""
    missing = []
    for module, needed_for in modules.items():
        try:
            importlib.import_module(module)
        except ImportError as error:
            missing.append(f"bench: {module} is missing ({error}); {needed_for} needs it.")
    if missing:
        raise SystemExit(
            "\n".join(missing)
            + "\nRun the benchmarks with `./run bench`, which installs requirements-bench.txt into .venv first."
        )
