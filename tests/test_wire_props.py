"""Property-based tests of the wire contract (CPython only: hypothesis)."""
from hypothesis import given, settings, strategies as st

from shared import wire

T0 = 1767225600000
dev_ids = st.text(alphabet="abcXYZ019_-", min_size=1, max_size=32)
i32 = st.integers(wire.I32_MIN, wire.I32_MAX)


@st.composite
def reading_batches(draw):
    n = draw(st.integers(1, 200))
    base = draw(st.integers(0, 0xFFFFFFFF - 0x10000))
    offs = sorted(draw(st.sets(st.integers(0, 0xFFFF), min_size=n, max_size=n)))
    t0 = draw(st.integers(T0 - 10**9, T0 + 10**9))
    return [(base + o, t0 + draw(st.integers(-(2**31), 2**31 - 1)), draw(st.integers(0, 255)),
             draw(st.integers(0, 3)), draw(i32)) for o in offs]


@settings(max_examples=200, deadline=None)
@given(dev_ids, st.integers(0, 0xFFFFFFFF), reading_batches())
def test_readings_roundtrip(dev, boot, rs):
    rs[0] = (rs[0][0], rs[0][1], rs[0][2], rs[0][3], rs[0][4])
    # times are relative to the first record: keep every offset inside int32
    base_t = rs[0][1]
    rs = [(s, base_t + ((t - base_t) % (2**31)), c, f, v) for s, t, c, f, v in rs]
    assert wire.decode_data(wire.encode_readings(dev, boot, rs)) == (wire.MSG_READINGS, dev, boot, rs)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_only_raises_wire_error(blob):
    for fn in (wire.decode_data, wire.decode_ack, wire.decode_hello, wire.decode_state):
        try:
            fn(blob)
        except wire.WireError as e:
            assert e.reason
        except Exception as e:  # pragma: no cover - the point of the test
            raise AssertionError("%s raised %r on %r" % (fn.__name__, e, blob))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_payload_raises_only_wire_error(data):
    p = bytearray(wire.encode_records("n1", 5, [
        (wire.KIND_CEP, 1, T0, 0, ("rule", 1, 10, (1, 2))),
        (wire.KIND_GAP, 2, T0, 0, (4, ((1, 2),))),
        (wire.KIND_WINDOW, 3, T0, 0, (0, 1000, 3, 1, 2, 3, 4, 5, 6)),
    ]))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(p) - 1))
        p[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(p)))
    try:
        wire.decode_data(bytes(p[:cut]))
    except wire.WireError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.lists(st.binary(max_size=300), max_size=4))
def test_hand_hmac_matches_cpython_hmac(key, parts):
    import hashlib
    import hmac

    from shared import auth
    want = hmac.new(key, b"".join(parts), hashlib.sha256).digest()
    assert auth.Hmac(key).mac(*parts, n=32) == want == auth.hmac_sha256(key, b"".join(parts))


@settings(max_examples=200, deadline=None)
@given(dev_ids, st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
       st.integers(0, 0xFFFFFFFF), st.booleans(), st.binary(min_size=32, max_size=32), st.integers(0, 44))
def test_any_changed_ack_byte_fails_the_mac(dev, boot, seq, credits, nonce, replay, key, pos):
    from shared import auth
    k = auth.Hmac(key)
    a = wire.encode_ack(dev, boot, seq, T0, credits, nonce, k, replay)
    assert wire.ack_mac_ok(a, dev.encode(), k)
    b = bytearray(a)
    b[pos] ^= 1
    assert not wire.ack_mac_ok(bytes(b), dev.encode(), k)
    assert not wire.ack_mac_ok(a, (dev + "x").encode(), k)
