"""The operations docs name only metrics, reject reasons and log lines that the code really has."""

from __future__ import annotations

import re
from pathlib import Path

from kernex.protocol.messages import RejectReason

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / name for name in ("runbook.md", "operations.md", "agent.md")]
# Log lines quoted in the runbook, each as the code logs it.
LOG_LINES = [
    "registration pending operator approval",
    "enrollment token refused",
    "messages rejected",
    "message rejected",
    "stored public key does not load",
    "device revoked",
    "broker connection lost, reconnecting",
    "silent devices marked offline",
    "MQTT connected again: leaving the HTTP fallback",
    "deployment targets failed by the sweeper",
    "bundle download cut, keeping the part to resume",
    "script timed out: terminating its process group",
    "command refused",
    "batch write failed; retrying",
    "lost the broker connection; reconnecting",
    "agent stopped",
]


def _code() -> str:
    return "\n".join(path.read_text() for path in (ROOT / "kernex").rglob("*.py"))


def test_every_metric_named_in_the_docs_exists() -> None:
    code = _code()
    for doc in DOCS:
        for metric in set(re.findall(r"\bkernex_[a-z_]+\b", doc.read_text())):
            assert f'"{metric}"' in code, f"{doc.name} names {metric}, which no code defines"


def test_every_reject_reason_in_the_docs_exists() -> None:
    reasons = {reason.value for reason in RejectReason}
    for doc in DOCS:
        for reason in re.findall(r'kernex_ingest_rejected_total\{reason="([a-z_]+)"\}', doc.read_text()):
            assert reason in reasons, f"{doc.name} names reject reason {reason!r}"


def test_the_runbook_quotes_real_log_lines() -> None:
    code, runbook = _code(), (ROOT / "docs" / "runbook.md").read_text()
    flat = " ".join(runbook.split())  # quoted lines may wrap
    for line in LOG_LINES:
        assert f"`{line}`" in flat, f"the runbook does not quote {line!r}"
        assert f'"{line}"' in code, f"no code logs {line!r}"
