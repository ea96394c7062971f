"""Heartbeat JWS verification rate per key type, beside the bare signature check it wraps.

Run: .venv/bin/python benchmarks/jws.py [--seconds S]

The baseline is cryptography's verify() on the same signing input and signature, with no JWS
parsing: the gap is what PyJWT's header/payload decoding and our algorithm pinning cost.
Ingest verifies every device message, so this bounds one core's ingest rate.
"""

from __future__ import annotations

import argparse
import base64
import time
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from kernex.protocol import jws
from kernex.protocol.keys import KeyType, PublicKey, device_id_for, generate_private_key
from kernex.protocol.messages import format_ts, utc_now


def _rate(fn: Callable[[], object], seconds: float) -> float:
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(50):
            fn()
        count += 50
    return count / (time.perf_counter() - start)


def _b64d(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _bare_verifier(key: PublicKey, token: str) -> Callable[[], object]:
    head, payload, sig = token.split(".")
    signing_input = f"{head}.{payload}".encode()
    signature = _b64d(sig)
    if isinstance(key, ec.EllipticCurvePublicKey):
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
        der = utils.encode_dss_signature(r, s)
        return lambda: key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPublicKey):
        return lambda: key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    assert isinstance(key, ed25519.Ed25519PublicKey)
    return lambda: key.verify(signature, signing_input)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()
    print(f"{'key type':<12} {'jws.verify/s':>14} {'bare verify/s':>14} {'ratio':>7} {'jws.sign/s':>12}")
    for key_type in KeyType:
        ours, bare, signs = _measure(key_type, args.seconds)
        print(f"{key_type.value:<12} {ours:>14,.0f} {bare:>14,.0f} {ours / bare:>7.2f} {signs:>12,.0f}")


def _measure(key_type: KeyType, seconds: float) -> tuple[float, float, float]:
    key = generate_private_key(key_type)
    device_id = device_id_for(key.public_key())
    claims = {
        "device_id": device_id,
        "seq": 1,
        "ts": format_ts(utc_now()),
        "status": "ok",
        "metrics": {"cpu_percent": 12.5, "memory_mb": 512, "disk_free_mb": 2048, "uptime_s": 3600},
        "bundle": None,
        "config_version": None,
        "agent_version": "0.1.0",
    }
    token = jws.sign_claims(claims, key, kid=device_id, typ=jws.TYP_HEARTBEAT)
    public = key.public_key()
    ours = _rate(lambda: jws.verify(token, public), seconds)
    bare = _rate(_bare_verifier(public, token), seconds)
    signs = _rate(lambda: jws.sign_claims(claims, key, kid=device_id, typ=jws.TYP_HEARTBEAT), seconds)
    return ours, bare, signs


if __name__ == "__main__":
    main()
