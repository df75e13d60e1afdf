"""A throwaway deploy for the harness self-test: idempotent built-in operations only."""

from pathlib import Path

from pyinfra.operations import files

HERE = Path(__file__).resolve().parent

files.directory(
    name="Create the harness directory",
    path="/opt/labfleet-harness",
    mode="0755",
)

files.put(
    name="Upload the harness file",
    src=str(HERE / "files" / "motd.txt"),
    dest="/opt/labfleet-harness/motd.txt",
    mode="0644",
)
