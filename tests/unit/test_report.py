"""Fleet status: drift rules, the table, the JSON document and the status facts' parsers."""

from __future__ import annotations

import json

from labfleet import compose, report
from labfleet.facts import report as report_facts

TAG = "labfleet/jupyterlab:jupyter-0123456789ab"
ID_A = "sha256:" + "a" * 64
ID_B = "sha256:" + "b" * 64
ID_C = "sha256:" + "c" * 64


def user(name="lab", health="healthy", image=ID_A, current=True, config_current=True) -> dict:
    return {
        "user": name,
        "url": "http://127.0.0.1:8888/lab",
        "status": "running" if health in ("healthy", "unhealthy", "starting") else health,
        "health": health,
        "restarts": 0,
        "running_image": image,
        "current": current,
        "config_current": config_current,
        "home": f"/srv/home/{name}",
        "home_bytes": 3 * 2**29,
        "home_counted": True,
    }


def row(host: str, **overrides) -> dict:
    base = {
        "host": host,
        "os": "Debian 13",
        "docker": "26.1.5",
        "compose": "2.26.1",
        "toolkit": None,
        "toolkit_wanted": False,
        "driver": None,
        "gpus": 0,
        "gpu_names": None,
        "delivery": "ship",
        "expected_image": TAG,
        "image": ID_A,
        "users": [user()],
        "datasets": {"imagenet": "present"},
        "free_datasets": 100 * 2**30,
        "free_docker": 50 * 2**30,
    }
    return {**base, **overrides}


def fleet(*rows: dict) -> list[dict]:
    return list(rows)


def test_an_identical_fleet_has_no_drift():
    rows = fleet(row("pc01"), row("pc02"), row("pc03"))
    assert report.drift(rows) == {"pc01": [], "pc02": [], "pc03": []}


def test_the_odd_docker_version_is_marked_and_names_the_fleets():
    rows = fleet(row("pc01"), row("pc02", docker="27.0.1"), row("pc03"))
    reasons = report.drift(rows)
    assert reasons["pc02"] == ["docker 27.0.1 (fleet: 26.1.5)"]
    assert reasons["pc01"] == reasons["pc03"] == []


def test_two_hosts_that_disagree_are_both_marked():
    reasons = report.drift(fleet(row("pc01"), row("pc02", docker="27.0.1")))
    assert reasons["pc01"] and reasons["pc02"]
    assert "no majority" in reasons["pc01"][0]


def test_a_host_whose_engine_does_not_answer_is_marked():
    reasons = report.drift(fleet(row("pc01"), row("pc02", docker=None), row("pc03")))
    assert reasons["pc02"] == ["docker is not answering"]
    assert reasons["pc01"] == []


def test_the_toolkit_is_compared_only_where_it_is_wanted():
    rows = fleet(
        row("cpu01"),
        row("gpu01", gpus=1, toolkit="1.17.8-1", toolkit_wanted=True),
        row("gpu02", gpus=1, toolkit=None, toolkit_wanted=True),
    )
    reasons = report.drift(rows)
    assert reasons["cpu01"] == []
    assert reasons["gpu01"] == []
    assert reasons["gpu02"] == ["nvidia-container-toolkit is missing"]


def test_another_image_id_under_the_fleet_tag_is_drift_with_ship():
    rows = fleet(row("pc01"), row("pc02", image=ID_B), row("pc03"))
    ids = report.fleet_image_ids(rows)
    assert ids == {TAG: ID_A}
    reasons = report.drift(rows, ids)
    assert reasons["pc02"] == [f"image {'b' * 12} is not the fleet's {'a' * 12}"]
    assert not report.image_matches(rows[1], ids)
    assert report.image_matches(rows[0], ids)


def test_a_missing_image_is_drift():
    rows = fleet(row("pc01"), row("pc02", image=None, users=[user(health="absent", image=None, current=False)]))
    reasons = report.drift(rows)
    assert reasons["pc02"] == [f"image {TAG} missing", "lab: container absent"]
    assert reasons["pc01"] == []


def test_build_delivery_compares_tags_not_ids():
    rows = fleet(row("pc01", delivery="build"), row("pc02", delivery="build", image=ID_B))
    ids = report.fleet_image_ids(rows)
    assert ids == {TAG: None}
    assert report.drift(rows, ids) == {"pc01": [], "pc02": []}


def test_on_a_tie_the_controllers_id_decides():
    rows = fleet(row("pc01"), row("pc02", image=ID_B))
    ids = report.fleet_image_ids(rows, {TAG: ID_B})
    assert ids == {TAG: ID_B}
    reasons = report.drift(rows, ids)
    assert reasons["pc01"] and reasons["pc02"] == []


def test_a_tie_without_the_controllers_id_marks_both():
    rows = fleet(row("pc01"), row("pc02", image=ID_B))
    ids = report.fleet_image_ids(rows, {TAG: ID_C})
    reasons = report.drift(rows, ids)
    assert all("no majority id" in reasons[host][0] for host in ("pc01", "pc02"))


def test_a_controller_with_another_build_is_a_note_not_drift():
    rows = fleet(row("pc01"), row("pc02"))
    ids = report.fleet_image_ids(rows, {TAG: ID_C})
    assert report.drift(rows, ids) == {"pc01": [], "pc02": []}
    (note,) = report.notes(ids, {TAG: ID_C})
    assert "c" * 12 in note and "a" * 12 in note


def test_container_states_that_are_drift():
    rows = fleet(
        row("pc01", users=[user(health="unhealthy")]),
        row("pc02", users=[user(health="exited")]),
        row("pc03", users=[user(current=False, image=ID_B)]),
        row("pc04", users=[user(config_current=False)]),
        row("pc05"),
    )
    reasons = report.drift(rows)
    assert reasons["pc01"] == ["lab: container unhealthy"]
    assert reasons["pc02"] == ["lab: container exited"]
    assert reasons["pc03"] == [f"lab: container runs {'b' * 12}, not what {TAG} names now ({'a' * 12})"]
    assert reasons["pc04"] == ["lab: container runs other settings; run the deploy"]
    assert reasons["pc05"] == []


def test_dataset_states_that_are_drift():
    rows = fleet(
        row("pc01", datasets={"a": "ok", "b": "present", "c": "mounted"}),
        row("pc02", datasets={"a": "unverified", "b": "missing", "c": "not-mounted"}),
    )
    reasons = report.drift(rows)
    assert reasons["pc01"] == []
    assert reasons["pc02"] == ["dataset a unverified", "dataset b missing", "dataset c not-mounted"]


def test_the_table_marks_drifting_hosts_and_says_why():
    rows = fleet(row("pc01"), row("pc02", image=ID_B), row("pc03", gpus=2, gpu_names=["NVIDIA L4", "NVIDIA L4"]))
    ids = report.fleet_image_ids(rows)
    reasons = report.drift(rows, ids)
    text = report.table(rows, reasons, ids, unreachable=["pc04"], remarks=["a note"])
    lines = text.splitlines()
    assert lines[0].split() == ["host", "os", "docker", "toolkit", "driver", "gpus", "image", "jupyter", "home",
                                "datasets", "free", "data/docker", "backup"]  # fmt: skip
    by_host = {line.split()[1] if line.startswith("!") else line.split()[0]: line for line in lines[1:5]}
    assert by_host["pc01"].startswith(" ") and by_host["pc03"].startswith(" ")
    assert by_host["pc02"].startswith("!") and "(differs)" in by_host["pc02"]
    assert "2: 2x NVIDIA L4" in by_host["pc03"]
    assert "lab:healthy http://127.0.0.1:8888/lab" in by_host["pc01"]
    assert "lab:1.5G" in by_host["pc01"]
    assert "imagenet:present" in by_host["pc01"] and "100.0G/50.0G" in by_host["pc01"]
    assert by_host["pc04"].startswith("!") and "unreachable" in by_host["pc04"]
    assert f"! pc02: image {'b' * 12} is not the fleet's {'a' * 12}" in lines
    assert lines[-1] == "note: a note"


def test_the_json_document_says_which_host_drifts_and_why():
    rows = fleet(row("pc01"), row("pc02", users=[user(health="exited")]))
    ids = report.fleet_image_ids(rows)
    reasons = {**report.drift(rows, ids), "pc03": ["unreachable"]}
    document = json.loads(json.dumps(report.document(rows, reasons, ids)))
    assert document["ok"] is False
    assert document["drift"] == {"pc02": ["lab: container exited"], "pc03": ["unreachable"]}
    hosts = {entry["host"]: entry for entry in document["hosts"]}
    assert hosts["pc01"]["ok"] is True and hosts["pc01"]["image_matches"] is True
    assert hosts["pc02"]["ok"] is False
    assert hosts["pc03"] == {"host": "pc03", "unreachable": True, "drift": ["unreachable"], "ok": False}


def test_url_follows_the_bind_address(raw):
    from labfleet.settings import build

    loopback = build("pc01", {**raw, "ssh_hostname": "10.0.0.5"})
    assert compose.url(loopback, 8888) == "http://127.0.0.1:8888/lab"
    everywhere = build("pc01", {**raw, "ssh_hostname": "10.0.0.5", "jupyter_bind": "0.0.0.0"})
    assert compose.url(everywhere, 8890) == "http://10.0.0.5:8890/lab"
    v6 = build("pc01", {**raw, "jupyter_bind": "::1"})
    assert compose.url(v6, 8888) == "http://[::1]:8888/lab"


def test_fact_parsers():
    assert report_facts.ToolkitVersion().process(["ii  1.17.8-1"]) == "1.17.8-1"
    assert report_facts.ToolkitVersion().process(["rc  1.17.8-1"]) is None
    assert report_facts.DatasetStates().process(["dataset imagenet ok", "dataset coco missing", "junk"]) == {
        "imagenet": "ok",
        "coco": "missing",
    }
    assert report_facts.ProjectContainer().process([]) == {**report_facts.ProjectContainer.default()}


def test_project_container_reads_the_restart_count_from_the_same_answer(engine_api):
    fact = report_facts.ProjectContainer()
    command = fact.command(project="labfleet-lab", image="labfleet/jupyterlab:jupyter-0123456789ab")
    assert command.count("--unix-socket") == 1 and "docker " not in command
    container = {
        "Image": ID_A,
        "State": {"Status": "running", "Health": {"Status": "healthy"}},
        "Config": {"Labels": {"com.docker.compose.project": "labfleet-lab", "org.labfleet.config": "0123abcd"}},
        "RestartCount": 2,
    }
    run = engine_api(
        {
            "/images/labfleet/jupyterlab:jupyter-0123456789ab/json": {"Id": ID_A},
            "/containers/labfleet-lab-jupyterlab-1/json": container,
        }
    )
    assert fact.process(run(command)) == {
        "image_id": ID_A,
        "container_image": ID_A,
        "status": "running",
        "health": "healthy",
        "digest": "0123abcd",
        "restarts": 2,
    }


def test_dataset_states_command_checks_each_kind():
    command = report_facts.DatasetStates().command(
        entries=(
            ("plain", "/srv/datasets/plain", "", "/var/lib/labfleet/datasets/plain.verified", False),
            ("sums", "/srv/datasets/sums", "/srv/datasets/sums/SHA256SUMS", "/s/sums.verified", False),
            ("nfs", "/srv/datasets/nfs", "", "/s/nfs.verified", True),
        )
    )
    assert "s=present" in command
    assert "sha256sum < /srv/datasets/sums/SHA256SUMS" in command
    assert "mountpoint -q /srv/datasets/nfs" in command


def test_the_verdict_names_the_hosts_that_drift():
    assert (
        report.verdict({"pc01": [], "pc02": []}, 2) == "labfleet status: all 2 hosts match the fleet and their settings"
    )
    reasons = {"pc01": [], "pc02": ["lab: container absent"], "pc03": ["unreachable"]}
    assert report.verdict(reasons, 3) == "labfleet status: drift on 2 of 3 hosts: pc02, pc03"


def test_a_home_too_big_to_count_in_time_says_so():
    rows = fleet(row("pc01", users=[{**user(), "home_bytes": None, "home_counted": False}]), row("pc02"))
    text = report.table(rows, report.drift(rows))
    assert "lab:? (du > 5s)" in text
    assert report.drift(rows)["pc01"] == [], "an uncounted home is not drift"
