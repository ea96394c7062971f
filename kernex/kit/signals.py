"""Run a coroutine until it ends or SIGINT/SIGTERM arrives, then cancel it and let it clean up.

systemd and container runtimes stop services with SIGTERM, and a process started in the
background of a non-interactive shell ignores SIGINT: handling both explicitly is what makes
every Kernex process stop cleanly (ingest flushes and acknowledges, agents say "offline").
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

from kernex.kit.logs import get_logger

log = get_logger(__name__)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def until_signal(work: Coroutine[Any, Any, None], name: str) -> None:
    """Run `work`; a stop signal cancels it and waits for it to finish; its errors propagate."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    worker = asyncio.create_task(work, name=name)
    stopper = asyncio.create_task(stop.wait(), name="signals")
    try:
        await asyncio.wait({worker, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not worker.done():
            log.info("stopping", process=name)
            worker.cancel()
            # Let the work finish its shutdown (flush, acknowledge, say "offline") before the loop closes.
            await asyncio.wait({worker})
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
    if not worker.cancelled():
        worker.result()
