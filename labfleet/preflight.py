"""Preflight: the checks and host-wide trust that every later step relies on."""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import deploy, operation

from labfleet import certs
from labfleet.facts.system import Accounts
from labfleet.planning import planned, prefetch, worth_planning
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
    """Plan a requirement check; a met one only where labfleet.facts.worth_planning says so."""
    if worth_planning(ok):
        requirement(name=name, ok=ok, problem=problem)


def account_part(settings: Settings) -> tuple:
    """The Accounts fact of the jupyter users, as every step reads it (see labfleet.facts.prefetch)."""
    return (Accounts, {"names": tuple(sorted({user.name for user in settings.jupyter_users}))})


def account(settings: Settings, name: str) -> dict | None:
    """The jupyter user `name`'s account (uid, gid, group, home), or None when it does not exist."""
    fact, kwargs = account_part(settings)
    return planned(fact, **kwargs).get(name)


def state_parts(settings: Settings) -> tuple:
    """The facts preflight decides from while planning: accounts (later steps read them too) and CAs."""
    return (account_part(settings), *certs.state_parts(settings))


@deploy("Preflight")
def check_host(settings: Settings):
    prefetch(state_parts(settings))
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
