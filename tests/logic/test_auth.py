# HMAC-SHA256 by hand (shared/auth.py): RFC 4231 vectors, run under CPython and MicroPython.
# tests/test_wire_props.py also checks it against CPython's hmac on random keys and messages.
from shared import auth
from tests.logic.util import raises

# RFC 4231 test cases 1, 2, 3, 4, 6, 7 (HMAC-SHA-256)
RFC4231 = [
    (b"\x0b" * 20, b"Hi There",
     "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    (b"Jefe", b"what do ya want for nothing?",
     "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    (b"\xaa" * 20, b"\xdd" * 50,
     "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
    (bytes(range(1, 26)), b"\xcd" * 50,
     "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"),
    (b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
    (b"\xaa" * 131, b"This is a test using a larger than block-size key and a larger than block-size data. "
                    b"The key needs to be hashed before being used by the HMAC algorithm.",
     "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"),
]


def test_rfc4231_vectors():
    for key, msg, want in RFC4231:
        assert auth.hmac_sha256(key, msg).hex() == want


def test_parts_and_truncation():
    h = auth.Hmac(b"k" * 32)
    assert h.mac(b"ab", b"", b"cd", n=32) == h.mac(b"abcd", n=32) == auth.hmac_sha256(b"k" * 32, b"abcd")
    assert h.mac(memoryview(b"abcd")) == h.mac(b"abcd", n=32)[:auth.MAC_LEN]
    assert len(h.mac(b"x")) == 16


def test_equal_and_keys():
    assert auth.equal(b"abc", b"abc") and not auth.equal(b"abc", b"abd") and not auth.equal(b"ab", b"abc")
    assert auth.parse_key("00" * 32) == bytes(32)
    for bad in ("00" * 31, "zz" * 32, 5, None, "00" * 33):
        raises(ValueError, auth.parse_key, bad)
    raises(ValueError, auth.Hmac, b"")
