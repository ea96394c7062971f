"""Bundle upload and download through the API, on both stores: throughput and the API's memory.

Run: .venv/bin/python benchmarks/bundle_io.py [--size-mib 64] [--stores filesystem,s3]
     .venv/bin/python benchmarks/bundle_io.py --size-mib 1024     # the issue's 1 GiB figure

The API runs as a real `kernex api` process (uvicorn) on SQLite; S3 is moto's standalone server.
For each store it prints, beside a baseline of the same bytes written to and read from the
store directly (in this process, no HTTP), the upload's and the downloads' throughput and the
API process's peak RSS growth over its idle RSS while each runs (target: under 100 MB whatever
the bundle's size). The first download includes the integrity re-check (the whole bundle is
hashed from the store before the first byte is sent); the second is served from the verified
state and hashed as it streams.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Self

import httpx
import psutil

from kernex.api.auth.schemas import Role
from kernex.api.auth.service import create_user
from kernex.cli.bundle import build_bundle, upload_bundle
from kernex.storage.bundles.filesystem import FilesystemStore
from kernex.storage.bundles.s3 import S3Options, S3Store, make_client
from kernex.storage.bundles.store import BundleStore
from kernex.storage.database import engine_scope, session_factory
from kernex.storage.migrate import upgrade

MIB = 1024 * 1024
PASSWORD = "benchmark-password-not-secret"  # a throwaway account in a temp dir
SAMPLE_S = 0.02  # RSS sampling period: catches a buffer that lives for a few tens of milliseconds
READY_TIMEOUT_S = 60
TARGET_RSS_MB = 100
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
        except httpx.HTTPError:
            time.sleep(0.2)
        else:
            return
    raise SystemExit(f"{what} did not answer within {READY_TIMEOUT_S}s")


class PeakRss:
    """Samples a process's RSS in a thread; peak growth over the RSS at start."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self.base = self._process.memory_info().rss
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(SAMPLE_S)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / MIB


def make_bundle(workdir: Path, size_mib: int) -> Path:
    source = workdir / "source"
    source.mkdir()
    (source / "install.sh").write_text("#!/bin/sh\nexit 0\n")
    (source / "install.sh").chmod(0o755)
    # Random data: gzip cannot shrink it, so the archive is the requested size.
    with (source / "payload.bin").open("wb") as handle:
        for _ in range(size_mib):
            handle.write(os.urandom(MIB))
    manifest = {
        "name": "benchmark",
        "version": "1.0.0",
        "device_types": ["*"],
        "install": {"path": "install.sh"},
    }
    (source / "manifest.json").write_text(json.dumps(manifest))
    path, _ = build_bundle(source, workdir / "benchmark-1.0.0.tar.gz")
    shutil.rmtree(source)
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(MIB):
            digest.update(block)
    return digest.hexdigest()


async def store_baseline(store: BundleStore, archive: Path) -> tuple[float, float]:
    """Seconds to write the archive to the store and to read it back, directly."""
    await store.start()
    key = "bundles/baseline.tar.gz"
    started = time.perf_counter()
    async with store.upload(key) as upload:
        with archive.open("rb") as handle:
            while block := await asyncio.to_thread(handle.read, MIB):
                await upload.write(block)
    written = time.perf_counter() - started
    started = time.perf_counter()
    async for _chunk in store.read(key):
        pass
    read = time.perf_counter() - started
    await store.delete(key)
    await store.close()
    return written, read


@contextmanager
def moto_server(workdir: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (workdir / "moto.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
        )
    try:
        wait_http(url + "/moto-api/", proc, "moto_server")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def api_process(workdir: Path, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    port = free_port()
    with (workdir / "api.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "kernex"), "api", "--port", str(port)],
            env={**os.environ, **env},
            stdout=log,
            stderr=log,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", proc, "kernex api")
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def login(api: str) -> str:
    response = httpx.post(
        f"{api}/api/v1/auth/login", json={"username": "bench", "password": PASSWORD}, timeout=30
    )
    response.raise_for_status()
    token: str = response.json()["access_token"]
    return token


def download(api: str, token: str, bundle_id: str) -> tuple[float, str]:
    digest = hashlib.sha256()
    started = time.perf_counter()
    with httpx.stream(
        "GET",
        f"{api}/api/v1/bundles/{bundle_id}/download",
        headers={"Authorization": f"Bearer {token}"},
        timeout=httpx.Timeout(600.0),
    ) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes(MIB):
            digest.update(chunk)
    return time.perf_counter() - started, digest.hexdigest()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def run_store(kind: str, workdir: Path, archive: Path, expected_sha: str, size: int) -> list[str]:
    data_dir = workdir / f"data-{kind}"
    data_dir.mkdir()
    database = f"sqlite+aiosqlite:///{data_dir / 'kernex.db'}"
    upgrade(database)

    async def add_user() -> None:
        async with engine_scope(database) as engine, session_factory(engine)() as session:
            await create_user(session, username="bench", role=Role.OPERATOR, password=PASSWORD)

    asyncio.run(add_user())
    env = {
        "KERNEX_DATA_DIR": str(data_dir),
        "KERNEX_DATABASE_URL": database,
        "KERNEX_MQTT_PORT": "1",  # no broker: bundles do not need one
        "KERNEX_MAX_BUNDLE_BYTES": str(size + MIB),
        "KERNEX_RATE_LIMIT_PER_MINUTE": "100000",
        "KERNEX_LOG_LEVEL": "WARNING",
    }
    subprocess.run(
        [str(BIN / "kernex"), "pki", "init"], env={**os.environ, **env}, check=True, capture_output=True
    )
    with nullcontext("") if kind == "filesystem" else moto_server(workdir) as endpoint:
        if kind == "s3":
            options = S3Options(
                bucket="kernex-bench",
                endpoint_url=endpoint,
                region="us-east-1",
                access_key="bench",
                secret_key="bench-secret",  # moto accepts anything
            )
            client = make_client(options)
            client.create_bucket(Bucket=options.bucket)
            client.close()
            env |= {
                "KERNEX_BUNDLE_STORE": "s3",
                "KERNEX_S3_BUCKET": options.bucket,
                "KERNEX_S3_ENDPOINT_URL": endpoint,
                "KERNEX_S3_REGION": "us-east-1",
                "KERNEX_S3_ACCESS_KEY": "bench",
                "KERNEX_S3_SECRET_KEY": "bench-secret",
            }
            store: BundleStore = asyncio.run(S3Store.create(options))
        else:
            store = FilesystemStore(data_dir / "baseline-store")
        write_s, read_s = asyncio.run(store_baseline(store, archive))
        with api_process(workdir, env) as (api, pid):
            token = login(api)
            with PeakRss(pid) as up_rss:
                up_s, result = timed(lambda: upload_bundle(archive, api=api, token=token, progress=False))
            assert result["sha256"] == expected_sha, "the stored bundle's sha256 differs"
            with PeakRss(pid) as cold_rss:
                cold_s, cold_sha = download(api, token, result["id"])
            with PeakRss(pid) as warm_rss:
                warm_s, warm_sha = download(api, token, result["id"])
            assert cold_sha == warm_sha == expected_sha, "a download's bytes differ from the bundle"

    def rate(seconds: float) -> str:
        return f"{size / MIB / seconds:8.1f} MiB/s"

    def verdict(growth: float) -> str:
        return "ok" if growth < TARGET_RSS_MB else f"OVER {TARGET_RSS_MB} MB"

    def line(what: str, seconds: float, rss: PeakRss) -> str:
        growth = rss.growth_mb
        return f"{kind:<10} {what:<22} {rate(seconds)}   API peak RSS +{growth:6.1f} MB  {verdict(growth)}"

    return [
        f"{kind:<10} {'store write (baseline)':<22} {rate(write_s)}",
        f"{kind:<10} {'store read (baseline)':<22} {rate(read_s)}",
        line("API upload", up_s, up_rss),
        line("API download (verify)", cold_s, cold_rss),
        line("API download", warm_s, warm_rss),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=64, help="bundle size (1024 for the 1 GiB figure)")
    parser.add_argument("--stores", default="filesystem,s3", help="comma-separated: filesystem, s3")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kernex-bundle-bench-"))
    try:
        started = time.perf_counter()
        archive = make_bundle(workdir, args.size_mib)
        size = archive.stat().st_size
        expected = sha256_file(archive)
        print(f"bundle: {size / MIB:.1f} MiB (built in {time.perf_counter() - started:.1f}s)")
        lines: list[str] = []
        for kind in args.stores.split(","):
            lines += run_store(kind.strip(), workdir, archive, expected, size)
        print("\n".join(lines))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
