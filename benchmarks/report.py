"""Regenerate the results table in docs/performance.md from fresh benchmark runs.

Run: .venv/bin/python -m benchmarks.report                # runs ingest, fleet and api; rewrites the table
     .venv/bin/python -m benchmarks.report --no-run       # re-renders from the last JSON results
     .venv/bin/python -m benchmarks.report --fleet-devices 2000 --ingest-devices 1000

Each benchmark writes its figures as JSON into --results (default .benchmark-results/, not
committed); the table between the `results:begin` and `results:end` markers of
docs/performance.md is replaced, the prose around it kept.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "performance.md"
BEGIN = "<!-- results:begin (benchmarks/report.py writes this part) -->"
END = "<!-- results:end -->"


def _run(module: str, out: Path, *options: str) -> None:
    command = [sys.executable, "-m", module, "--json", str(out), *options]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def _cpu(ms_per_1k: float) -> str:
    # Results from before benchmarks.harness.cpu_used summed PostgreSQL's processes as found at
    # the end minus those found at the start, which went negative when backends exited.
    return "n/a" if ms_per_1k < 0 else f"{ms_per_1k:,.0f}"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:,.0f} ms"


def _ingest_table(data: dict[str, Any]) -> list[str]:
    runs = {r["name"]: r for r in data["runs"]}
    raw = next(r for r in data["runs"] if r["name"].startswith("raw"))
    lines = [
        (
            f"Ingest (`python -m benchmarks.ingest {_options(data['args'], ('devices', 'per_device'))}`), "
            f"machine: {data['machine']}"
        ),
        "",
        "| measurement | messages | msgs/s | vs raw | consumer CPU ms/1k msgs | broker | PostgreSQL |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        per_1k = 1e6 / max(run["messages"], 1)
        cpu = [_cpu(run[k] * per_1k) for k in ("consumer_cpu_s", "broker_cpu_s", "postgres_cpu_s")]
        lines.append(
            f"| {name} | {run['messages']:,} | {run['rate']:,.0f} | {run['rate'] / raw['rate']:.2f} "
            f"| {' | '.join(cpu)} |"
        )
    two = next(r for r in data["runs"] if r["name"].endswith("2 workers"))
    naive = next(r for r in data["runs"] if r["name"].startswith("naive"))
    one = next(r for r in data["runs"] if r["name"].endswith("1 worker"))
    lines += [
        "",
        "| ratio | measured | target |",
        "|---|---:|---:|",
        f"| 2 workers, persisted/s | {two['rate']:,.0f} | ≥ 8,000 |",
        f"| 2 workers / raw subscriber | {two['rate'] / raw['rate']:.2f} | ≥ 0.60 |",
        f"| 2 workers / naive | {two['rate'] / naive['rate']:.1f}x | ≥ 10x |",
        f"| 2 workers / 1 worker | {two['rate'] / one['rate']:.2f} | — |",
    ]
    for run in data["latency"]:
        extra = run["extra"]
        lines.append(
            f"| publish→commit p50 / p99 at {extra['offered_per_s']:,.0f}/s offered "
            f"| {_ms(extra['p50_s'])} / {_ms(extra['p99_s'])} | p99 < 1 s at 5,000/s |"
        )
    return lines


def _fleet_table(data: dict[str, Any]) -> list[str]:
    r = data["results"]
    lines = [
        (
            f"Fleet (`python -m benchmarks.fleet --devices {r['devices']} --interval {r['interval_s']}`), "
            f"machine: {data['machine']}"
        ),
        "",
        "| measurement | value |",
        "|---|---:|",
        f"| simulated devices (one `kernex simulate` process) | {r['devices']:,} |",
        f"| all registered and online after | {r['all_online_s']:,.0f} s |",
        (
            "| heartbeats persisted / offered per second "
            f"| {r['persisted_per_s']:,.1f} / {r['offered_per_s']:,.1f} |"
        ),
        f"| simulator CPU at steady state | {r['simulator_cores']:.2f} cores |",
        f"| simulator RSS | {r['simulator_rss_mb']:,.0f} MB ({r['rss_kb_per_device']:,.0f} KB/device) |",
        f"| newest stored heartbeat age (ingest lag bound) | {r['newest_heartbeat_age_s'] or 0:.1f} s |",
    ]
    if "deploy_commands_s" in r:
        done = r["deploy_done_s"]
        lines += [
            f"| deployment: POST answered after | {r['deploy_post_s']:,.1f} s |",
            (
                "| deployment: retained commands on the broker after (target < 10 s) "
                f"| {r['deploy_commands_s']:,.1f} s |"
            ),
            (
                f"| baseline: same subscriber, {r['devices']:,} retained statuses first→last "
                f"| {r['retained_baseline_s']:,.1f} s |"
            ),
            (
                "| deployment: finished after "
                f"| {'not within the benchmark timeout' if done is None else f'{done:,.1f} s'} |"
            ),
            "| deployment: targets by status | "
            + ", ".join(f"{status} {n:,}" for status, n in sorted(r["deploy_counts"].items()))
            + " |",
        ]
        if "deploy_succeeded_per_s" in r:
            lines.append(f"| deployment: devices succeeded per second | {r['deploy_succeeded_per_s']:,.1f} |")
    return lines


def _api_table(data: dict[str, Any]) -> list[str]:
    r = data["results"]
    lines = [
        (
            f"API (`python -m benchmarks.api --devices {r['devices']} --heartbeats {r['heartbeats']}`), "
            f"machine: {data['machine']}"
        ),
        "",
        "| endpoint | p50 | p95 | p99 | target p95 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, figures in r["endpoints"].items():
        target = "—" if "baseline" in name else "< 100 ms"
        p50, p95, p99 = (_ms(figures[k]) for k in ("p50_s", "p95_s", "p99_s"))
        lines.append(f"| {name} | {p50} | {p95} | {p99} | {target} |")
    return lines


def _options(args: dict[str, str], names: tuple[str, ...]) -> str:
    return " ".join(f"--{n.replace('_', '-')} {args[n]}" for n in names if n in args)


def render(results: Path) -> str:
    """The markdown between the markers."""
    parts: list[str] = []
    renderers = (("ingest.json", _ingest_table), ("fleet.json", _fleet_table), ("api.json", _api_table))
    for name, table in renderers:
        path = results / name
        if path.exists():
            parts += [*table(json.loads(path.read_text())), ""]
    return "\n".join(parts)


def main() -> None:
    """Run the benchmarks (unless --no-run) and rewrite the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / ".benchmark-results")
    parser.add_argument("--no-run", action="store_true", help="only re-render the last results")
    parser.add_argument("--ingest-devices", default="1000")
    parser.add_argument("--fleet-devices", default="2000")
    parser.add_argument("--api-devices", default="100000")
    parser.add_argument("--api-heartbeats", default="10000000")
    args = parser.parse_args()
    args.results.mkdir(exist_ok=True)
    if not args.no_run:
        _run("benchmarks.ingest", args.results / "ingest.json", "--devices", args.ingest_devices)
        _run("benchmarks.fleet", args.results / "fleet.json", "--devices", args.fleet_devices)
        api_options = ("--devices", args.api_devices, "--heartbeats", args.api_heartbeats)
        _run("benchmarks.api", args.results / "api.json", *api_options)
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} lacks the results markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{render(args.results)}{END}{tail}")
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
