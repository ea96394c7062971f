"""The Kernex-Signature header and the secret's encryption at rest.

`Kernex-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`. A receiver
recomputes the HMAC over the timestamp and the raw body, compares in constant time, and refuses
a timestamp outside its replay window (REPLAY_WINDOW_S by default) — `verify` does all three.

The secret must be stored (an HMAC cannot be computed from a hash of it): it is kept
Fernet-encrypted (AES-128-CBC + HMAC-SHA256) under a key derived from the API's
`webhook_secret_key` setting, generated into the data dir in development.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

from cryptography.fernet import Fernet, InvalidToken

SIGNATURE_HEADER = "Kernex-Signature"
DELIVERY_HEADER = "Kernex-Delivery"
EVENT_HEADER = "Kernex-Event"
REPLAY_WINDOW_S = 300  # as common webhook senders: tolerates clock skew and one slow retry
SECRET_BYTES = 32


class SignatureError(Exception):
    """A signature header that is missing, malformed, stale or wrong."""


def new_secret() -> str:
    """A fresh webhook secret (shown to the operator once)."""
    return f"whsec_{secrets.token_urlsafe(SECRET_BYTES)}"


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The Kernex-Signature header value for a body sent at timestamp (now by default)."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode("utf-8"), f"{t}.".encode("ascii") + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(
    secret: str, body: bytes, header: str, *, window_s: int = REPLAY_WINDOW_S, now: float | None = None
) -> None:
    """Raise SignatureError unless header signs body with secret within the replay window."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise SignatureError("malformed signature header")
        parts.setdefault(key, []).append(value)
    try:
        t = int(parts["t"][0])
    except (KeyError, ValueError):
        raise SignatureError("no timestamp in the signature header") from None
    current = time.time() if now is None else now
    if abs(current - t) > window_s:
        raise SignatureError("timestamp outside the replay window")
    expected = sign(secret, body, t).partition(",v1=")[2]
    if not any(hmac.compare_digest(expected, v) for v in parts.get("v1", [])):
        raise SignatureError("signature does not match")


class SecretBox:
    """Encrypts webhook secrets at rest."""

    def __init__(self, key_material: str) -> None:
        digest = hashlib.sha256(key_material.encode("utf-8")).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(digest))

    def encrypt(self, secret: str) -> str:
        """The stored form of a secret."""
        return self._fernet.encrypt(secret.encode("utf-8")).decode("ascii")

    def decrypt(self, stored: str) -> str:
        """The secret back; SignatureError if the key changed or the value was altered."""
        try:
            return self._fernet.decrypt(stored.encode("ascii")).decode("utf-8")
        except InvalidToken:
            raise SignatureError("the webhook secret cannot be decrypted with the configured key") from None
