"""Fixtures for end-to-end tests: a Docker engine, test images, test hosts, the pyinfra CLI.

Every test under tests/e2e is marked `e2e`. Without an engine, and without root to start one,
the tests are skipped, except under CI=true, where they fail instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from labfleet.image import CONTEXT_DIR, WHEELS_ENV, build_image, controller_settings, image_tag

from .harness import images, wheels
from .harness.engine import EngineUnavailable, ensure_engine
from .harness.hosts import Fleet, TestHost, generate_keypair, remove_stale_hosts
from .harness.runner import controller_ca_certificates, run_pyinfra

E2E_DIR = Path(__file__).resolve().parent
KEEP_HOSTS_ENV = "LABFLEET_KEEP_HOSTS"

_kept_hosts: list[TestHost] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end test against real systemd test hosts (needs Docker, root)")
    config.addinivalue_line("markers", "long: a test of many minutes, collected first (see below)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
    # Tests marked long first (the order is otherwise kept): they start with the suite, and the
    # other workers share the rest (./run test steals work between workers), instead of one of
    # them being left to run alone at the end.
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_terminal_summary(terminalreporter) -> None:
    if not _kept_hosts:
        return
    terminalreporter.section(f"test hosts kept ({KEEP_HOSTS_ENV}=1)")
    for host in _kept_hosts:
        terminalreporter.write_line(f"{host.name} ({host.distro}): {host.ssh_command()}")
        terminalreporter.write_line(f"    or: docker exec -it {host.container} bash")
    terminalreporter.write_line("remove them with: docker rm -f -v $(docker ps -aq --filter label=labfleet.test=1)")


def _keep_hosts() -> bool:
    return os.environ.get(KEEP_HOSTS_ENV) == "1"


@pytest.fixture(scope="session")
def engine() -> None:
    """A Docker engine that answers; skips (or fails under CI=true) when there is none."""
    try:
        ensure_engine()
    except EngineUnavailable as error:
        reason = f"end-to-end tests need a Docker engine: {error}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true, so this is a failure, not a skip)", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session", params=["trixie"])
def host_image(request: pytest.FixtureRequest, engine) -> str:
    """Tag of the host image for the distro in request.param (built once, then cached)."""
    return images.host_image(request.param)


@pytest.fixture(scope="session")
def base_image(engine) -> Callable[[str], str]:
    """base_image(distro="trixie") -> tag of a plain minbase image, built on first use."""

    def build(distro: str = "trixie") -> str:
        return images.base_image(distro)

    return build


@pytest.fixture(scope="session")
def wheel_cache(base_image) -> Iterator[str]:
    """The find-links URL of the one wheel cache (harness/wheels.py) that every image build reads.

    It is exported as LABFLEET_BUILD_WHEELS too, so the builds inside the deploys that tests run
    (pyinfra in a subprocess) read it as well, instead of fetching the same wheels again.
    """
    directory = wheels.fill(wheels.lock_files("jupyter", CONTEXT_DIR), base_image("trixie"))
    previous = os.environ.get(WHEELS_ENV)
    with wheels.serve(directory) as url:
        os.environ[WHEELS_ENV] = url
        try:
            yield url
        finally:
            if previous is None:
                os.environ.pop(WHEELS_ENV, None)
            else:
                os.environ[WHEELS_ENV] = previous


@pytest.fixture(scope="session")
def fleet(engine, tmp_path_factory: pytest.TempPathFactory):
    """This session's test hosts; stale hosts of interrupted runs are removed first."""
    key = generate_keypair(tmp_path_factory.mktemp("ssh"))
    fleet = Fleet(key)
    removed = remove_stale_hosts(fleet.session)
    if removed:
        print(f"removed test hosts left by earlier runs: {', '.join(removed)}", file=sys.stderr)
    yield fleet
    if _keep_hosts():
        _kept_hosts.extend(fleet.hosts)
    else:
        fleet.remove_all()


@pytest.fixture
def make_hosts(fleet: Fleet):
    """make_hosts(n, distro="trixie", engine=False) -> list[TestHost]; all removed after the test.

    engine=True starts hosts that have the distribution's Docker Engine installed already.
    """
    started: list[TestHost] = []

    def make(n: int, distro: str = "trixie", engine: bool = False) -> list[TestHost]:
        try:
            hosts = fleet.start_hosts(n, distro=distro, engine=engine)
        finally:
            started.extend(host for host in fleet.hosts if host not in started)
        return hosts

    yield make
    if not _keep_hosts():
        fleet.remove(started)


@pytest.fixture
def pyinfra_run():
    """run_pyinfra(hosts, deploy="deploy.py", data=None, host_data=None, groups=None, ...)."""
    return run_pyinfra


@pytest.fixture(scope="session")
def lab_data(base_image, wheel_cache) -> dict:
    """Settings for a whole deploy on test hosts: the distribution's engine, and the image's
    `jupyter` profile (JupyterLab and its extensions, no torch: PyTorch's CPU wheel index is
    out of these machines' reach) on the local Debian base, shipped from this machine."""
    data = {
        "docker_source": "distro",
        "image_profile": "jupyter",
        "image_delivery": "ship",
        "base_image": base_image("trixie"),
        "gpu": False,
    }
    # Built here once, under a lock that other pytest processes respect, rather than inside
    # the first deploy that needs it; the deploys then find the tag and skip the build.
    settings = controller_settings(
        image_profile="jupyter", base_image=data["base_image"], extra_ca_certificates=controller_ca_certificates()
    )
    tag = image_tag(settings)
    with images.image_lock(tag):
        build_image(settings, wheels=wheel_cache)
    return data
