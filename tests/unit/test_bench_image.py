"""bench/image_sizes.py and bench/image_report.py: the image bench's arithmetic and tables, without an engine."""

import pytest

from bench import image_sizes
from bench.image_report import NOTES_END, _rounds, kept_notes, render, write_report

BASE = 256_000_000
# `docker history --format '{{.Size}}\t{{.CreatedBy}}'` of a small image, newest first, as the
# legacy builder writes it: metadata steps are #(nop), COPY is #(nop) COPY, an empty slice's RUN is 0.
HISTORY = "\n".join(
    [
        '0\t/bin/sh -c #(nop)  CMD ["start-notebook.sh"]',
        "900\t|5 LOCK=jupyter /bin/sh -c set -eu;     /opt/venv/bin/pip check",
        "7613\t/bin/sh -c #(nop) COPY dir:9c4b in /usr/local/bin/ ",
        "0\t/bin/sh -c #(nop)  ENV LABFLEET_PROFILE=jupyter",
        "15470720\t|5 LOCK=jupyter /bin/sh -c sh /labfleet-install-layer.sh /labfleet-lock-02.txt",
        "1510\t/bin/sh -c #(nop) COPY file:08a8 in /labfleet-lock-02.txt ",
        "0\t|5 LOCK=jupyter /bin/sh -c sh /labfleet-install-layer.sh /labfleet-lock-01.txt",
        "170\t/bin/sh -c #(nop) COPY file:c189 in /labfleet-lock-01.txt ",
        "0\t/bin/sh -c #(nop)  ARG LOCK=pytorch-cu128",
        "131818566\t|1 SOURCE_DATE_EPOCH=1767225600 /bin/sh -c set -eux;     apt-get update",
        f"{BASE}\t",
    ]
)
DIGESTS = [f"sha256:{n:064x}" for n in range(1, 8)]


def test_layers_pair_history_with_rootfs_and_drop_the_empty_slices():
    layers = image_sizes.layers(HISTORY, DIGESTS)
    assert [layer.step for layer in layers] == [
        "base image",
        "RUN set -eux; apt-get update",
        "COPY /labfleet-lock-01.txt",
        "COPY /labfleet-lock-02.txt",
        "RUN install-layer.sh 02.txt",
        "COPY /usr/local/bin/",
        "RUN set -eu; /opt/venv/bin/pip check",
    ]
    assert [layer.slot for layer in layers] == [None, None, 1, 2, 2, None, None]
    assert layers[0].size == BASE and layers[4].size == 15470720
    assert [layer.digest for layer in layers] == DIGESTS


def test_layers_refuse_a_history_that_does_not_match_the_rootfs():
    with pytest.raises(ValueError, match="docker history names 7 layers, RootFS has 6"):
        image_sizes.layers(HISTORY, DIGESTS[:6])


def test_compare_counts_the_layers_a_holder_of_the_old_image_lacks():
    old = image_sizes.layers(HISTORY, DIGESTS)
    new_digests = [*DIGESTS[:4], "sha256:" + "e" * 64, DIGESTS[5], "sha256:" + "f" * 64]
    difference = image_sizes.compare(old, image_sizes.layers(HISTORY, new_digests))
    assert [layer.index for layer in difference.changed] == [5, 7]
    assert difference.changed_bytes == 15470720 + 900 and difference.total == 7
    assert difference.share == pytest.approx((15470720 + 900) / sum(layer.size for layer in old))


def _survey(**overrides) -> image_sizes.Survey:
    survey: image_sizes.Survey = {
        "python": "3.13",
        "packages": [
            {"name": "torch", "version": "2.10.0", "bytes": 1_700_000_000, "files": 10, "bytecode": 30_000_000},
            {"name": "comm", "version": "0.2.3", "bytes": 20_000, "files": 5, "bytecode": 8_000},
        ],
        "venv_other": 800_000,
        "rootfs": 2_000_000_000,
    }
    survey.update(overrides)  # type: ignore[typeddict-item]
    return survey


def test_the_floor_is_the_installed_wheels_plus_the_base():
    floor = image_sizes.floor(_survey(), image_size=2_100_000_000, base_size=BASE)
    assert floor.wheels == 1_700_020_000 and floor.bytecode == 30_008_000
    assert floor.floor == BASE + 1_700_020_000
    assert floor.ratio == pytest.approx(2_100_000_000 / (BASE + 1_700_020_000))
    assert floor.shadowed == 100_000_000
    assert floor.rest == 2_100_000_000 - floor.floor - 30_008_000 - 800_000


def test_parse_survey_takes_the_json_line_after_any_warning():
    text = 'warning: something\n{"python": "3.13", "packages": [], "venv_other": 1, "rootfs": 2}\n'
    assert image_sizes.parse_survey(text)["rootfs"] == 2
    with pytest.raises(ValueError, match="no survey"):
        image_sizes.parse_survey("Traceback (most recent call last):\n")


def test_slices_by_package_group_largest_first():
    packages = [*_survey()["packages"], {"name": "nbformat", "version": "5", "bytes": 9, "files": 1, "bytecode": 0}]
    grouped = image_sizes.slices_by_package(packages, lambda name: 11 if name == "torch" else 17)
    assert {slot: [p["name"] for p in items] for slot, items in grouped.items()} == {
        11: ["torch"],
        17: ["comm", "nbformat"],
    }


def _result() -> dict:
    layers = image_sizes.layers(HISTORY, DIGESTS)
    floor = image_sizes.floor(_survey(), image_size=2_100_000_000, base_size=BASE)
    return {
        "tag": "labfleet-bench/jupyterlab:pytorch-abc",
        "base": "labfleet-test/debian:trixie-x",
        "python": "3.13",
        "date": "2026-12-02 15:00 UTC",
        "floor": {"image": floor.image, "base": floor.base, "wheels": floor.wheels, "bytecode": floor.bytecode,
                  "venv_other": floor.venv_other, "rootfs": floor.rootfs, "shadowed": floor.shadowed,
                  "floor": floor.floor, "ratio": floor.ratio, "rest": floor.rest},
        "packages": [{**p, "slot": 2} for p in _survey()["packages"]],
        "layers": [layer.__dict__ for layer in layers],
    }  # fmt: skip


def test_the_report_states_each_goal_with_its_figures():
    rebuild = {
        "lock": "pytorch-cu128",
        "date": "2026-12-02 15:00 UTC",
        "cores": 2,
        "cold": {"seconds": 400.0},
        "unchanged": {"seconds": 4.0},
        "bump": {
            "seconds": 20.0, "ratio_to_cold": 0.05, "package": "jupyterlab-pygments", "from": "0.3.0",
            "to": "0.2.2", "slot": 18, "layers_changed": 2, "layers_total": 45, "bytes_changed": 16_000_000,
            "share_of_image": 0.002, "changed": [{"index": 44, "step": "RUN install-layer.sh 18.txt", "size": 1}],
        },
    }  # fmt: skip
    anchors = [{"name": "docker-stacks x", "bytes": 4_200_000_000, "kind": "uncompressed", "source": "https://e.x"}]
    text = render({"locks": {"pytorch-cu128": _result()}, "rebuild": rebuild}, anchors)
    assert "| pytorch-cu128 | 3.13 | 2.10 GB | 0.26 GB | 1.70 GB | 1.96 GB | **1.074x**" in text
    assert "**1.074x** its floor, misses the goal" in text
    assert "| docker-stacks x | 4.20 GB | uncompressed | 0.50x (pytorch-cu128) | <https://e.x> |" in text
    assert "5.0%, meets the goal" in text and "**2 of 45**" in text
    assert "| 5 | RUN install-layer.sh 02.txt | 15.5 MB |" in text and "2: torch, comm" in text
    assert "| torch | 2.10.0 | 02 | 1,700.0 MB | 30.0 MB |" in text


def test_the_report_says_what_is_not_measured_yet():
    assert "Not measured yet: `./run bench image --rebuild`." in render({"locks": {}, "rebuild": None}, [])


def test_the_report_gives_each_round_of_the_bump_and_their_median():
    bump = {"seconds": 21.0, "rounds": [{"seconds": 24.6}, {"seconds": 21.0}, {"seconds": 19.5}]}
    assert _rounds(bump) == "median of 3 rounds (24.6, 21.0, 19.5 s)"
    assert _rounds({"seconds": 24.6}) == "one round"


def test_notes_written_by_hand_survive_a_rewrite(tmp_path):
    report = tmp_path / "IMAGE.md"
    write_report({"locks": {}, "rebuild": None}, report, [])
    report.write_text(report.read_text().replace(NOTES_END, "The bytecode is the excess.\n" + NOTES_END))
    write_report({"locks": {}, "rebuild": None}, report, [])
    assert kept_notes(report.read_text()).strip() == "The bytecode is the excess."
