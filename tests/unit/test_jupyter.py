"""Planning of the bring-up and token operations against a fake host."""

import subprocess

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


STAND_IN_DOCKER = """#!/bin/sh
# A stand-in docker for the keep-home script: inspect answers $INSPECT (fails when it is unset,
# as for a missing container); cp streams $CONTAINER_HOME as a tar, as docker cp does.
case "$1" in
  inspect) [ -n "${INSPECT:-}" ] || exit 1; echo "$INSPECT";;
  cp) tar -C "$CONTAINER_HOME" -cf - .;;
esac
"""


def _keep_home(tmp_path, inspect: str | None):
    bin_dir, old, home = tmp_path / "bin", tmp_path / "layer-home", tmp_path / "home"
    for directory in (bin_dir, old, home):
        directory.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text(STAND_IN_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    (old / ".bashrc").write_text("from the container\n")
    (old / "notes.txt").write_text("written in the container\n")
    (home / "notes.txt").write_text("already in home_dir\n")
    script = tmp_path / "keep-home"
    script.write_text(jupyter.keep_home_script("labfleet-lab", "lab", str(home)))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CONTAINER_HOME": str(old), **({"INSPECT": inspect} if inspect else {})}
    result = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env, timeout=30)
    return result, home


def test_keep_home_copies_a_containers_own_home_without_replacing_a_file(tmp_path):
    result, home = _keep_home(tmp_path, "2026-12-01T10:00:00.5Z /workspace /resource/datasets ")
    assert result.returncode == 0, result.stderr
    assert (home / ".bashrc").read_text() == "from the container\n"
    assert (home / "notes.txt").read_text() == "already in home_dir\n", "a file home_dir has is kept"


@pytest.mark.parametrize(
    "inspect",
    [None, "0001-01-01T00:00:00Z /workspace ", "2026-12-01T10:00:00Z /workspace /home/lab "],
    ids=["no container", "never started", "home already mounted"],
)
def test_keep_home_leaves_alone_a_container_with_nothing_to_keep(tmp_path, inspect):
    result, home = _keep_home(tmp_path, inspect)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in home.iterdir()) == ["notes.txt"]


def test_a_failed_copy_stops_the_recreate(fake_host, tmp_path):
    fake_host({jupyter.ComposeService: _state(digest="old")})
    (command,) = jupyter.compose_up._inner(str(tmp_path), "labfleet-lab", IMAGE, "d1")
    (tmp_path / "keep-home").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "keep-home").chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/docker-calls\n')
    (bin_dir / "docker").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "labfleet: copying labfleet-lab's HOME into its home_dir failed; the container is left as it was"
    )
    assert not (tmp_path / "docker-calls").exists(), "nothing may recreate the container"


def test_the_home_facts_parse_du_and_the_secret_names():
    from labfleet.facts.home import FileNames, HomeSize, parse_home_size

    assert parse_home_size(["2048\t/srv/home/lab", "du-exit 0"]) == {"bytes": 2048 * 1024, "counted": True}
    assert parse_home_size(["du-exit 124"]) == {"bytes": None, "counted": False}
    assert parse_home_size([]) == {"bytes": None, "counted": True}, "no such home"
    assert "timeout 5 du -skx -- /srv/home/lab" in HomeSize().command(path="/srv/home/lab")
    assert FileNames().process(["B", "", "A"]) == ["A", "B"]
