# HMAC-SHA256 (RFC 2104) by hand: MicroPython has hashlib.sha256 but no hmac module.
# Runs unchanged under MicroPython and CPython; checked against CPython's hmac in
# tests/logic/test_auth.py. The pads are computed once per key, so a MAC costs two
# sha256 objects and two digests.
import hashlib

MAC_LEN = 16  # bytes of the SHA-256 HMAC kept on the wire (128 bits)
KEY_LEN = 32


class Hmac:
    """Precomputed HMAC-SHA256 for one key: mac(a, b, ...) over the concatenation of the parts."""

    def __init__(self, key):
        if not isinstance(key, (bytes, bytearray)) or not key:
            raise ValueError("hmac key must be non-empty bytes")
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        k = bytearray(64)
        k[0:len(key)] = key
        ipad = bytearray(64)
        opad = bytearray(64)
        for i in range(64):
            ipad[i] = k[i] ^ 0x36
            opad[i] = k[i] ^ 0x5C
        self._ipad = bytes(ipad)
        self._opad = bytes(opad)

    def mac(self, *parts, n=MAC_LEN):
        """The HMAC over the parts, its first n bytes (MAC_LEN: what the wire carries; 32: all)."""
        h = hashlib.sha256(self._ipad)
        for p in parts:
            h.update(p)
        o = hashlib.sha256(self._opad)
        o.update(h.digest())
        return o.digest()[:n]


def hmac_sha256(key, msg):
    return Hmac(key).mac(msg, n=32)


def equal(a, b):
    """Constant-time comparison of two byte strings (no early exit on the first difference)."""
    if len(a) != len(b):
        return False
    d = 0
    for i in range(len(a)):
        d |= a[i] ^ b[i]
    return d == 0


def parse_key(text):
    """64 hex chars -> 32 key bytes; ValueError otherwise."""
    if not isinstance(text, str) or len(text) != 2 * KEY_LEN:
        raise ValueError("ack_key must be 64 hex characters")
    try:
        return bytes.fromhex(text)
    except Exception:
        raise ValueError("ack_key must be 64 hex characters")
