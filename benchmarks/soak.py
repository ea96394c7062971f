"""Soak: signed heartbeats at a sustained rate for minutes through Mosquitto, `kernex ingest` and
PostgreSQL, with `kernex api` serving beside them; memory, error logs and losses watched.

Run: .venv/bin/python -m benchmarks.soak [--minutes 10] [--rate 5000] [--devices 500]

Load comes in rounds of `--round-s` seconds from `--publishers` processes (benchmarks.mqttload:
one mutual-TLS connection per device, QoS 1, heartbeats signed before each round starts, seqs
continuing across rounds). Between rounds nothing is offered while the next one is signed; for
load that never pauses, sign the whole run as one round: `--round-s 600 --warmup-s 400` (the
warm-up counts from the start, signing included). Every `--sample-s` the RSS of the ingest
workers and the API is sampled and the API is asked /readyz and /metrics. At the end, after
the backlog drains:

- offered vs persisted rate, and heartbeats lost (acknowledged by the broker, never stored);
- RSS of ingest and the API: the baseline is the first sample after the warm-up round (same
  run), beside the last sample and the peak: "flat" is a small growth over the baseline;
- error lines (level error/critical, tracebacks) in the processes' logs.

Nothing is asserted: the figures are printed (and written with --json) for a person to judge.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import psutil

from benchmarks.harness import HOST, Broker, Platform, free_port, machine, wait_http
from benchmarks.mqttload import DeviceSpec, LoadResult, LoadSpec, publish_process
from kernex.protocol.topics import DEFAULT_PREFIX

SPAWN = multiprocessing.get_context("spawn")  # no inherited event loops, threads or sockets
BIN = Path(sys.executable).parent
# Signing a round and connecting a publisher's devices; a whole 10-minute run signed up front
# (--round-s 600: 3 million heartbeats, about 2 GB across the publishers) takes minutes.
READY_TIMEOUT_S = 1200.0
DRAIN_STALL_S = 120.0  # no new row for this long: the backlog is gone, or stuck
POLL_S = 0.5
METRICS_TIMEOUT_S = 30.0  # a worker working through a backlog answers its scrape slowly
MIB = 1024 * 1024
WORKERS = 2  # ingest workers on the shared subscription, as a production deployment would run
ERROR_MARKERS = ('"level": "error"', '"level": "critical"', "Traceback (most recent call last)")


@dataclass(slots=True)
class Sample:
    """One sample of the processes under test."""

    at_s: float
    ingest_rss_mib: list[float]
    api_rss_mib: float
    stored: int
    # Summed over the ingest workers (their /metrics): what they did so far.
    ingest: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class Figures:
    """What the soak measured."""

    minutes: float
    offered_rate: float
    devices: int
    published: int = 0
    acked: int = 0
    refused: int = 0
    stored: int = 0
    lost: int = 0
    publish_seconds: float = 0.0  # first publish to last, signing pauses between rounds included
    round_seconds: float = 0.0  # the rounds' publishing alone
    achieved_rate: float = 0.0
    persisted_rate: float = 0.0
    drain_seconds: float = 0.0
    error_lines: dict[str, int] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)


def _rss_mib(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / MIB
    except psutil.Error:
        return math.nan


def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen([str(BIN / "kernex"), *args], env=env, stdout=log, stderr=subprocess.STDOUT)


def _stop(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


INGEST_SERIES = {
    "accepted": ("kernex_ingest_messages_total", 'outcome="accepted"'),
    "duplicate": ("kernex_ingest_messages_total", 'outcome="duplicate"'),
    "rejected": ("kernex_ingest_rejected_total", ""),
    "db_errors": ("kernex_ingest_db_errors_total", ""),
    "pending_acks": ("kernex_ingest_pending_acks", ""),
    "seq_gaps": ("kernex_ingest_seq_gaps_total", ""),
    "seq_late": ("kernex_ingest_seq_late_total", ""),
}


def _ingest_metrics(http: httpx.Client, urls: list[str]) -> dict[str, float]:
    totals = dict.fromkeys(INGEST_SERIES, 0.0)
    for url in urls:
        try:
            text = http.get(url, timeout=METRICS_TIMEOUT_S).text
        except httpx.HTTPError as exc:
            # A worker too busy to answer its scrape: the sample says so instead of a zero.
            print(f"  {url}: {type(exc).__name__} {exc}", flush=True)
            return dict.fromkeys(INGEST_SERIES, math.nan)
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            for key, (metric, label) in INGEST_SERIES.items():
                if name.split("{")[0] == metric and label in name:
                    totals[key] += float(value)
    return totals


def _errors(log_path: Path) -> int:
    if not log_path.exists():
        return 0
    with log_path.open(errors="replace") as log:
        return sum(any(marker in line for marker in ERROR_MARKERS) for line in log)


def _round(
    *,
    broker: Broker,
    platform: Platform,
    devices: list[DeviceSpec],
    first_seq: int,
    per_device: int,
    rate: float,
    publishers: int,
) -> tuple[list[LoadResult], float]:
    """One round of load; the results and when its publishing started (monotonic)."""
    shares = [devices[i::publishers] for i in range(publishers)]
    pipes: list[Connection] = []
    procs = []
    for share in shares:
        spec = LoadSpec(
            host=HOST,
            port=broker.port,
            ca_path=str(platform.pki.ca_cert_path),
            topic_prefix=DEFAULT_PREFIX,
            devices=share,
            first_seq=first_seq,
            per_device=per_device,
            rate=rate * len(share) / len(devices),
        )
        parent, child = SPAWN.Pipe()
        proc = SPAWN.Process(target=publish_process, args=(spec, child), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    for pipe in pipes:
        if not pipe.poll(READY_TIMEOUT_S):
            raise SystemExit("a publisher was not ready in time")
        kind, detail = pipe.recv()
        if kind != "ready":
            raise SystemExit(f"publisher failed: {detail}")
    start_at = time.monotonic() + 0.5
    for pipe in pipes:
        pipe.send(start_at)
    results: list[LoadResult] = []
    for pipe, proc in zip(pipes, procs, strict=True):
        kind, detail = pipe.recv()
        if kind != "done":
            raise SystemExit(f"publisher failed: {detail}")
        results.append(detail)
        proc.join()
    return results, start_at


def soak(args: argparse.Namespace) -> Figures:
    figures = Figures(minutes=args.minutes, offered_rate=args.rate, devices=args.devices)
    with Platform() as platform:
        logs_dir = args.logs or Path(tempfile.mkdtemp(prefix="kernex-soak-logs-"))
        logs_dir.mkdir(parents=True, exist_ok=True)
        print(f"logs in {logs_dir}", flush=True)
        broker = platform.start_broker()
        devices = platform.create_devices(args.devices)
        children: dict[str, subprocess.Popen[bytes]] = {}
        metrics_urls: list[str] = []
        try:
            for index in range(1, WORKERS + 1):
                port = free_port()
                env = platform.kernex_env(
                    broker,
                    client_id=f"soak-ingest-{index}",
                    metrics_port=str(port),
                    log_level="warning",
                    log_format="json",
                )
                children[f"ingest-{index}"] = child = _spawn(
                    ["ingest"], env, logs_dir / f"ingest-{index}.log"
                )
                metrics_urls.append(f"http://{HOST}:{port}/metrics")
                wait_http(
                    f"http://{HOST}:{port}/metrics",
                    child,
                    "kernex ingest",
                    contains="kernex_ingest_broker_connected 1.0",
                )
            api_port = free_port()
            api_url = f"http://{HOST}:{api_port}"
            api_env = platform.kernex_env(
                broker, api_port=str(api_port), log_level="warning", log_format="json"
            )
            children["api"] = _spawn(["api"], api_env, logs_dir / "api.log")
            wait_http(f"{api_url}/readyz", children["api"], "kernex api")

            per_device = max(1, round(args.rate * args.round_s / args.devices))
            rounds = max(1, math.ceil(args.minutes * 60 / args.round_s))
            began = time.monotonic()
            sampling = True

            def sample_loop() -> None:
                with httpx.Client(timeout=10) as http:
                    while sampling:
                        for path in ("/readyz", "/metrics"):
                            try:
                                http.get(api_url + path)
                            except httpx.HTTPError as exc:
                                print(f"  api {path}: {exc}", flush=True)
                        figures.samples.append(
                            Sample(
                                at_s=round(time.monotonic() - began, 1),
                                ingest_rss_mib=[
                                    round(_rss_mib(c.pid), 1)
                                    for n, c in children.items()
                                    if n.startswith("ingest")
                                ],
                                api_rss_mib=round(_rss_mib(children["api"].pid), 1),
                                stored=asyncio.run(platform.heartbeat_count()),
                                ingest=_ingest_metrics(http, metrics_urls),
                            )
                        )
                        time.sleep(args.sample_s)

            sampler = threading.Thread(target=sample_loop, daemon=True)
            sampler.start()
            first_publish: float | None = None
            last_publish = 0.0
            for number in range(rounds):
                results, start_at = _round(
                    broker=broker,
                    platform=platform,
                    devices=devices,
                    first_seq=1 + number * per_device,
                    per_device=per_device,
                    rate=args.rate,
                    publishers=args.publishers,
                )
                first_publish = first_publish or start_at
                last_publish = max(r.last_at for r in results)
                published = sum(len(r.published) for r in results)
                figures.published += published
                figures.acked += sum(r.acked for r in results)
                figures.refused += sum(r.refused for r in results)
                span = last_publish - start_at
                figures.round_seconds += span
                print(
                    f"round {number + 1}/{rounds}: {published} heartbeats in {span:.1f} s "
                    f"({published / span:,.0f}/s); last sample: {figures.samples[-1:]}",
                    flush=True,
                )
            assert first_publish is not None
            figures.publish_seconds = last_publish - first_publish
            drain_start = last_change = time.monotonic()
            stored = -1
            while (now := asyncio.run(platform.heartbeat_count())) < figures.acked - figures.refused:
                if now != stored:
                    stored, last_change = now, time.monotonic()
                if (
                    time.monotonic() - last_change > DRAIN_STALL_S
                    or time.monotonic() - drain_start > args.drain_timeout_s
                ):
                    break  # nothing more is coming: what is missing is lost
                time.sleep(POLL_S)
            done = time.monotonic()
            figures.drain_seconds = done - drain_start
            sampling = False
            sampler.join(args.sample_s + 30)
            figures.stored = asyncio.run(platform.heartbeat_count())
            figures.lost = figures.acked - figures.refused - figures.stored
            figures.achieved_rate = figures.published / figures.round_seconds
            figures.persisted_rate = figures.stored / (done - first_publish)
            for name, child in children.items():
                if child.poll() is not None:
                    print(f"  {name} exited early with {child.returncode}", flush=True)
        finally:
            for child in children.values():
                _stop(child)
        figures.error_lines = {name: _errors(logs_dir / f"{name}.log") for name in children}
    return figures


def report(figures: Figures, warmup_s: float) -> None:
    samples = figures.samples
    steady = [s for s in samples if s.at_s >= warmup_s] or samples
    base, last = steady[0], steady[-1]
    print(f"machine: {machine()}")
    print(
        f"offered {figures.offered_rate:,.0f}/s for {figures.minutes} min to {figures.devices} devices: "
        f"published {figures.published:,} at {figures.achieved_rate:,.0f}/s while rounds ran "
        f"({figures.round_seconds:.0f} s of {figures.publish_seconds:.0f} s; the rest: signing), "
        f"persisted {figures.stored:,} ({figures.persisted_rate:,.0f}/s from first publish to last commit), "
        f"backlog drained in {figures.drain_seconds:.1f} s"
    )
    print(
        f"lost (acknowledged by the broker, never stored): {figures.lost}; "
        f"refused by the broker: {figures.refused}"
    )
    print(f"{'RSS MiB':<12} {'baseline':>10} {'end':>10} {'peak':>10} {'growth':>10}")
    for index in range(len(base.ingest_rss_mib)):
        values = [s.ingest_rss_mib[index] for s in steady]
        start, end = base.ingest_rss_mib[index], last.ingest_rss_mib[index]
        name = f"ingest-{index + 1}"
        print(f"{name:<12} {start:>10.1f} {end:>10.1f} {max(values):>10.1f} {end - start:>+10.1f}")
    api_values = [s.api_rss_mib for s in steady]
    print(
        f"{'api':<12} {base.api_rss_mib:>10.1f} {last.api_rss_mib:>10.1f} {max(api_values):>10.1f} "
        f"{last.api_rss_mib - base.api_rss_mib:>+10.1f}"
    )
    print(f"(baseline: the first sample after {warmup_s:.0f} s of warm-up, same run)")
    print("error log lines: " + ", ".join(f"{k} {v}" for k, v in figures.error_lines.items()))
    print("ingest at the end: " + ", ".join(f"{k} {v:,.0f}" for k, v in last.ingest.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to publish")
    parser.add_argument("--rate", type=float, default=5000.0, help="heartbeats per second offered")
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    parser.add_argument("--round-s", type=float, default=30.0, help="seconds of load signed per round")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument(
        "--warmup-s", type=float, default=None, help="before the RSS baseline (default: one round)"
    )
    parser.add_argument("--drain-timeout-s", type=float, default=1800.0, help="longest wait for the backlog")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--logs", type=Path, help="where the processes log (default: a new temp dir, kept)")
    args = parser.parse_args()
    os.environ.setdefault("KERNEX_LOG_LEVEL", "warning")
    figures = soak(args)
    report(figures, args.round_s if args.warmup_s is None else args.warmup_s)
    if args.json:
        args.json.write_text(json.dumps(asdict(figures), indent=2))


if __name__ == "__main__":
    main()
