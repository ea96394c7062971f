"""The batch writer ingest commits verified messages with.

It lives in `kernex.storage.writer` because the API's HTTP heartbeat fallback stores heartbeats
through the same code (DESIGN.md: ingest and api never import each other, they meet in storage).
"""

from kernex.storage.writer import BatchWriter, Tally, WriteResult

__all__ = ["BatchWriter", "Tally", "WriteResult"]
