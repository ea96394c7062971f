"""The HTTP client a device uses for the Kernex API: timeout, proxy and TLS trust from the settings.

One place decides how the agent reaches the API, so `kernex agent run` and `kernex agent check`
can never disagree about it. The environment's HTTP(S)_PROXY variables are not consulted
(`trust_env=False`): a device's behaviour follows its settings, and `check` tests exactly them.
"""

from __future__ import annotations

import ssl

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
