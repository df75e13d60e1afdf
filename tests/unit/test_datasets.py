"""labfleet/datasets.py without hosts: rsync and ssh command lines, peer trust, pull order, NFS units.

The NFS source is tested here only: the kernel of the e2e test hosts has no NFS client, so
no mount can happen there (see tests/e2e/test_datasets.py).
"""

import shutil
import subprocess

import pytest
from pyinfra.api.exceptions import PyinfraError

from labfleet import datasets
from labfleet.facts.datasets import DefaultAcl, ManifestState, parse_rsync_itemized
from labfleet.settings import Dataset, build


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
    assert datasets.mount_unit_name(path) == unit
    if shutil.which("systemd-escape"):
        escaped = subprocess.run(["systemd-escape", "--path", "--suffix=mount", path], capture_output=True, text=True)
        assert escaped.stdout.strip() == unit


def test_nfs_unit_mounts_read_only_and_is_enabled_at_boot():
    dataset = Dataset("imagenet", "nfs:nas.lab:/export/imagenet")
    unit = datasets.nfs_mount_unit(dataset, "/srv/datasets/imagenet")
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
    flags = datasets.rsync_flags(Dataset("d", "manual", readonly=readonly), "labdata")
    assert "--delete" not in flags
    assert not {"--inplace", "--partial", "--append"} & set(flags)
    assert f"--chmod={chmod}" in flags
    assert "--chown=root:labdata" in flags and "--itemize-changes" in flags
    assert "--delete" in datasets.rsync_flags(Dataset("d", "manual", prune=True), "labdata")


def test_push_uses_the_hosts_own_ssh_settings():
    data = {
        "ssh_hostname": "10.1.2.3",
        "ssh_port": 2222,
        "ssh_user": "admin",
        "ssh_key": "/keys/id_ed25519",
        "ssh_known_hosts_file": "/keys/known_hosts",
        "ssh_strict_host_key_checking": "yes",
    }
    argv = datasets.push_command(data, "pc01", "/data/mnist/", "/srv/datasets/mnist", ["-r"], sudo=True)
    assert argv[-2:] == ["/data/mnist/", "admin@10.1.2.3:/srv/datasets/mnist/"]
    rsh = argv[argv.index("--rsh") + 1]
    for option in ("-p 2222", "-i /keys/id_ed25519", "UserKnownHostsFile=/keys/known_hosts"):
        assert option in rsh
    assert "StrictHostKeyChecking=yes" in rsh and "BatchMode=yes" in rsh
    assert argv[argv.index("--rsync-path") + 1] == "sudo -n rsync"


def test_push_without_sudo_and_to_an_ipv6_host():
    argv = datasets.push_command({"ssh_hostname": "fd00::5"}, "pc01", "/d", "/srv/datasets/d", [], sudo=False)
    assert "--rsync-path" not in argv
    assert argv[-1] == "[fd00::5]:/srv/datasets/d/"


def test_authorized_key_allows_one_read_only_rrsync_from_one_address():
    line = datasets.authorized_key_line(
        "ssh-ed25519 AAAAC3 labfleet-pull:mnist@pc02", "/srv/datasets/mnist", "10.0.0.2", "/usr/bin/rrsync"
    )
    assert line == (
        'restrict,from="10.0.0.2",command="/usr/bin/rrsync -ro /srv/datasets/mnist" '
        "ssh-ed25519 AAAAC3 labfleet-pull:mnist@pc02"
    )
    odd = datasets.authorized_key_line("ssh-ed25519 K c", '/data/a "b"', None, "/usr/bin/rrsync")
    assert odd.startswith('restrict,command="/usr/bin/rrsync -ro \'/data/a \\"b\\"\'" ')


def test_pull_goes_through_the_sync_account_with_strict_host_keys(raw):
    peer = _settings(raw, "pc01", lan_address="10.0.0.1", lan_ssh_port=22)
    command = datasets.pull_command(
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
    depth = {(h, d.name): datasets.pull_depth(fleet, h, d) for h, s in fleet.items() for d in s.datasets}
    assert depth == {("pc01", "ref"): 0, ("pc02", "ref"): 1, ("pc03", "ref"): 2, ("pc03", "other"): 1}

    circle = {
        "pc01": with_datasets("pc01", ref="host:pc02:/srv/datasets/ref"),
        "pc02": with_datasets("pc02", ref="host:pc01:/srv/datasets/ref"),
    }
    with pytest.raises(PyinfraError, match="pull from each other in a circle"):
        datasets.pull_depth(circle, "pc01", circle["pc01"].datasets[0])


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
    acl = DefaultAcl().process(["present", "user::rwx", "group::rwx", "other::r-x", ""])
    assert acl == ("user::rwx", "group::rwx", "other::r-x")
    assert DefaultAcl().process(["present"]) == ()
    assert DefaultAcl().process([]) is None
    assert ManifestState().process(["manifest abc", "stamp"]) == {"manifest": "abc", "stamp": None}
    assert ManifestState().process(["manifest abc", "stamp abc"]) == {"manifest": "abc", "stamp": "abc"}
