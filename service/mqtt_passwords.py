"""MQTT passwords in Mosquitto's own format, so that its password file is generated from the
database without any plaintext: `$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>`,
what `mosquitto_passwd` 2.x writes (12-byte salt, 64-byte hash, 101 iterations).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

MOSQUITTO_ITERATIONS = 101  # mosquitto_passwd's default; hashing is done once, at registration
SALT_BYTES = 12
HASH_BYTES = 64


def new_password() -> str:
    """A random 144-bit password, URL-safe (24 characters)."""
    return secrets.token_urlsafe(18)


def hash_password(password: str, salt: bytes | None = None,
                  iterations: int = MOSQUITTO_ITERATIONS) -> str:
    """The `$7$` PBKDF2-SHA512 hash Mosquitto accepts in a password file."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    return (f"$7${iterations}${base64.b64encode(salt).decode()}"
            f"${base64.b64encode(digest).decode()}")


def verify_password(password: str, encoded: str) -> bool:
    """True when `password` matches a `$7$` hash."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[1] != "7":
        raise ValueError(f"not a Mosquitto $7$ hash: {encoded[:12]!r}...")
    iterations, salt, digest = int(parts[2]), base64.b64decode(parts[3]), base64.b64decode(parts[4])
    candidate = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(digest))
    return hmac.compare_digest(candidate, digest)
