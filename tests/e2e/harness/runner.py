"""Drive the real pyinfra CLI against test hosts and read its JSON results."""

from __future__ import annotations

import glob
import json
import re
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine import tail_lines
from .hosts import TestHost

REPO_ROOT = Path(__file__).resolve().parents[3]
LOCAL_CA_GLOB = "/usr/local/share/ca-certificates/*.crt"
INVENTORY_NAME = "lab_hosts.py"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
DEFAULT_TIMEOUT_S = 900

# The inventory reads its hosts from JSON beside it, so any JSON value passes through intact.
INVENTORY_TEMPLATE = '''\
"""Test inventory written by tests/e2e/harness/runner.py."""

import json as _json
from pathlib import Path as _Path

_spec = _json.loads((_Path(__file__).parent / "lab_hosts.json").read_text())

for _group, _names in _spec["groups"].items():
    globals()[_group] = [(name, _spec["hosts"][name]) for name in _names]

# As the project's inventory.py does.
from labfleet.dataset_listing import list_datasets_ahead  # noqa: E402

list_datasets_ahead()
'''


def controller_ca_certificates() -> list[str]:
    """The controller's extra CA files, from the standard local-CA directory."""
    return sorted(glob.glob(LOCAL_CA_GLOB))


def sandbox_ulimits() -> dict:
    """The product's ulimits, capped at what this machine allows.

    These machines lack CAP_SYS_RESOURCE and have a finite hard memlock limit, which the
    nested engines inherit, so a container asking for memlock -1 (the product default,
    right on a real workstation) cannot start here. Tests then ask for the hard limit.
    """
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    if hard == resource.RLIM_INFINITY:
        return {}
    return {"ulimits": {"memlock": hard, "stack": 67108864}}


@dataclass
class Result:
    """One pyinfra run: exit status, output, and the parsed `--json` document."""

    rc: int
    stdout: str
    stderr: str
    json: dict | None
    command: list[str] = field(default_factory=list)
    inventory: str = ""

    def stderr_tail(self, lines: int = 40) -> str:
        return tail_lines(self.stderr, lines)

    @property
    def ops(self) -> list[dict]:
        """The operations of results.operations, in run order."""
        results = (self.json or {}).get("results")
        if not results:
            raise AssertionError(f"pyinfra (rc {self.rc}) produced no results; stderr tail:\n{self.stderr_tail()}")
        return results["operations"]

    @property
    def failed_hosts(self) -> list[str]:
        return list(((self.json or {}).get("results") or {}).get("failed_hosts", []))

    def op(self, name: str) -> dict:
        """The one operation whose name, or one of whose names, is name (or contains it)."""
        exact = [op for op in self.ops if name == op["name"] or name in op["names"]]
        matches = exact or [op for op in self.ops if name in op["name"]]
        if len(matches) != 1:
            found = ", ".join(op["name"] for op in self.ops)
            raise AssertionError(f"{len(matches)} operations match {name!r}; run had: {found}")
        return matches[0]

    def status(self, host: str | TestHost, name: str) -> str | None:
        """'success' (changed), 'no_change', 'error', or None when the op skipped host."""
        host = _host_name(host)
        op = self.op(name)
        for status in ("success", "no_change", "error"):
            if host in op[status]:
                return status
        return None

    def changed(self, host: str | TestHost) -> list[str]:
        """Names of the operations that changed host."""
        host = _host_name(host)
        return [op["name"] for op in self.ops if host in op["success"]]

    def errors(self) -> list[tuple[str, str]]:
        """(host, operation name) for every failed operation.

        pyinfra prints no JSON when every host failed; the names then come from its log.
        """
        if not (self.json or {}).get("results"):
            return _errors_from_log(self.stderr)
        return [(host, op["name"]) for op in self.ops for host in op["error"]]


def run_pyinfra(
    hosts: Sequence[TestHost],
    deploy: str | Path = "deploy.py",
    data: Mapping[str, Any] | None = None,
    host_data: Mapping[str, Mapping[str, Any]] | None = None,
    groups: Mapping[str, Iterable[str | TestHost]] | None = None,
    args: Sequence[str] = (),
    expect_fail: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
    cwd: str | Path | None = None,
) -> Result:
    """Run `pyinfra -y --json <test inventory> <deploy>` against hosts from the repo root.

    + hosts: the test hosts; the inventory names them by TestHost.name
    + deploy: deploy file, relative to the repo root or absolute
    + data: data for every host; extra_ca_certificates defaults to the controller's CAs
    + host_data: per host name, data that overrides data
    + groups: group name to hosts (names or TestHosts), e.g. {"gpu": ["lf-ab12cd-1"]}
    + args: extra CLI arguments, placed before the inventory
    + expect_fail: the run must exit non-zero; missing JSON is then allowed
    + timeout: seconds before the run is killed and the test fails
    + cwd: working directory (the repo root, so that its group_data/ loads)
    """
    cwd = Path(cwd or REPO_ROOT)
    with tempfile.TemporaryDirectory(prefix="labfleet-run-") as workdir:
        inventory = write_inventory(Path(workdir), hosts, data, host_data, groups)
        command = [*_pyinfra_command(), "-y", "--json", *args, str(inventory), str(deploy)]
        try:
            completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as error:
            raise AssertionError(
                f"pyinfra did not finish within {timeout} s: {' '.join(command)}\n"
                f"stderr tail:\n{tail_lines(error.stderr)}"
            ) from None
        inventory_text = inventory.with_suffix(".json").read_text()
    parsed = _parse_json(completed.stdout)
    result = Result(
        rc=completed.returncode,
        stdout=completed.stdout,
        stderr=completed.stderr,
        json=parsed,
        command=command,
        inventory=inventory_text,
    )
    if expect_fail:
        if result.rc == 0:
            raise AssertionError(f"pyinfra was expected to fail but exited 0; stderr tail:\n{result.stderr_tail()}")
    elif parsed is None:
        raise AssertionError(
            f"pyinfra (rc {result.rc}) printed no JSON document on stdout\n"
            f"stdout tail:\n{tail_lines(result.stdout, 10)}\nstderr tail:\n{result.stderr_tail()}"
        )
    return result


def write_inventory(
    directory: Path,
    hosts: Sequence[TestHost],
    data: Mapping[str, Any] | None = None,
    host_data: Mapping[str, Mapping[str, Any]] | None = None,
    groups: Mapping[str, Iterable[str | TestHost]] | None = None,
) -> Path:
    """Write lab_hosts.py (and its lab_hosts.json) into directory; returns the .py path."""
    known_hosts = directory / "known_hosts"
    known_hosts.touch()
    common = {"extra_ca_certificates": controller_ca_certificates(), **sandbox_ulimits(), **(data or {})}
    per_host = {}
    for host in hosts:
        per_host[host.name] = {
            "ssh_hostname": "127.0.0.1",
            "ssh_port": host.ssh_port,
            "ssh_user": host.ssh_user,
            "ssh_key": host.ssh_key,
            "ssh_allow_agent": False,
            "ssh_look_for_keys": False,
            "ssh_known_hosts_file": str(known_hosts),
            "ssh_strict_host_key_checking": "off",
            "_sudo": True,
            **common,
            **dict((host_data or {}).get(host.name, {})),
        }
    unknown = set(host_data or {}) - set(per_host)
    if unknown:
        raise ValueError(f"host_data names hosts not in this run: {', '.join(sorted(unknown))}")
    group_names = {"lab_hosts": [host.name for host in hosts]}
    for group, members in (groups or {}).items():
        names = [_host_name(member) for member in members]
        missing = set(names) - set(per_host)
        if missing:
            raise ValueError(f"group {group} names hosts not in this run: {sorted(missing)}")
        group_names[group] = names
    spec = {"hosts": per_host, "groups": group_names}
    (directory / "lab_hosts.json").write_text(json.dumps(spec, indent=2, default=str))
    inventory = directory / INVENTORY_NAME
    inventory.write_text(INVENTORY_TEMPLATE)
    return inventory


def assert_converged(result: Result) -> None:
    """The run exited 0 and no operation failed on any host."""
    offenders = [f"{host}: {name}" for host, name in result.errors()]
    offenders += [f"{host}: (host failed)" for host in result.failed_hosts]
    if result.rc != 0 or offenders:
        raise AssertionError(
            f"pyinfra did not converge (rc {result.rc}); failed:\n  "
            + ("\n  ".join(offenders) or "(no operation reported an error)")
            + f"\nstderr tail:\n{result.stderr_tail()}"
        )


def assert_no_changes(result: Result) -> None:
    """Converged, and every operation reported no change on every host."""
    assert_converged(result)
    offenders = [f"{op['name']} on {host}" for op in result.ops for host in op["success"]]
    if offenders:
        raise AssertionError(
            f"{len(offenders)} operation(s) changed something on a run that should change "
            "nothing:\n  " + "\n  ".join(offenders)
        )


def _pyinfra_command() -> list[str]:
    sibling = Path(sys.executable).parent / "pyinfra"
    if sibling.exists():
        return [str(sibling)]
    return [sys.executable, "-m", "pyinfra"]


def _parse_json(stdout: str) -> dict | None:
    text = stdout.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    # A stray line before the document (a print in a deploy file) should not hide the results.
    start = text.find("\n{")
    while start != -1:
        try:
            return json.loads(text[start + 1 :])
        except ValueError:
            start = text.find("\n{", start + 1)
    return None


def _errors_from_log(stderr: str) -> list[tuple[str, str]]:
    errors, operation = [], "(before the first operation)"
    for line in _ANSI.sub("", stderr).splitlines():
        started = re.match(r"--> Starting operation: (.*)", line.strip())
        if started:
            operation = started.group(1).strip()
            continue
        failed = re.match(r"\[([^\]]+)\] Error", line.strip())
        if failed and (failed.group(1), operation) not in errors:
            errors.append((failed.group(1), operation))
    return errors


def _host_name(host: str | TestHost) -> str:
    return host.name if isinstance(host, TestHost) else host
