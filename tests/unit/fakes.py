"""Stand-ins for pyinfra's host and state as the planning layer sees them."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from labfleet.planning import FactBatch


class FakeState(SimpleNamespace):
    """pyinfra's State, as far as planning uses it (a class of its own, so the run can be keyed on it)."""

    __hash__ = object.__hash__


class PlanningHost:
    """pyinfra's `host` as planning sees it: facts answered from a table, each read counted."""

    def __init__(self, answers: dict, executing: bool = False, fails: list[str] | None = None):
        self.name = "pc01"
        self.print_prefix = "[pc01] "
        self.answers = answers
        self.reads: list[type] = []
        self.fails = fails
        self.meta = SimpleNamespace(ops=0)
        self.state = FakeState(
            is_executing=executing,
            inventory=SimpleNamespace(get_host=lambda name: self),
            get_meta_for_host=lambda host: self.meta,
            ops={self: {}},
            failed_hosts=set(),
        )

    def __hash__(self) -> int:
        return id(self)

    def get_fact(self, fact, **kwargs):
        self.reads.append(fact)
        if fact is FactBatch:
            if self.fails is not None:
                for line in self.fails:
                    logging.getLogger("pyinfra").error(f"{self.print_prefix}{line}")
                self.state.failed_hosts.add(self)
                return None
            return [self.answers[cls] for cls, _ in kwargs["parts"]]
        return self.answers[fact]
