"""labfleet/datasets.py and its kinds (dataset_push, dataset_pull, dataset_nfs) without hosts: rsync
and ssh command lines, peer trust, pull order, NFS units.

The NFS source is tested here only: the kernel of the e2e test hosts has no NFS client, so
no mount can happen there (see tests/e2e/test_datasets.py).
"""

import shutil
import subprocess
from types import SimpleNamespace

import gevent
import pytest
from pyinfra.api.exceptions import PyinfraError
from pyinfra.facts.server import Which

from labfleet import dataset_nfs, dataset_pull, dataset_push, dataset_rsync, dataset_state, datasets, planning
from labfleet.facts.datasets import DefaultAcls, ManifestState, RsyncDryRun, parse_rsync_itemized
from labfleet.facts.system import PublicKeyFile, PublicKeyFiles, SshHostKey
from labfleet.model import Source, dataset_source
from labfleet.settings import Dataset, build
from labfleet.snapshot_files import text_sha1

MANUAL = Source("manual", "manual")


def _settings(raw, name, **data):
    return build(name, {**raw, **data})


@pytest.mark.parametrize(
    ("path", "unit"),
    [
        ("/srv/datasets/imagenet", "srv-datasets-imagenet.mount"),
        ("/srv/datasets/my-data", "srv-datasets-my\\x2ddata.mount"),
        ("/srv//datasets/x.v2/", "srv-datasets-x.v2.mount"),
        ("/data/.hidden", "data-.hidden.mount"),
        ("/.data/a b", "\\x2edata-a\\x20b.mount"),
        ("/srv/datasets/caf\u00e9", "srv-datasets-caf\\xc3\\xa9.mount"),
    ],
)
def test_mount_unit_names_follow_systemd_escape(path, unit):
    assert dataset_nfs.mount_unit_name(path) == unit
    if shutil.which("systemd-escape"):
        escaped = subprocess.run(["systemd-escape", "--path", "--suffix=mount", path], capture_output=True, text=True)
        assert escaped.stdout.strip() == unit


def test_nfs_unit_mounts_read_only_and_is_enabled_at_boot():
    dataset = Dataset("imagenet", dataset_source("nfs:nas.lab:/export/imagenet"))
    unit = dataset_nfs.nfs_mount_unit(dataset, "/srv/datasets/imagenet")
    lines = unit.splitlines()
    assert "What=nas.lab:/export/imagenet" in lines
    assert "Where=/srv/datasets/imagenet" in lines
    assert "Type=nfs" in lines
    options = next(line for line in lines if line.startswith("Options=")).removeprefix("Options=").split(",")
    assert "ro" in options and "nofail" in options and "_netdev" in options
    assert "WantedBy=remote-fs.target" in lines
    assert "After=network-online.target" in lines


@pytest.mark.parametrize(("readonly", "chmod"), [(True, "D2755,Fu+rw,Fgo+r,Fgo-w"), (False, "D2775,Fug+rw,Fo+r,Fo-w")])
def test_rsync_never_deletes_or_writes_in_place_unless_told(readonly, chmod):
    flags = dataset_rsync.rsync_flags(Dataset("d", MANUAL, readonly=readonly), "labdata")
    assert "--delete" not in flags
    assert not {"--inplace", "--partial", "--append"} & set(flags)
    assert f"--chmod={chmod}" in flags
    assert "--chown=root:labdata" in flags and "--itemize-changes" in flags
    assert "--delete" in dataset_rsync.rsync_flags(Dataset("d", MANUAL, prune=True), "labdata")


def test_push_uses_the_hosts_own_ssh_settings():
    data = {
        "ssh_hostname": "10.1.2.3",
        "ssh_port": 2222,
        "ssh_user": "admin",
        "ssh_key": "/keys/id_ed25519",
        "ssh_known_hosts_file": "/keys/known_hosts",
        "ssh_strict_host_key_checking": "yes",
    }
    argv = dataset_push.push_command(data, "pc01", "/data/mnist/", "/srv/datasets/mnist", ["-r"], sudo=True)
    assert argv[-2:] == ["/data/mnist/", "admin@10.1.2.3:/srv/datasets/mnist/"]
    rsh = argv[argv.index("--rsh") + 1]
    for option in ("-p 2222", "-i /keys/id_ed25519", "UserKnownHostsFile=/keys/known_hosts"):
        assert option in rsh
    assert "StrictHostKeyChecking=yes" in rsh and "BatchMode=yes" in rsh
    assert argv[argv.index("--rsync-path") + 1] == "sudo -n rsync"


def test_push_without_sudo_and_to_an_ipv6_host():
    argv = dataset_push.push_command({"ssh_hostname": "fd00::5"}, "pc01", "/d", "/srv/datasets/d", [], sudo=False)
    assert "--rsync-path" not in argv
    assert argv[-1] == "[fd00::5]:/srv/datasets/d/"


def test_authorized_key_allows_one_read_only_rrsync_from_one_address():
    line = dataset_pull.authorized_key_line(
        "ssh-ed25519 AAAAC3 labfleet-pull:mnist@pc02", "/srv/datasets/mnist", "10.0.0.2", "/usr/bin/rrsync"
    )
    assert line == (
        'restrict,from="10.0.0.2",command="/usr/bin/rrsync -ro /srv/datasets/mnist" '
        "ssh-ed25519 AAAAC3 labfleet-pull:mnist@pc02"
    )
    odd = dataset_pull.authorized_key_line("ssh-ed25519 K c", '/data/a "b"', None, "/usr/bin/rrsync")
    assert odd.startswith('restrict,command="/usr/bin/rrsync -ro \'/data/a \\"b\\"\'" ')


def test_pull_goes_through_the_sync_account_with_strict_host_keys(raw):
    peer = _settings(raw, "pc01", lan_address="10.0.0.1", lan_ssh_port=22)
    command = dataset_pull.pull_command(
        peer, "/srv/datasets/m", "/srv/datasets/m", "/etc/labfleet/dataset-pull/id_m", "/kh", ["-r"]
    )
    assert "labfleet-sync@10.0.0.1:./ /srv/datasets/m/" in command
    assert "StrictHostKeyChecking=yes" in command and "UserKnownHostsFile=/kh" in command


def test_lan_address_defaults_to_the_inventory_address(raw):
    plain = _settings(raw, "pc01", ssh_hostname="192.168.1.5", ssh_port=2200)
    assert (plain.lan_address, plain.lan_ssh_port) == ("192.168.1.5", 2200)
    named = _settings(raw, "pc01.lab")
    assert (named.lan_address, named.lan_ssh_port) == ("pc01.lab", 22)
    # A published test port means nothing to the other hosts: lan_address resets it to 22.
    bridged = _settings(raw, "pc01", ssh_hostname="127.0.0.1", ssh_port=32771, lan_address="172.17.0.3")
    assert (bridged.lan_address, bridged.lan_ssh_port) == ("172.17.0.3", 22)


def test_pulls_are_ordered_by_depth_and_circles_are_refused(raw):
    def with_datasets(name, **sources):
        return _settings(raw, name, datasets=sources)

    fleet = {
        "pc01": with_datasets("pc01", ref="manual"),
        "pc02": with_datasets("pc02", ref="host:pc01:/srv/datasets/ref"),
        "pc03": with_datasets("pc03", ref="host:pc02:/srv/datasets/ref", other="host:pc01:/data/other"),
    }
    depth = {(h, d.name): dataset_pull.pull_depth(fleet, h, d) for h, s in fleet.items() for d in s.datasets}
    assert depth == {("pc01", "ref"): 0, ("pc02", "ref"): 1, ("pc03", "ref"): 2, ("pc03", "other"): 1}

    circle = {
        "pc01": with_datasets("pc01", ref="host:pc02:/srv/datasets/ref"),
        "pc02": with_datasets("pc02", ref="host:pc01:/srv/datasets/ref"),
    }
    with pytest.raises(PyinfraError, match="pull from each other in a circle"):
        dataset_pull.pull_depth(circle, "pc01", circle["pc01"].datasets[0])


def test_rsync_itemized_output_is_split_into_changes_and_errors():
    parsed = parse_rsync_itemized(
        [
            ">f+++++++++ d00/s0/f0000.bin",
            "cd+++++++++ d01/",
            ".f...p..... big.bin",
            "*deleting   old.txt",
            "rsync: [sender] link_stat failed: No such file or directory (2)",
            "labfleet-rc=23",
        ]
    )
    assert parsed["rc"] == 23
    assert len(parsed["changes"]) == 4
    assert parsed["errors"] == ["rsync: [sender] link_stat failed: No such file or directory (2)"]
    assert parse_rsync_itemized(["labfleet-rc=0"]) == {"rc": 0, "changes": [], "errors": []}


def test_acl_and_manifest_facts_parse_their_output():
    acls = DefaultAcls().process(
        [
            "labfleet-acl-of /srv/datasets",
            "user::rwx",
            "group::r-x",
            "other::r-x",
            "",
            "labfleet-acl-of /srv/datasets/a b",
            "default:user::rwx",
            "default:group::rwx",
            "default:other::r-x",
            "labfleet-acl-of /srv/datasets/none",
        ]
    )
    assert acls == {
        "/srv/datasets": ("user::rwx", "group::r-x", "other::r-x"),
        "/srv/datasets/a b": ("user::rwx", "group::rwx", "other::r-x"),
        "/srv/datasets/none": (),
    }
    assert DefaultAcls().process([]) == {}
    assert ManifestState().process(["manifest abc", "stamp"]) == {"manifest": "abc", "stamp": None}
    assert ManifestState().process(["manifest abc", "stamp abc"]) == {"manifest": "abc", "stamp": "abc"}


def test_each_source_kind_has_one_entry_in_the_table(raw):
    assert set(datasets.SOURCE_KINDS) == {"manual", "local", "host", "nfs", "s3"}
    assert [kind for kind, entry in datasets.SOURCE_KINDS.items() if entry.mounted] == ["nfs"]
    fleet = _settings(
        raw,
        "pc02",
        datasets={"a": "manual", "b": "host:pc01:/srv/datasets/b", "c": "nfs:nas.lab:/export/c"},
    )
    assert datasets._packages(fleet, serves_pulls=False) == ["acl", "rsync", "openssh-client", "nfs-common"]
    assert datasets._packages(_settings(raw, "pc01"), serves_pulls=True) == ["acl", "rsync"]


def test_a_pull_chain_longer_than_the_rounds_stops_the_run(raw):
    fleet = {"pc1": _settings(raw, "pc1", datasets={"ref": "manual"})}
    for index in range(2, 6):
        fleet[f"pc{index}"] = _settings(raw, f"pc{index}", datasets={"ref": f"host:pc{index - 1}:/srv/datasets/ref"})
    with pytest.raises(PyinfraError) as stopped:
        dataset_pull.pull_rounds(fleet)
    assert str(stopped.value) == (
        "host pc5: datasets.ref.source = 'host:pc4:/srv/datasets/ref' is pulled through a chain of 4 hosts; "
        "at most 3 are supported: let some hosts pull from the first peer instead"
    )
    del fleet["pc5"]
    assert dataset_pull.pull_rounds(fleet) == 3


# --- the failures an operation finds while it runs: each fails its host with one line --------


def _fails_with(commands: list) -> str:
    """Run the one command an operation yielded; it must fail, and say one line on stderr."""
    assert len(commands) == 1, commands
    ran = subprocess.run(["sh", "-c", str(commands[0])], capture_output=True, text=True, check=False)
    assert ran.returncode == 1 and ran.stdout == ""
    (line,) = ran.stderr.splitlines()
    assert line.startswith("labfleet: host pc01: ")
    return line.removeprefix("labfleet: ")


class _Peer:
    """Another inventory host, as an operation sees it: a name and its SSH host key."""

    def __init__(self, name, key=None):
        self.name, self.key = name, key

    def get_fact(self, fact, **kwargs):
        return self.key


def _peers(fake, keys=None, failed=()):
    """Give a FakeHost an inventory of peers (with their SSH host keys) and failed hosts."""
    peers = {name: _Peer(name, key) for name, key in (keys or {}).items()}
    for name in failed:
        peers.setdefault(name, _Peer(name))
    fake.inventory = SimpleNamespace(get_host=lambda name: peers[name])
    fake.state.failed_hosts = {peers[name] for name in failed}
    return fake


def test_a_push_runs_rsync_at_once_and_a_host_without_rsync_fails_with_what_to_check(fake_host_in, monkeypatch):
    """The step plans a push only for a dataset whose record differs: no dry run comes first."""
    fake = fake_host_in(dataset_push)
    fake.data, fake.current_op_global_arguments = {"ssh_hostname": "127.0.0.1"}, {"_sudo": True}
    called = []
    monkeypatch.setattr(dataset_push.subprocess, "run", lambda argv, **kwargs: called.append(argv))
    pushes = [("/data/m", "/srv/datasets/m", ["--recursive", "--itemize-changes"], "/s", "/r", None)]
    remove, transfer = list(dataset_push.push_datasets._inner(pushes=pushes))
    assert remove == "rm -f /s /r" and called == [], "something ran while planning"
    (jobs,) = transfer.args
    ((argv, what, files),) = jobs
    assert "--dry-run" not in argv and argv[-2:] == ["/data/m/", "127.0.0.1:/srv/datasets/m/"]
    assert what == "push /data/m -> /srv/datasets/m" and files is None and "--recursive" in argv

    closed = subprocess.CompletedProcess(
        [], 12, b"", b"sudo: rsync: command not found\nrsync: connection unexpectedly closed"
    )
    monkeypatch.setattr(dataset_push.subprocess, "run", lambda argv, **kwargs: closed)
    logs = _Logs()
    assert dataset_push._run_rsync(None, logs, argv, what) is False
    assert logs.lines[-1] == (
        "labfleet: host pc01: push /data/m -> /srv/datasets/m failed (rsync exit 12): sudo: rsync: command not found "
        "rsync: connection unexpectedly closed; check that rsync is installed on both sides and that the SSH "
        "settings of this host work, then run again: what arrived is whole and is not sent twice"
    )


def test_a_peer_without_rrsync_fails_and_says_to_upgrade_rsync(fake_host_in):
    fake_host_in(dataset_pull, {Which: None})
    pullers = [("pc02", "/etc/labfleet/dataset-pull/id_m", "/srv/datasets/m", None)]
    line = _fails_with(list(dataset_pull.authorize_pullers._inner(path="/k", pullers=pullers)))
    assert "rrsync is missing, so peers cannot pull datasets from it" in line and line.endswith("upgrade rsync")


def test_a_peer_without_an_ssh_host_key_fails_only_the_puller(fake_host_in):
    fake = _peers(fake_host_in(dataset_pull), keys={"pc02": None})
    line = _fails_with(list(dataset_pull.trust_peer_host_keys._inner(path="/kh", peers=[("pc02", "10.0.0.2", 22)])))
    assert line == (
        "host pc01: the peer pc02 has no SSH host key in /etc/ssh, so pc01 cannot check whom it pulls from; "
        "install openssh-server on pc02 (or run ssh-keygen -A there)"
    )
    assert fake.noops == []


def test_a_pull_from_a_failed_or_unreachable_peer_fails_the_puller(fake_host_in):
    pulls = [("pc02", "/srv/datasets/m", "rsync ...", "/srv/datasets/m", "/s")]
    _peers(fake_host_in(dataset_pull), failed=["pc02"])
    line = _fails_with(list(dataset_pull.pull_datasets._inner(pulls=pulls)))
    assert line == (
        "host pc01: the peer pc02 failed earlier in this run, so /srv/datasets/m was not pulled; "
        "fix what stopped pc02 (its error is above) and run again"
    )

    refused = {"rc": 255, "changes": [], "errors": ["ssh: connect to host 10.0.0.2 port 22: Connection refused"]}
    _peers(fake_host_in(dataset_pull, {RsyncDryRun: refused}), keys={"pc02": "ssh-ed25519 K"})
    line = _fails_with(list(dataset_pull.pull_datasets._inner(pulls=pulls)))
    assert line == (
        "host pc01: cannot pull pc02:/srv/datasets/m (rsync exit 255): ssh: connect to host 10.0.0.2 port 22: "
        "Connection refused; check lan_address / lan_ssh_port of pc02 and that pc01 reaches it"
    )


def test_a_missing_manifest_fails_the_host(fake_host_in):
    fake_host_in(dataset_state, {ManifestState: {"manifest": None, "stamp": None}})
    commands = list(
        dataset_state.verify_manifest._inner(
            directory="/srv/datasets/m", manifest="SHA256SUMS", stamp="/s", label="dataset m"
        )
    )
    assert (
        _fails_with(commands)
        == "host pc01: dataset m has no manifest SHA256SUMS; add it to the source or drop manifest"
    )


class _Logs:
    """A host as _run_rsync sees it: a name and where its log lines go."""

    name = "pc01"

    def __init__(self):
        self.lines = []

    def log_styled(self, message, **kwargs):
        self.lines.append(message)


def test_a_push_of_what_changed_gives_rsync_only_those_paths(tmp_path, fake_host_in):
    """With the paths that changed since the host's record, rsync is given them on its input,
    and no directory recursion; with none, it does not run."""
    fake = fake_host_in(dataset_push)
    fake.data, fake.current_op_global_arguments = {"ssh_hostname": "127.0.0.1"}, {"_sudo": True}
    listed = b"d1/new line.bin\0d2/b.bin\0"
    pushes = [("/data/m", "/srv/datasets/m", ["--recursive", "--links", "--itemize-changes"], "/s", "/r", listed)]
    _, transfer = list(dataset_push.push_datasets._inner(pushes=pushes))
    ((argv, what, files),) = transfer.args[0]
    assert files == listed and "--recursive" not in argv
    assert argv[:5] == ["rsync", "--dirs", "--links", "--itemize-changes", "--files-from=-"] and "--from0" in argv

    # A stand-in rsync that prints what it was given, as itemized lines: both paths arrive whole.
    stand_in = ["sh", "-c", "tr '\\0' '\\n' | sed 's/^/>f+++++++++ /'"]
    logs = _Logs()
    assert dataset_push._run_rsync(None, logs, stand_in, what, files) is True
    assert logs.lines == [f"{what}: 2 item(s) synced"]
    assert dataset_push._run_rsync(None, logs, ["false"], what, b"") is True
    assert logs.lines[-1] == f"{what}: nothing changed since the last verified sync"


def test_pushes_to_one_host_overlap_up_to_the_bound(tmp_path, monkeypatch):
    """Stand-in rsyncs (sh) that each wait, a bounded number of times, until two are running:
    with one at a time they would each give up alone."""
    monkeypatch.setattr(dataset_push, "PARALLEL_PUSHES", 2)
    running, seen = tmp_path / "running", tmp_path / "seen"
    running.mkdir()
    seen.mkdir()
    script = (
        'touch "$R/$1"; for i in $(seq 50); do [ "$(ls "$R" | wc -l)" -ge 2 ] && break; sleep 0.02; done; '
        'ls "$R" | wc -l > "$S/$1"; sleep 0.1; rm "$R/$1"; echo ">f+++++++++ $1"'
    )
    jobs = [(["env", f"R={running}", f"S={seen}", "sh", "-c", script, "sh", f"job{n}"], f"push {n}") for n in range(4)]
    logs = _Logs()
    assert dataset_push._run_rsyncs(None, logs, jobs) is True
    counts = [int((seen / f"job{n}").read_text()) for n in range(4)]
    assert max(counts) == 2, counts
    assert sorted(logs.lines) == [f"push {n}: 1 item(s) synced" for n in range(4)]

    failing = [*jobs[:1], (["sh", "-c", "echo 'rsync: connection closed' >&2; exit 12"], "push broken")]
    assert dataset_push._run_rsyncs(None, logs, failing) is False
    assert any("push broken failed (rsync exit 12): rsync: connection closed" in line for line in logs.lines)


def test_public_key_files_reads_each_key_in_one_command():
    fact = PublicKeyFiles()
    assert "'/a b.pub'" in fact.command(paths=("/a b.pub", "/c.pub")) and fact.command(paths=()) == "true"
    mark = PublicKeyFiles.MARK
    output = [f"{mark}/a b.pub", "# a comment", "ssh-ed25519 AAAA x@pc02", f"{mark}/c.pub"]
    assert fact.process(output) == {"/a b.pub": "ssh-ed25519 AAAA x@pc02", "/c.pub": None}
    # A key file without its final newline shares its line with the next mark.
    assert fact.process([f"{mark}/a", f"ssh-ed25519 K c{mark}/b", "ssh-rsa R d"]) == {
        "/a": "ssh-ed25519 K c",
        "/b": "ssh-rsa R d",
    }


def test_the_trust_is_planned_only_where_a_host_lacks_something(raw, monkeypatch):
    """Decided from the planning batches (this host's facts from its own; a peer's host key and a
    puller's public key from theirs), and all three operations or none: hosts that plan them share
    them, which keeps a new key's making before its peer reads it."""
    fleet = {
        "pc01": _settings(raw, "pc01", lan_address="10.0.0.1", datasets={"ref": "manual"}),
        "pc02": _settings(raw, "pc02", lan_address="10.0.0.2", datasets={"ref": "host:pc01:/srv/datasets/ref"}),
    }
    monkeypatch.setattr(dataset_state, "_all_settings", lambda: fleet)
    public = "/etc/labfleet/dataset-pull/id_ref.pub"
    key = "ssh-ed25519 AAAA labfleet-pull:ref@pc02"
    batches = {"pc01": {dataset_pull.HOST_KEY.key: "ssh-ed25519 HOST"}, "pc02": {}}
    batches["pc02"][dataset_pull._keys_read(fleet["pc02"]).key] = {public: key}
    monkeypatch.setattr(dataset_pull, "_reading_of", lambda name, read: batches[name].get(read.key))
    planned: list[str] = []
    monkeypatch.setattr(
        dataset_pull, "unless_current", lambda op, current, **kwargs: current or planned.append(kwargs["name"])
    )
    line = dataset_pull.authorized_key_line(key, "/srv/datasets/ref", "10.0.0.2", "/usr/bin/rrsync")
    files = {
        dataset_pull.AUTHORIZED_KEYS: ("labfleet-sync", "600", f"{line}\n"),
        dataset_pull.KNOWN_HOSTS: ("root", "644", "10.0.0.1 ssh-ed25519 HOST\n"),
    }
    paths = {
        path: {"kind": "file", "user": user, "group": user, "mode": mode, "sha1": text_sha1(text)}
        for path, (user, mode, text) in files.items()
    }
    found = {"pc01": {"rrsync": "/usr/bin/rrsync", "authorized": [line]}, "pc02": {"pull_keys": {public: key}}}

    def plan(name: str, **changed) -> list[str]:
        state = dataset_state.DatasetsState({}, {}, paths, {}, {}, {}, {}, **{**found[name], **changed})
        monkeypatch.setattr(dataset_pull.planning, "snapshot", lambda state_class, reads: state)
        planned.clear()
        dataset_pull._prepare_pulls(fleet[name], fleet)
        return list(planned)

    every = [
        "Make the keys that pull datasets from peers",
        "Trust the host keys of the dataset peers",
        "Let peers pull datasets from this host, read-only",
    ]
    assert plan("pc01") == [] and plan("pc02") == []
    assert plan("pc01", rrsync=None) == every
    assert plan("pc01", authorized=[]) == [], "only the file's sha1 decides, as files.put does"
    assert plan("pc02", pull_keys={}) == every
    batches["pc02"][dataset_pull._keys_read(fleet["pc02"]).key] = {public: None}
    assert plan("pc01") == every, "a puller's new key is not authorized yet"
    batches["pc01"][dataset_pull.HOST_KEY.key] = "ssh-ed25519 NEW"
    assert plan("pc02", pull_keys={public: key}) == every, "the peer's host key changed"


def test_a_peers_reading_comes_from_its_batch_once_it_arrives_else_from_it_once_per_run(planning_host, monkeypatch):
    fake = planning_host({SshHostKey: "ssh-ed25519 READ"})
    monkeypatch.setattr(dataset_pull, "host", fake)
    fake.inventory, fake.state.activated_hosts = fake.state.inventory, {fake}
    # pyinfra plans the hosts side by side: the peer's planning has begun, and its batch
    # arrives while this host waits.
    planning.current_run().for_host("pc02")
    gevent.spawn_later(
        0.05,
        lambda: (
            planning.current_run().for_host("pc02").readings.update({dataset_pull.HOST_KEY.key: "ssh-ed25519 BATCH"})
        ),
    )
    assert dataset_pull._reading_of("pc02", dataset_pull.HOST_KEY) == "ssh-ed25519 BATCH"
    assert fake.reads == [], "the peer was read although its batch came"
    # A host in the run whose planning has not begun (pyinfra's pool is full until this one
    # ends) is read at once: waiting for it would stall both.
    monkeypatch.setattr(dataset_pull.gevent, "sleep", lambda seconds: pytest.fail("waited for pc04"))
    assert dataset_pull._reading_of("pc04", dataset_pull.HOST_KEY) == "ssh-ed25519 READ"
    assert fake.reads == [SshHostKey]
    # A host that this run does not plan is read itself, once.
    fake.state.activated_hosts = set()
    assert dataset_pull._reading_of("pc03", dataset_pull.HOST_KEY) == "ssh-ed25519 READ"
    assert dataset_pull._reading_of("pc03", dataset_pull.HOST_KEY) == "ssh-ed25519 READ"
    assert fake.reads == [SshHostKey, SshHostKey]


def test_the_trust_operations_say_why_they_have_nothing_to_do(fake_host_in):
    """Planned on every host once one host plans them (they are a barrier in pyinfra's order)."""
    fake = fake_host_in(dataset_pull, {PublicKeyFile: "ssh-ed25519 AAAA labfleet-pull:x@pc02"})
    assert list(dataset_pull.ensure_pull_keys._inner(keys=[])) == []
    assert list(dataset_pull.ensure_pull_keys._inner(keys=[("/etc/labfleet/dataset-pull/id_x", "c")])) == []
    assert list(dataset_pull.trust_peer_host_keys._inner(path="/root/.ssh/known_hosts", peers=[])) == []
    assert list(dataset_pull.authorize_pullers._inner(path="/home/labsync/.ssh/authorized_keys", pullers=[])) == []
    assert fake.noops == [
        "this host pulls no dataset",
        "the pull keys already exist",
        "this host pulls no dataset",
        "no host pulls a dataset from this one",
    ]
