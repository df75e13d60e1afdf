"""bench/RESULTS.md and bench/results.png from the figures of one `python -m bench` run.

bench/run.py saves those figures (bench/results.json, bench/measurements.py) before it calls
write_report; `./run bench report [results.json]` writes the report again from them. Only the
part of RESULTS.md between the two markers below is rewritten; the text around it (the
profile notes, written by hand) stays.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from bench.measurements import RESULTS_JSON, Measurements, load

BEGIN = "<!-- bench:begin (written by python -m bench; edit outside these markers) -->"
END = "<!-- bench:end -->"
GOAL_NO_CHANGE = 2.0
GOAL_PROVISION = 1.5


def _median(values) -> float | None:
    return statistics.median(values) if values else None


def _number(value: float | None) -> float:
    """A median the report needs to compute with: the runs it comes from were measured."""
    assert value is not None, "no measurement of this kind"
    return value


def _s(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} s"


def _cpu(row: dict) -> str:
    if row["cpu_ratio"] is None:
        return "–"
    return f"{row['cpu']['deploy']:.2f} s / {row['cpu']['floor']:.2f} s = {row['cpu_ratio']:.2f}x"


def no_change_rows(found: Measurements) -> list[dict]:
    rows = []
    sizes = sorted(found.no_change)
    first = sizes[0]
    for size in sizes:
        times = found.no_change[size]
        row = {"hosts": size, **{name: _median(values) for name, values in times.items()}}
        row["ratio"] = row["deploy"] / row["floor"]
        row["round_ratios"] = [d / f for d, f in zip(times["deploy"], times["floor"], strict=True)]
        if "baseline" in times:
            row["baseline_ratio"] = row["baseline"] / row["floor"]
        for name in ("deploy", "floor"):
            row[f"{name}_per_added_host"] = (
                (row[name] - _number(_median(found.no_change[first][name]))) / (size - first) if size > first else None
            )
        rss = {name: _number(_median(values)) / 1024 for name, values in found.memory_kb[size].items()}
        row["rss_mib"] = rss
        row["round_trips"] = found.round_trips.get(size, {})
        cpu = {name: _median(values) for name, values in found.cpu_s.get(size, {}).items()}
        deploy_cpu, floor_cpu = cpu.get("deploy"), cpu.get("floor")
        row["cpu_ratio"] = deploy_cpu / floor_cpu if deploy_cpu and floor_cpu else None
        row["cpu"] = cpu
        rows.append(row)
    return rows


def gpu_standin_rows(found: Measurements) -> list[dict]:
    """Per size on the stand-in GPU hosts: medians, ratios to the floor, each round's, round trips per host."""
    rows = []
    for size, times in sorted(found.gpu_no_change.items()):
        row = {"hosts": size, **{name: _number(_median(values)) for name, values in times.items()}}
        row["ratio"] = row["deploy"] / row["floor"]
        row["round_ratios"] = [d / f for d, f in zip(times["deploy"], times["floor"], strict=True)]
        if "baseline" in times:
            row["baseline_ratio"] = row["baseline"] / row["floor"]
        row["round_trips"] = found.gpu_round_trips.get(size, {})
        rows.append(row)
    return rows


def _commands_table(title: str, commands: dict) -> list[str]:
    lines = [title, "", "| times | command |", "|---:|---|"]
    for command, count in commands.items():
        text = command.replace("|", "\\|").replace("`", "'")
        lines.append(f"| {count} | `{text}` |")
    return [*lines, ""]


def markdown(found: Measurements, info: dict) -> str:
    rows = no_change_rows(found)
    has_baseline = any("baseline" in row for row in rows)
    label = info.get("baseline") or "before"
    lines = [
        f"Measured {info['date']} on {info['cores']} cores, {info['memory_gib']} GiB, Linux {info['kernel']}, "
        f"Docker {info['docker']} (controller and test hosts on one machine), Python {info['python']}, "
        f"pyinfra {info['pyinfra']}; {info['repetitions']} alternating rounds, medians; the whole benchmark "
        f"took {info['bench_minutes']} min.",
        "",
        "### No-change re-run of deploy.py against the floor",
        "",
        "The floor is `bench/deploys/floor.py`, one `server.shell('true')`, on the same hosts in the same "
        f"rounds. Goal: at most {GOAL_NO_CHANGE}x the floor at every size, and a flat time per added host.",
        "",
    ]
    header = (
        "| hosts | deploy.py | floor | ratio | each round's ratio | deploy per added host | floor per added host "
        "| controller CPU, deploy.py / floor |"
    )
    rule = "|---:|---:|---:|---:|---:|---:|---:|---:|"
    if has_baseline:
        header += f" {label} | {label} ratio |"
        rule += "---:|---:|"
    lines += [header, rule]
    for row in rows:
        line = (
            f"| {row['hosts']} | {_s(row['deploy'])} | {_s(row['floor'])} | **{row['ratio']:.2f}x** | "
            f"{', '.join(f'{ratio:.1f}' for ratio in row['round_ratios'])} | "
            f"{_s(row['deploy_per_added_host'])} | {_s(row['floor_per_added_host'])} | {_cpu(row)} |"
        )
        if has_baseline:
            line += f" {_s(row.get('baseline'))} | {row.get('baseline_ratio', float('nan')):.2f}x |"
        lines.append(line)
    worst = max(row["ratio"] for row in rows)
    verdict = "meets" if worst <= GOAL_NO_CHANGE else "misses"
    lines += [
        "",
        f"Worst ratio {worst:.2f}x: {verdict} the goal of {GOAL_NO_CHANGE}x. Controller CPU is the pyinfra "
        "process's user and system time (`wait4`): the part of a run that grows with the fleet on the "
        "machine you deploy from, while each host's own share runs on that host.",
        "",
    ]

    lines += [
        "### Round trips and controller memory (no-change run)",
        "",
        "Round trips: the commands pyinfra ran per host, counted from an extra `--debug` run (one "
        "`Running command` line each, and each file upload). Memory: the "
        "pyinfra process's peak RSS (`wait4`), median of the timed runs.",
        "",
    ]
    names = ["deploy", "floor", *(["baseline"] if has_baseline else [])]
    shown = {"deploy": "deploy.py", "floor": "floor", "baseline": label}
    header = "| hosts | " + " | ".join(f"round trips/host, {shown[n]}" for n in names)
    header += " | " + " | ".join(f"peak RSS, {shown[n]}" for n in names) + " | deploy.py RSS per host |"
    lines += [header, "|---:|" + "---:|" * (2 * len(names) + 1)]
    first = rows[0]
    for row in rows:
        trips = " | ".join(f"{row['round_trips'].get(n, float('nan')):.0f}" for n in names)
        rss = " | ".join(f"{row['rss_mib'][n]:.0f} MiB" for n in names)
        if row is first:
            per_host = f"{row['rss_mib']['deploy'] / row['hosts']:.1f} MiB"
        else:
            added = (row["rss_mib"]["deploy"] - first["rss_mib"]["deploy"]) / (row["hosts"] - first["hosts"])
            per_host = f"{added:.1f} MiB per added host"
        lines.append(f"| {row['hosts']} | {trips} | {rss} | {per_host} |")
    lines.append("")
    for name in names:
        commands = found.round_trip_commands.get(name)
        if not commands or name == "floor":
            continue
        title = f"What {shown[name]} runs on one host (first 60 characters of each command):"
        lines += _commands_table(title, commands)

    gpu_rows = gpu_standin_rows(found)
    if gpu_rows:
        lines += [
            "### No-change re-run on converged stand-in GPU hosts (STAND-IN NVIDIA toolkit, no real GPU)",
            "",
            "Hosts made like tests/e2e/test_nvidia.py's: the stand-in toolkit packages under NVIDIA's names from "
            "a signed apt repository each host serves on its own 127.0.0.1, a simulated loaded driver at the floor, "
            "`gpu: true`; converged once with the whole deploy, then timed against the floor in alternating rounds "
            "and counted as above. The deploy is `bench/deploys/gpu_standin.py`: deploy.py as it is, less its "
            "last step, the GPU check in the lab image (`nvidia.verify_gpu`), which needs a real GPU and starts "
            "one container per GPU host on every deploy, by design.",
            "",
        ]
        gpu_baseline = any("baseline" in row for row in gpu_rows)
        header = (
            "| hosts | deploy.py, stand-in GPU | floor | ratio | each round's ratio | round trips/host, deploy.py "
            "| round trips/host, floor |"
        )
        rule = "|---:|---:|---:|---:|---:|---:|---:|"
        if gpu_baseline:
            header += f" {label} | {label} ratio | round trips/host, {label} |"
            rule += "---:|---:|---:|"
        lines += [header, rule]
        for row in gpu_rows:
            trips = row["round_trips"]
            line = (
                f"| {row['hosts']} | {_s(row['deploy'])} | {_s(row['floor'])} | **{row['ratio']:.2f}x** | "
                f"{', '.join(f'{ratio:.1f}' for ratio in row['round_ratios'])} | "
                f"{trips.get('deploy', float('nan')):.0f} | {trips.get('floor', float('nan')):.0f} |"
            )
            if gpu_baseline:
                line += (
                    f" {_s(row.get('baseline'))} | {row.get('baseline_ratio', float('nan')):.2f}x | "
                    f"{trips.get('baseline', float('nan')):.0f} |"
                )
            lines.append(line)
        lines.append("")
        for name, commands in found.gpu_round_trip_commands.items():
            title = f"What {shown.get(name, name)} runs on one stand-in GPU host (first 60 characters of each command):"
            lines += _commands_table(title, commands)

    if found.provision:
        lines += [
            "### Fresh provision: engine-only hosts to healthy JupyterLab",
            "",
            "New hosts with the distribution's Docker Engine preinstalled (so that installing Docker from the "
            "archive does not dominate), then the whole deploy: preflight, the docker step's merge and "
            "checks, datasets, the image shipped (saved once on this machine, copied and loaded on every "
            "host), the compose project and `up --wait` to healthy. "
            f"Goal: {max(found.provision)} hosts at most {GOAL_PROVISION}x one host.",
            "",
            "| hosts | median | ratio to 1 host | runs |",
            "|---:|---:|---:|---|",
        ]
        one = _median(found.provision.get(1, []))
        for size in sorted(found.provision):
            median = _median(found.provision[size])
            ratio = f"{median / one:.2f}x" if one and median is not None else "–"
            runs = ", ".join(f"{value:.1f}" for value in found.provision[size])
            lines.append(f"| {size} | {_s(median)} | {ratio} | {runs} |")
        for size, values in sorted(found.bare_provision.items()):
            lines.append(f"| {size} (bare host: Docker from the archive too) | {_s(_median(values))} | – | "
                         + ", ".join(f"{v:.1f}" for v in values) + " |")  # fmt: skip
        lines.append("")
    lines += ["![time against hosts](results.png)", ""]
    return "\n".join(lines)


def plot(found: Measurements, info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    panels = 2 if found.provision else 1
    figure, axes = pyplot.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    left = axes[0][0]
    sizes = sorted(found.no_change)
    styles = {"deploy": ("deploy.py, no change", "o-"), "floor": ("floor: server.shell('true')", "s--")}
    if any("baseline" in found.no_change[size] for size in sizes):
        styles["baseline"] = (f"deploy.py, {info.get('baseline') or 'before'}", "^:")
    for name, (label, style) in styles.items():
        medians = [_median(found.no_change[size][name]) for size in sizes]
        low = [m - min(found.no_change[s][name]) for m, s in zip(medians, sizes, strict=True)]
        high = [max(found.no_change[s][name]) - m for m, s in zip(medians, sizes, strict=True)]
        left.errorbar(sizes, medians, yerr=[low, high], fmt=style, capsize=3, label=label)
    gpu_sizes = sorted(found.gpu_no_change)
    if gpu_sizes:
        gpu_medians = [_median(found.gpu_no_change[size]["deploy"]) for size in gpu_sizes]
        left.plot(gpu_sizes, gpu_medians, "x", markersize=9, label="deploy.py, GPU hosts with the STAND-IN toolkit")
    goal = [GOAL_NO_CHANGE * _number(_median(found.no_change[size]["floor"])) for size in sizes]
    left.plot(sizes, goal, ":", color="grey", label=f"goal: {GOAL_NO_CHANGE}x the floor")
    left.set_xlabel("hosts")
    left.set_ylabel("seconds (median; bars: min to max)")
    left.set_title("No-change re-run")
    left.set_xticks(sizes)
    left.set_ylim(bottom=0)
    left.grid(alpha=0.3)
    left.legend()
    if found.provision:
        right = axes[0][1]
        psizes = sorted(found.provision)
        medians = [_median(found.provision[size]) for size in psizes]
        right.plot(psizes, medians, "o-", label="deploy.py, fresh provision")
        one = _median(found.provision.get(1, []))
        if one:
            right.axhline(one * GOAL_PROVISION, linestyle="--", color="grey", label=f"goal: {GOAL_PROVISION}x one host")
        right.set_xlabel("hosts")
        right.set_ylabel("seconds (median)")
        right.set_title("Fresh provision, engine preinstalled")
        right.set_xticks(psizes)
        right.set_ylim(bottom=0)
        right.grid(alpha=0.3)
        right.legend()
    figure.suptitle(f"labfleet on {info['cores']} cores, {info['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def write_report(found: Measurements, info: dict, output: Path) -> None:
    """results.png and RESULTS.md under output; results.json is bench.measurements.save's."""
    output.mkdir(parents=True, exist_ok=True)
    plot(found, info, output / "results.png")
    generated = f"{BEGIN}\n{markdown(found, info)}\n{END}"
    results = output / "RESULTS.md"
    if results.exists() and BEGIN in (text := results.read_text()) and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        results.write_text(head + generated + tail)
    else:
        results.write_text(f"# Benchmark results\n\n{generated}\n")


def rerender(results_json: Path) -> None:
    """Rewrite the report beside results.json from it, e.g. after changing this module."""
    found, info = load(results_json)
    write_report(found, info, results_json.parent)


def main(argv: list[str] | None = None) -> int:
    from bench.dependencies import REPORT_MODULES, require

    require(REPORT_MODULES)
    args = sys.argv[1:] if argv is None else argv
    rerender(Path(args[0]) if args else Path(__file__).resolve().parent / RESULTS_JSON)
    return 0


if __name__ == "__main__":
    sys.exit(main())
