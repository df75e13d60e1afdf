"""Preflight: the checks and host-wide trust that every later step relies on."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from pyinfra import host
from pyinfra.api import operation

from labfleet import certs
from labfleet.facts.system import Account, Accounts
from labfleet.planning import Read, snapshot, step, unless_current
from labfleet.settings import Settings


@operation(is_idempotent=True)
def requirement(ok: bool, problem: str):
    """Stop this host, and only this host, with a message for a person.

    + ok: whether the requirement holds
    + problem: what is wrong and what to do about it

    A failing command, not an exception: pyinfra aborts every host when an operation
    raises, but carries on with the others when one host's command fails.
    """
    if ok:
        host.noop("requirement met")
        return
    yield failing_command(problem)


def failing_command(problem: str) -> str:
    """The shell command that fails this host with problem, for operations that find it while running."""
    return f"echo {shlex.quote('labfleet: ' + problem)} >&2; exit 1"


def require(name: str, ok: bool, problem: str) -> None:
    """Plan a requirement check: one that holds is planned only where planning.unless_current says so."""
    unless_current(requirement, current=ok, name=name, ok=ok, problem=problem)


def reads(settings: Settings) -> dict[str, Read]:
    """What preflight decides from: the jupyter users' accounts (the later steps read them too)."""
    return {"accounts": Read(Accounts, {"names": tuple(sorted({user.name for user in settings.jupyter_users}))})}


@dataclass(frozen=True)
class PreflightState:
    accounts: dict[str, Account]


def account(settings: Settings, name: str) -> Account | None:
    """The jupyter user `name`'s account (uid, gid, group, home), or None when it does not exist."""
    return snapshot(PreflightState, reads(settings)).accounts.get(name)


@step("Preflight")
def check_host(settings: Settings):
    for user in settings.jupyter_users:
        require(
            name=f"Check that account {user.name} exists",
            ok=account(settings, user.name) is not None,
            problem=(
                f"host {settings.host}: jupyter_user {user.name!r} has no account on this host; "
                "create it (adduser) or set jupyter_user / jupyter_users to an existing account"
            ),
        )
    certs.trust_extra_ca_certificates(settings)
