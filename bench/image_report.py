"""bench/IMAGE.md from bench/image.json: the image bench's tables (bench/image.py)."""

from __future__ import annotations

from pathlib import Path

GB = 1000**3
MB = 1000**2
FLOOR_GOAL = 1.05
REBUILD_GOAL = 0.10
# Packages of a slice listed by name in the layer table; the per-package table has them all.
LAYER_NAMES = 12
# The findings written by hand after a run sit between these; the bench keeps them when it rewrites the file.
NOTES_START = "<!-- notes: written by hand, kept by the bench -->"
NOTES_END = "<!-- end of notes -->"


def gb(value: float) -> str:
    return f"{value / GB:.2f} GB"


def mb(value: float) -> str:
    return f"{value / MB:,.1f} MB"


def _verdict(value: float, goal: float) -> str:
    return "meets the goal" if value <= goal else "misses the goal"


def other_layers(result: dict) -> int:
    """The bytes of the layers that are neither the base nor a slice's install: the apt layer, COPYs, the last RUN."""
    return sum(
        layer["size"]
        for layer in result["layers"]
        if layer["index"] > 1 and not (layer["slot"] is not None and layer["step"].startswith("RUN"))
    )


def summary(locks: dict) -> list[str]:
    lines = [
        "| lock | Python | image | base | wheels installed | floor (base + wheels) | **image / floor** "
        "| bytecode | venv's own files | other layers (apt, config) | hidden: deleted or replaced above |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lock, r in locks.items():
        f = r["floor"]
        lines.append(
            f"| {lock} | {r['python']} | {gb(f['image'])} | {gb(f['base'])} | {gb(f['wheels'])} | {gb(f['floor'])} "
            f"| **{f['ratio']:.3f}x** | {mb(f['bytecode'])} | {mb(f['venv_other'])} | {mb(other_layers(r))} "
            f"| {mb(f['shadowed'])} |"
        )
    return lines


def anchors_table(locks: dict, anchors: list[dict]) -> list[str]:
    ours = [(lock, r["floor"]["image"]) for lock, r in locks.items() if lock.startswith("pytorch")]
    lines = [
        "| image | size | what the size is | ours / it | source |",
        "|---|---|---|---|---|",
    ]
    for lock, size in ours:
        lines.append(
            f"| labfleet {lock} (this run) | {gb(size)} | uncompressed, `docker image inspect .Size` | 1.00x "
            "| bench/image.json |"
        )
    for anchor in anchors:
        ratios = ", ".join(f"{size / anchor['bytes']:.2f}x ({lock})" for lock, size in ours) or "-"
        lines.append(
            f"| {anchor['name']} | {gb(anchor['bytes'])} | {anchor['kind']} | {ratios} | <{anchor['source']}> |"
        )
    return lines


def _rounds(bump: dict) -> str:
    rounds = bump.get("rounds") or [bump]
    if len(rounds) == 1:
        return "one round"
    seconds = ", ".join(f"{r['seconds']:.1f}" for r in rounds)
    return f"median of {len(rounds)} rounds ({seconds} s)"


def rebuild_section(rebuild: dict | None) -> list[str]:
    if not rebuild:
        return ["Not measured yet: `./run bench image --rebuild`."]
    cold, unchanged, bump = rebuild["cold"], rebuild["unchanged"], rebuild["bump"]
    changed = (
        ", ".join(f"{layer['index']} ({layer['step']}, {mb(layer['size'])})" for layer in bump["changed"]) or "none"
    )
    return [
        f"Measured {rebuild['date']} on {rebuild['cores']} cores shared with other work (load average before/after "
        f"each build in bench/image.json), lock {rebuild['lock']}, wheels read from the local test wheel cache "
        "(127.0.0.1), so the times are the build's own work: pip's hash checks and unpacking, bytecode, "
        "the layer commits; no download.",
        "",
        "| build | seconds | ratio to the cold build |",
        "|---|---|---|",
        f"| cold (`--no-cache`) | {cold['seconds']:.1f} | 1.000 |",
        f"| unchanged (every layer from the cache) | {unchanged['seconds']:.1f} "
        f"| {unchanged['seconds'] / cold['seconds']:.3f} |",
        f"| one-package bump: {bump['package']} {bump['from']} -> {bump['to']} (layer {bump['slot']:02d}), "
        f"{_rounds(bump)} | {bump['seconds']:.1f} | **{bump['ratio_to_cold']:.3f}** |",
        "",
        f"Goal: a rebuild after such a bump at most {REBUILD_GOAL:.0%} of the cold build: "
        f"{bump['ratio_to_cold']:.1%}, {_verdict(bump['ratio_to_cold'], REBUILD_GOAL)}.",
        "",
        f"Layers of the bumped image whose digest the cold image does not have: **{bump['layers_changed']} of "
        f"{bump['layers_total']}**, {mb(bump['bytes_changed'])} uncompressed, {bump['share_of_image']:.3%} of the "
        f"image's layer bytes: {changed}. A host holding the cold image receives only these.",
    ]


def layers_table(result: dict) -> list[str]:
    by_slot: dict[int, list[dict]] = {}
    for package in result["packages"]:
        by_slot.setdefault(package["slot"], []).append(package)
    lines = ["| # | step | size | digest | packages (largest first) |", "|---|---|---|---|---|"]
    for layer in result["layers"]:
        names = ""
        if layer["slot"] is not None and layer["step"].startswith("RUN"):
            packages = by_slot.get(layer["slot"], [])
            shown = ", ".join(p["name"] for p in packages[:LAYER_NAMES])
            more = f" and {len(packages) - LAYER_NAMES} more" if len(packages) > LAYER_NAMES else ""
            names = f"{len(packages)}: {shown}{more}" if packages else "(empty slice)"
        lines.append(
            f"| {layer['index']} | {layer['step']} | {mb(layer['size'])} | `{layer['digest'][7:19]}` | {names} |"
        )
    return lines


def packages_table(result: dict) -> list[str]:
    wheels = result["floor"]["wheels"] or 1
    lines = ["| package | version | layer | installed | bytecode | share of the wheels |", "|---|---|---|---|---|---|"]
    for p in result["packages"]:
        lines.append(
            f"| {p['name']} | {p['version']} | {p['slot']:02d} | {mb(p['bytes'])} | {mb(p['bytecode'])} "
            f"| {p['bytes'] / wheels:.2%} |"
        )
    return lines


def render(results: dict, anchors: list[dict], notes: str = "") -> str:
    locks = results["locks"]
    out = [
        "# The lab image: size against its floor, layers, and the cost of a rebuild",
        "",
        "Written by `./run bench image` (bench/image.py) from bench/image.json. Every image is built as the",
        "tests build it: labfleet.image.build_image on the test harness's Debian 13 base, the locked wheels",
        "read from the local test wheel cache (hashes checked). Sizes are uncompressed bytes",
        "(`docker image inspect .Size`, `docker history`); per package, the files each distribution's",
        "RECORD lists, as installed in the built image, read there by bench/image_sizes.py's SURVEY.",
        "",
        "## No dead weight (issue 16 item 2)",
        "",
        "The floor is the installed size of the profile's wheels plus the base image. Goal: the image within",
        f"{FLOOR_GOAL:.2f}x of it. Bytecode (compiled by hash after each slice's install, in no RECORD), the",
        "venv's own files and the other layers (the apt layer: git, which brings perl, tini, python3-venv;",
        "the config files) are what the image adds to the floor. The last column is not added: it is bytes",
        "a layer holds that a higher one deleted or replaced, which the image still carries but no",
        "container sees (the image's size less every file a container sees). On the test base they are",
        "the base's own apt lists and caches, which the apt layer deletes: counted in the base, so in the",
        "floor too.",
        "",
        *summary(locks),
        "",
    ]
    for lock, r in locks.items():
        out.append(
            f"- {lock}: **{r['floor']['ratio']:.3f}x** its floor, {_verdict(r['floor']['ratio'], FLOOR_GOAL)} "
            f"(measured {r['date']}, {len(r['packages'])} distributions)."
        )
    out += [
        "",
        "## Against published images",
        "",
        "What each published size measures is in its row: all are uncompressed sizes as an engine reports",
        "them, the measure of ours. No compressed (registry download) size of ours is given: the ship and",
        "registry transfers are measured in bench/DELIVERY.md.",
        "",
        *anchors_table(locks, anchors),
        "",
        "## A rebuild after a one-package bump",
        "",
        *rebuild_section(results.get("rebuild")),
        "",
        NOTES_START,
        notes.strip("\n"),
        NOTES_END,
        "",
    ]
    for lock, r in locks.items():
        out += [f"## Layers of {lock}", "", f"`{r['tag']}` on `{r['base']}`.", "", *layers_table(r), ""]
    for lock, r in locks.items():
        out += [f"## Packages of {lock}", "", *packages_table(r), ""]
    return "\n".join(out)


def kept_notes(text: str) -> str:
    """What was written by hand between the markers of an earlier IMAGE.md."""
    if NOTES_START not in text or NOTES_END not in text:
        return ""
    return text.split(NOTES_START, 1)[1].split(NOTES_END, 1)[0]


def write_report(results: dict, path: Path, anchors: list[dict]) -> None:
    notes = kept_notes(path.read_text()) if path.exists() else ""
    path.write_text(render(results, anchors, notes))
