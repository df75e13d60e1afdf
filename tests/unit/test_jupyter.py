"""Planning of the bring-up and token operations against a fake host."""

import pytest

from labfleet import jupyter

IMAGE = "labfleet/jupyterlab:jupyter-0123456789ab"


@pytest.fixture
def fake_host(fake_host_in):
    return lambda facts: fake_host_in(jupyter, facts)


def _state(**overrides):
    state = {"image_id": "sha256:aaa", "container_image": "sha256:aaa", "status": "running"}
    state.update(health="healthy", digest="d1")
    state.update(overrides)
    return state


def _plan(fake_host, state):
    fake = fake_host({jupyter.ComposeService: state})
    commands = list(jupyter.compose_up._inner("/opt/labfleet/lab", "labfleet-lab", IMAGE, "d1"))
    return commands, fake.noops


def test_current_healthy_project_is_a_noop(fake_host):
    commands, noops = _plan(fake_host, _state())
    assert commands == []
    assert noops == ["labfleet-lab is up, current and healthy"]


@pytest.mark.parametrize(
    "change",
    [
        {"container_image": None, "status": None, "health": None, "digest": None},
        {"container_image": "sha256:old"},
        {"digest": "d0"},
        {"status": "exited"},
        {"health": "starting"},
    ],
)
def test_anything_not_current_is_brought_up_and_waited_for(fake_host, change):
    (command,), _ = _plan(fake_host, _state(**change))
    assert "docker compose up -d --wait --wait-timeout 300" in command
    assert "--force-recreate" not in command
    assert "docker compose logs --no-color --tail 40" in command
    assert "<hidden>" in command


def test_unhealthy_current_container_is_recreated(fake_host):
    (command,), _ = _plan(fake_host, _state(health="unhealthy"))
    assert "--force-recreate" in command


def test_a_token_made_in_this_run_recreates_even_a_current_container(fake_host):
    # The old token stays mounted in a running container after its file is replaced.
    fake_host({jupyter.ComposeService: _state()})
    (command,) = jupyter.compose_up._inner("/opt/labfleet/lab", "labfleet-lab", IMAGE, "d1", new_token=True)
    assert "docker compose up -d --wait" in command and "--force-recreate" in command


def test_missing_image_fails_the_host(fake_host):
    (command,), _ = _plan(fake_host, _state(image_id=None))
    assert "image labfleet/jupyterlab:jupyter-0123456789ab is missing" in command and "exit 1" in command


CONTAINER = "/containers/labfleet-lab-jupyterlab-1/json"


def _container(project="labfleet-lab", status="running", health="healthy", digest="d1"):
    labels = {"com.docker.compose.project": project, **({"org.labfleet.config": digest} if digest else {})}
    state = {"Status": status, **({"Health": {"Status": health}} if health else {})}
    return {"Image": "sha256:aaa", "State": state, "Config": {"Labels": labels}, "RestartCount": 2}


def test_compose_service_asks_the_engine_api_for_the_image_and_the_container_in_one_curl(engine_api):
    fact = jupyter.ComposeService()
    command = fact.command(project="labfleet-lab", image=IMAGE)
    assert command.count("--unix-socket") == 1 and "docker " not in command
    run = engine_api({f"/images/{IMAGE}/json": {"Id": "sha256:aaa"}, CONTAINER: _container()})
    assert fact.process(run(command)) == _state()


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        ({f"/images/{IMAGE}/json": {"Id": "sha256:aaa"}}, {"container_image": None, "status": None, "health": None}),
        ({CONTAINER: _container()}, {"image_id": None}),
        ({CONTAINER: _container(health=None, digest=None, status="exited")}, {"health": "none", "digest": None}),
        # A container of that name that another project (or a person) made is not this project's.
        ({CONTAINER: _container(project="other")}, {"container_image": None, "status": None}),
        ({}, {"image_id": None, "container_image": None}),
    ],
)
def test_compose_service_reads_what_the_engine_has(engine_api, answers, expected):
    fact = jupyter.ComposeService()
    state = fact.process(engine_api(answers)(fact.command(project="labfleet-lab", image=IMAGE)))
    assert {key: state[key] for key in expected} == expected


def test_compose_service_without_curl_or_engine_knows_nothing():
    fact = jupyter.ComposeService()
    fact.command(project="labfleet-lab", image=IMAGE)
    assert fact.process([]) == jupyter.ComposeService.default()
    assert fact.process(["curl: (7) Couldn't connect", "--labfleet-http 000"])["image_id"] is None


def test_existing_token_is_kept_and_only_its_mode_mended(fake_host):
    fake = fake_host({jupyter.File: {"user": "lab", "group": "lab", "mode": 644}})
    commands = list(jupyter.secret_token._inner("/opt/labfleet/lab/jupyter_token", "lab", "lab"))
    assert commands == ["chmod 600 /opt/labfleet/lab/jupyter_token"]
    assert fake.noops == []


def test_token_is_generated_on_the_host_when_missing(fake_host):
    fake_host({jupyter.File: None})
    (command,) = jupyter.secret_token._inner("/opt/labfleet/lab/jupyter_token", "lab", "lab")
    assert command.startswith("umask 077 && tmp=$(mktemp /opt/labfleet/lab/.token.XXXXXX)")
    assert "/dev/urandom" in command and 'mv "$tmp" /opt/labfleet/lab/jupyter_token' in command


# --- The persistent home ------------------------------------------------------------------------


def _home_plan(fake_host, started, mounted):
    fake = fake_host({jupyter.ContainerHome: {"started": started, "mounted": mounted}})
    commands = list(jupyter.keep_container_home._inner("labfleet-lab", "lab", "/srv/home/lab"))
    return commands, fake.noops


@pytest.mark.parametrize(("started", "mounted"), [(False, False), (True, True), (False, True)])
def test_a_container_without_its_own_home_is_not_copied(fake_host, started, mounted):
    commands, noops = _home_plan(fake_host, started, mounted)
    assert commands == [] and noops == ["labfleet-lab keeps no HOME of its own"]


def test_a_container_with_its_own_home_is_copied_without_replacing_a_file(fake_host):
    (command,), noops = _home_plan(fake_host, True, False)
    assert command.startswith("bash -c ") and noops == []
    assert "docker cp labfleet-lab-jupyterlab-1:/home/lab/. - |" in command
    assert "tar -C /srv/home/lab -xpf - --numeric-owner --skip-old-files" in command
    assert "pipefail" in command, "a failed docker cp must fail the copy, not recreate the container"


def test_the_home_facts_parse_the_engine_and_du(engine_api):
    from labfleet.facts.home import ContainerHome, FileNames, HomeSize, parse_home_size

    fact = ContainerHome()
    command = fact.command(project="labfleet-lab", home="/home/lab")
    labels = {"com.docker.compose.project": "labfleet-lab"}
    ran = {"Running": False, "StartedAt": "2026-12-01T10:00:00.5Z"}
    own = {"State": ran, "Config": {"Labels": labels}, "Mounts": [{"Destination": "/workspace"}]}
    created = {**own, "State": {"Running": False, "StartedAt": "0001-01-01T00:00:00Z"}}
    mounted = {**own, "Mounts": [{"Destination": "/workspace"}, {"Destination": "/home/lab"}]}
    other = {**own, "Config": {"Labels": {"com.docker.compose.project": "other"}}}
    assert fact.process(engine_api({CONTAINER: own})(command)) == {"started": True, "mounted": False}
    assert fact.process(engine_api({CONTAINER: mounted})(command)) == {"started": True, "mounted": True}
    assert fact.process(engine_api({CONTAINER: created})(command)) == {"started": False, "mounted": False}
    assert fact.process(engine_api({CONTAINER: other})(command)) == {"started": False, "mounted": False}
    assert fact.process(engine_api({})(command)) == {"started": False, "mounted": False}

    assert parse_home_size(["2048\t/srv/home/lab", "du-exit 0"]) == {"bytes": 2048 * 1024, "counted": True}
    assert parse_home_size(["du-exit 124"]) == {"bytes": None, "counted": False}
    assert parse_home_size([]) == {"bytes": None, "counted": True}, "no such home"
    assert "timeout 5 du -skx -- /srv/home/lab" in HomeSize().command(path="/srv/home/lab")
    assert FileNames().process(["B", "", "A"]) == ["A", "B"]
