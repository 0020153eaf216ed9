# Wire contract tests; run under CPython (pytest) and MicroPython (tests/mp/logic_runner.py).
from shared import auth, wire
from tests.logic.util import raises
from tests.logic import wire_golden

T0 = 1767225600000  # 2026-01-01T00:00:00Z
KEY = bytes(range(32))


def _sample_records():
    return [
        (wire.KIND_WINDOW, 10, T0, 0, (2, 60000, 120, -5000, 31250, 21000, 1500, 0, 59500)),
        (wire.KIND_CEP, 11, T0 + 10, 0, ("hot_then_dry", 2, 9000, (30500, 19000))),
        (wire.KIND_ANOMALY, 12, T0 + 20, 0, (1, wire.DETECTOR_ZSCORE, 4200, 99000, 21000)),
        (wire.KIND_STATUS, 13, T0 + 30, 0, (3600, 12, 1400, 5, 2, -120, 80000, 3)),
        (wire.KIND_GAP, 14, T0 + 40, 0, (7, ((100, 50), (200, 1)))),
        (wire.KIND_CEP, 15, T0 - 5, wire.FLAG_UNSYNCED, ("x", 0, 0, ())),
    ]


def test_device_consts_match_their_layouts():
    # shared/wire_dev.py writes these sizes as consts (no struct.calcsize at import on the board)
    import struct
    assert wire.READING_SIZE == struct.calcsize(wire._READING) == 12
    assert wire.REC_SIZE == struct.calcsize(wire._REC) == 8
    assert wire.ACK_BODY == struct.calcsize(wire._ACK) and wire.ACK_SIZE == wire.ACK_BODY + auth.MAC_LEN
    assert wire.HDR_SIZE == struct.calcsize(wire._HDR) == 22
    assert (wire.MAGIC, wire.VERSION, wire.MSG_READINGS, wire.MSG_GW_STATE) == (0xE5, 2, 1, 6)


def test_readings_roundtrip():
    rs = [(5, T0, 0, 0, 21500), (6, T0 + 1000, 1, 0, -1), (9, T0 - 3, 255, wire.FLAG_UNSYNCED, wire.I32_MAX)]
    p = wire.encode_readings("node-1", 3, rs)
    assert len(p) == wire.HDR_SIZE + 6 + 3 * wire.READING_SIZE
    mtype, dev, boot, out = wire.decode_data(p)
    assert mtype == wire.MSG_READINGS and dev == "node-1" and boot == 3
    assert out == rs


def test_records_roundtrip_every_kind():
    recs = _sample_records()
    p = wire.encode_records("dev_A", 4294967295, recs)
    mtype, dev, boot, out = wire.decode_data(p)
    assert mtype == wire.MSG_RECORDS and dev == "dev_A" and boot == 4294967295
    assert len(out) == len(recs)
    for a, b in zip(out, recs):
        assert a[:4] == b[:4]
        assert tuple(a[4]) == tuple(b[4]) or (a[0] == wire.KIND_GAP and a[4][0] == b[4][0] and list(a[4][1]) == list(b[4][1]))


def test_ack_hello_state_roundtrip():
    k = auth.Hmac(KEY)
    a = wire.encode_ack("n1", 3, 77, T0, 500, 0xDEADBEEF, k, replay=False)
    assert len(a) == wire.ACK_SIZE == 45
    assert wire.decode_ack(a) == (3, 77, T0, 500, False, wire.ACK_HAS_TIME, 0xDEADBEEF)
    assert wire.ack_mac_ok(a, b"n1", k) and not wire.ack_mac_ok(a, b"n2", k)
    assert not wire.ack_mac_ok(a, b"n1", auth.Hmac(b"other key"))
    a2 = wire.encode_ack("n1", 3, 0, 0, 0, 1, flags=wire.ACK_NONE)
    assert wire.decode_ack(a2)[2] is None and a2[-16:] == bytes(16)
    h = wire.encode_hello("n1", 2, 40, T0, 1234, 1, 17, 0xFFFFFFFF, 7, "0.1.0", KEY)
    d = wire.decode_hello(h)
    assert d["device_id"] == "n1" and d["boot"] == 2 and d["next_seq"] == 40 and d["backlog"] == 1234
    assert d["floor_boot"] == 1 and d["floor_seq"] == 17 and d["fw"] == "0.1.0" and d["now_ms"] == T0
    assert d["instance"] == 0xFFFFFFFF and d["nonce"] == 7
    assert wire.hello_mac_ok(h, KEY) and wire.hello_mac_ok(h, k) and not wire.hello_mac_ok(h, b"x" * 32)
    bad = bytearray(h)
    bad[30] ^= 1
    assert not wire.hello_mac_ok(bytes(bad), k)
    assert wire.decode_state(wire.encode_state(True)) is True
    assert wire.decode_state(wire.encode_state(False, gateway=True), gateway=True) is False
    raises(wire.WireError, wire.decode_state, wire.encode_state(True), True)


def test_hello_floor_above_position_is_refused():
    # the floor may equal (boot, next_seq) (nothing held) but never lie above it
    wire.decode_hello(wire.encode_hello("n1", 2, 40, 0, 0, 2, 40, 1, 1, "f"))
    for fb, fs in ((2, 41), (3, 0)):
        e = raises(wire.WireError, wire.decode_hello, wire.encode_hello("n1", 2, 40, 0, 0, fb, fs, 1, 1, "f"))
        assert e.reason == "bad_floor"


def test_golden_control_vectors():
    # docs/wire.md: the same bytes under both runtimes, MAC included
    for name, hexstr, args in wire_golden.ACKS:
        dev, boot, seq, t, credits, nonce, replay, flags = args
        p = wire.encode_ack(dev, boot, seq, t, credits, nonce, bytes.fromhex(wire_golden.KEY), replay, flags)
        assert p.hex() == hexstr, name
        assert wire.decode_ack(p)[-1] == nonce
        assert wire.ack_mac_ok(p, dev.encode(), auth.Hmac(bytes.fromhex(wire_golden.KEY)))
    for name, hexstr, args in wire_golden.HELLOS:
        p = wire.encode_hello(*args, key=bytes.fromhex(wire_golden.KEY))
        assert p.hex() == hexstr, name
        d = wire.decode_hello(p)
        assert (d["device_id"], d["boot"], d["next_seq"], d["now_ms"], d["backlog"], d["floor_boot"],
                d["floor_seq"], d["instance"], d["nonce"], d["fw"]) == tuple(args)


def test_topics():
    t = wire.Topics("site/a")
    assert t.data("n1") == "site/a/d/n1/data"
    assert t.parse("site/a/d/n1/data") == ("n1", "data")
    assert t.parse(b"site/a/d/n-2/hello") == ("n-2", "hello")
    for bad in ("site/a/d//data", "site/a/d/n1/x", "other/d/n1/data", "site/a/d/n+1/data", "site/a/d/n1"):
        e = raises(wire.WireError, t.parse, bad)
        assert e.reason in ("bad_topic", "bad_device_id"), e.reason
    raises(wire.WireError, wire.Topics, "a+b")


def test_golden_vectors_decode_identically():
    for name, hexstr, expect in wire_golden.VECTORS:
        got = wire.decode_data(bytes.fromhex(hexstr))
        assert wire_golden.normalize(got) == expect, name


def test_golden_vectors_encode_identically():
    for name, hexstr, expect in wire_golden.VECTORS:
        mtype, dev, boot, recs = expect
        if mtype == wire.MSG_READINGS:
            p = wire.encode_readings(dev, boot, [tuple(r) for r in recs])
        else:
            p = wire.encode_records(dev, boot, wire_golden.denormalize(recs))
        assert p.hex() == hexstr, name


def test_rejections_have_reasons():
    good = wire.encode_readings("n1", 1, [(1, T0, 0, 0, 5)])
    cases = [
        (b"", "truncated"),
        (b"\x00" * 30, "bad_magic"),
        (bytes((wire.MAGIC, wire.VERSION + 1)) + good[2:], "newer_version"),
        (bytes((wire.MAGIC, 0)) + good[2:], "unknown_version"),
        (good[:-1], "bad_length"),
        (good + b"\x00", "bad_length"),
        (good[:10], "truncated"),
        (bytes(good[:2]) + b"\x09" + good[3:], "unexpected_type"),
        (b"\xe5" * (wire.MAX_PAYLOAD + 1), "oversize"),
        ("text", "not_bytes"),
    ]
    for payload, reason in cases:
        e = raises(wire.WireError, wire.decode_data, payload)
        assert e.reason == reason, (reason, e.reason)
    # device id with a topic wildcard inside the payload
    bad_id = bytearray(good)
    bad_id[wire.HDR_SIZE] = ord("+")
    assert raises(wire.WireError, wire.decode_data, bytes(bad_id)).reason == "bad_device_id"
    # out-of-order seq inside one batch
    two = bytearray(wire.encode_readings("n1", 1, [(1, T0, 0, 0, 5), (2, T0, 0, 0, 5)]))
    two[wire.HDR_SIZE + 2 + wire.READING_SIZE + 1] = 0
    assert raises(wire.WireError, wire.decode_data, bytes(two)).reason == "seq_order"
    rec = wire.encode_records("n1", 1, [_sample_records()[1]])
    assert raises(wire.WireError, wire.decode_data, rec + b"\x01").reason == "trailing_bytes"
    assert raises(wire.WireError, wire.decode_data, rec[:-2]).reason == "truncated"
    assert raises(wire.WireError, wire.decode_ack, b"\xe5\x02\x03").reason == "truncated"


def test_encoder_refuses_bad_values():
    raises(wire.WireError, wire.encode_readings, "n1", 1, [])
    raises(wire.WireError, wire.encode_readings, "n/1", 1, [(1, T0, 0, 0, 0)])
    raises(wire.WireError, wire.encode_readings, "n1", -1, [(1, T0, 0, 0, 0)])
    raises(wire.WireError, wire.encode_readings, "n1", 1, [(1, T0, 0, 0, wire.I32_MAX + 1)])
    raises(wire.WireError, wire.encode_readings, "n1", 1, [(1, T0, 0, 0, 0), (70000, T0, 0, 0, 0)])
    raises(wire.WireError, wire.encode_readings, "n1", 1, [(1, T0, 0, 0, 0), (2, T0 + (1 << 31), 0, 0, 0)])
    raises(wire.WireError, wire.encode_records, "n1", 1, [(99, 1, T0, 0, ())])
    raises(wire.WireError, wire.encode_records, "n1", 1, [(wire.KIND_CEP, 1, T0, 0, ("r", 1, 0, tuple(range(9))))])


def test_event_time_validation():
    now = T0
    assert wire.check_event_time(T0, now) is None
    assert wire.check_event_time(T0 // 1000, now) == "seconds_not_ms"
    assert wire.check_event_time(T0 * 1000, now) == "micros_not_ms"
    assert wire.check_event_time(1000, now) == "before_2020"
    assert wire.check_event_time(now + wire.MAX_FUTURE_MS + 1, now) == "far_future"
    assert wire.check_event_time(now + wire.MAX_FUTURE_MS, now) is None
    assert wire.check_event_time(wire.MIN_TIME_MS, now) is None
    assert wire.check_event_time(wire.MIN_TIME_MS - 1, now) == "before_2020"


def test_to_fixed():
    assert wire.to_fixed(21.5) == 21500
    assert wire.to_fixed(-0.0004) == 0
    assert wire.to_fixed(1e12) == wire.I32_MAX
