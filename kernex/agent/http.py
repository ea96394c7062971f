"""The HTTP client a device uses for the Kernex API: timeout, proxy and TLS trust from the settings.

One place decides how the agent reaches the API, so `kernex agent run` and `kernex agent check`
can never disagree about it. The environment's HTTP(S)_PROXY variables are not consulted
(`trust_env=False`): a device's behaviour follows its settings, and `check` tests exactly them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import httpx

from kernex.agent.settings import AgentSettings

DEFAULT_LIMITS = httpx.Limits()  # httpx's own: one device makes a handful of calls at a time


def api_ssl_context(settings: AgentSettings) -> ssl.SSLContext:
    """What an https:// API URL is verified against: `api_ca_file`, else the system's CA store.

    Blocking (reads the CA files): call it off the event loop.
    """
    cafile = str(settings.api_ca_file) if settings.api_ca_file is not None else None
    return ssl.create_default_context(cafile=cafile)


def api_client(settings: AgentSettings, *, limits: httpx.Limits = DEFAULT_LIMITS) -> httpx.AsyncClient:
    """An AsyncClient for the API. Blocking (builds the TLS context): call it off the event loop."""
    return httpx.AsyncClient(
        timeout=settings.api_timeout_s,
        proxy=settings.proxy,
        verify=api_ssl_context(settings),
        trust_env=False,
        limits=limits,
    )


class SharedClient(httpx.AsyncClient):
    """One client for many simulated devices: `slots` requests at once, the others wait their turn.

    Devices hold a slot (`request_slot`) from before they sign a request until its response is
    read. Waiting in httpcore's pool instead had two costs under 10,000 devices: a short-lived
    device token went stale in the queue (downloads refused with "Signature has expired"), and
    the pool rescans every waiting request whenever a connection frees (a whole core spent
    there during registration). A semaphore queues them in order at constant cost.
    """

    def __init__(self, *, slots: int, **kwargs: Any) -> None:
        super().__init__(limits=httpx.Limits(max_connections=slots), **kwargs)
        self.slots = asyncio.Semaphore(slots)


def request_slot(client: httpx.AsyncClient) -> contextlib.AbstractAsyncContextManager[object]:
    """Hold one of a shared client's request slots; a device's own client has no such limit."""
    return client.slots if isinstance(client, SharedClient) else contextlib.nullcontext()
