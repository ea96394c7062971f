"""Who is on the other end of a request: the client address used for rate limits and the audit log."""

from __future__ import annotations

from fastapi import Request

UNKNOWN_ADDRESS = "unknown"
ADDRESS_MAX = 64  # the audit column's width; an IPv6 address with zone fits


def client_address(request: Request) -> str:
    """The address the middleware resolved (honouring X-Forwarded-For only when trusted)."""
    resolved = getattr(request.state, "client_address", None)
    if isinstance(resolved, str):
        return resolved
    return request.client.host[:ADDRESS_MAX] if request.client else UNKNOWN_ADDRESS


def resolve_client_address(request: Request, *, trust_forwarded_for: bool) -> str:
    """The peer address, or behind a trusted proxy the last X-Forwarded-For hop (the one it added)."""
    if trust_forwarded_for:
        forwarded = request.headers.get("x-forwarded-for", "")
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if hops:
            return hops[-1][:ADDRESS_MAX]
    return request.client.host[:ADDRESS_MAX] if request.client else UNKNOWN_ADDRESS
