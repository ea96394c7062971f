"""Ingest's per-batch device lookup: the admission states read afresh (what makes a revocation
take effect at once) beside a lookup answered from the cache alone (the behaviour before).

Run: .venv/bin/python benchmarks/key_cache.py [--rounds N]

Both on PostgreSQL (KERNEX_BENCH_POSTGRES_URL, a fresh database) and SQLite, for batches naming
10 and 500 devices (ingest's default batch_max). Ingest verifies one batch while the previous
one commits, so this latency overlaps the commit rather than adding to it.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from benchmarks.harness import Platform
from kernex.ingest.keys import KeyCache
from kernex.protocol.keys import (
    KeyType,
    device_id_for,
    generate_private_key,
    key_type_of,
    public_key_fingerprint,
    public_key_to_pem,
)
from kernex.storage.database import create_engine, session_factory
from kernex.storage.migrate import upgrade
from kernex.storage.models import AdmissionState, Device

DEVICES = 500
BATCHES = (10, DEVICES)


class _CacheOnly(KeyCache):
    """The baseline: states as cached (no query), as before they were read on every batch."""

    async def _states(self, device_ids: list[str]) -> dict[str, AdmissionState]:
        return dict.fromkeys(device_ids, AdmissionState.ACTIVE)  # every device here is active


async def _register(engine: AsyncEngine, count: int) -> list[str]:
    """Device rows as registration creates them; their ids."""
    keys = [generate_private_key(KeyType.ECDSA_P256).public_key() for _ in range(count)]
    async with session_factory(engine)() as session:
        session.add_all(
            Device(
                id=device_id_for(key),
                key_type=key_type_of(key).value,
                public_key_pem=public_key_to_pem(key),
                key_fingerprint=public_key_fingerprint(key),
            )
            for key in keys
        )
        await session.commit()
    return [device_id_for(key) for key in keys]


async def _per_lookup_ms(cache: KeyCache, ids: list[str], rounds: int) -> float:
    await cache.get_many(ids)  # warm: keys parsed and cached
    start = time.perf_counter()
    for _ in range(rounds):
        await cache.get_many(ids)
    return (time.perf_counter() - start) / rounds * 1000


async def _run(url: str, label: str, rounds: int) -> None:
    engine = create_engine(url)
    try:
        ids = await _register(engine, DEVICES)
        for batch in BATCHES:
            fresh = await _per_lookup_ms(KeyCache(engine, ttl_s=3600), ids[:batch], rounds)
            cached = await _per_lookup_ms(_CacheOnly(engine, ttl_s=3600), ids[:batch], rounds)
            print(f"{label:<10} {batch:>7} {fresh:>16.3f} {cached:>16.3f}")
    finally:
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="lookups per measurement")
    args = parser.parse_args()
    print(f"{'database':<10} {'devices':>7} {'states read, ms':>16} {'cache only, ms':>16}")
    with Platform() as platform:
        asyncio.run(_run(platform.database_url, "postgres", args.rounds))
    with tempfile.TemporaryDirectory(prefix="kernex-bench-") as work:
        url = f"sqlite+aiosqlite:///{Path(work) / 'kernex.db'}"
        upgrade(url)
        asyncio.run(_run(url, "sqlite", args.rounds))


if __name__ == "__main__":
    main()
