"""Poison input: every integer field of every message at 0, its maximum and max+1, and memory
bounded under hostile input (every readings count, thousands of invented device ids).

No input may make a commit fail, grow memory without bound, or stop a real device's records
from being committed and acked.
"""
import gc
import os
import struct

from gateway.service import Gateway
from shared import wire
from tests.test_gateway_fakes import T0, readings
from tests.test_gateway_pipeline import NOW, TOP, cfg, deliver, dump, flush, open_gw, run
from tools.fuzz_gateway import rss_kb

ID = b"px"
HDR = [(0, "B"), (1, "B"), (2, "B"), (3, "B"), (4, "I"), (8, "I"), (12, "q"), (20, "H")]
BODY = {
    wire.KIND_WINDOW: "BIIiiiIII",
    wire.KIND_ANOMALY: "BBiii",
    wire.KIND_STATUS: "IIIIIiII",
}


def _layout(fmt, base):
    out, off = [], base
    for c in fmt:
        out.append((off, c))
        off += struct.calcsize(">" + c)
    return out


def _limits(c):
    bits = struct.calcsize(">" + c) * 8
    if c.islower():
        return [-(1 << (bits - 1)), 0, (1 << (bits - 1)) - 1]
    return [0, 1, (1 << bits) - 1]


def variants(msg, fields):
    """The message with each field set to each of its limits (max+1 wraps to 0 in a fixed field)."""
    for off, c in fields:
        for v in _limits(c):
            b = bytearray(msg)
            struct.pack_into(">" + c, b, off, v)
            yield bytes(b)


def poison_messages():
    """(leaf, payload) for every field of every message type at its limits, plus the semantic
    max+1 cases a fixed-width field cannot hold (a seq or gap range past u32, counts one over)."""
    idl = len(ID)
    rd = wire.encode_readings("px", 5, [(10, T0, 0, 0, 1), (11, T0 + 10, 1, 0, 2)])
    flds = HDR + _layout("HiBBi", 22 + idl) + _layout("HiBBi", 22 + idl + 12)
    out = [("data", m) for m in variants(rd, flds)]
    recs = {
        wire.KIND_WINDOW: (0, 10000, 100, -5, 5, 0, 3, 10, 9990),
        wire.KIND_ANOMALY: (1, wire.DETECTOR_EWMA, 4500, 99000, 20000),
        wire.KIND_STATUS: (100, 5, 600, 20, 1, -12, 50000, 3),
    }
    for kind, body in recs.items():
        m = wire.encode_records("px", 5, [(kind, 20, T0, 0, body)])
        out += [("data", v) for v in variants(m, HDR + _layout("BHiB", 22 + idl) + _layout(BODY[kind], 30 + idl))]
    cep = wire.encode_records("px", 5, [(wire.KIND_CEP, 21, T0, 0, ("r1", 2, 5000, (1, 2)))])
    cb = 30 + idl
    out += [("data", v) for v in variants(cep, HDR + [(cb, "B"), (cb + 3, "B"), (cb + 4, "I"), (cb + 8, "B"),
                                                      (cb + 9, "i"), (cb + 13, "i")])]
    gap = wire.encode_records("px", 5, [(wire.KIND_GAP, 22, T0, 0, (5, ((30, 5), (40, 2))))])
    gb = 30 + idl
    out += [("data", v) for v in variants(gap, HDR + [(gb, "I"), (gb + 4, "B"), (gb + 5, "I"), (gb + 9, "H"),
                                                      (gb + 11, "I"), (gb + 15, "H")])]
    shared = []  # one device from here on: the hello then gaps and seqs at the u32 edge
    for ut in ((1 << 63) - 1, -(1 << 63)):  # unsynced records whose time cannot be stored
        for kind, body in recs.items():
            m = bytearray(wire.encode_records("px", 7, [(kind, 1, 0, wire.FLAG_UNSYNCED, body),
                                                        (kind, 2, 0, wire.FLAG_UNSYNCED, body)]))
            struct.pack_into(">q", m, 12, ut)
            struct.pack_into(">i", m, 22 + idl + 3 + 8 + struct.calcsize(">" + BODY[kind]), 100 if ut > 0 else -100)
            shared.append(("data", bytes(m)))
    U = 0xFFFFFFFF
    unsynced = wire.encode_readings("px", 6, [(7, 5000, 0, wire.FLAG_UNSYNCED, 1)])
    shared += [
        ("data", unsynced[:12] + struct.pack(">q", (1 << 63) - 1) + unsynced[20:]),
        ("hello", wire.encode_hello("px", 6, U, NOW, 0, 6, U, 0xA1, 7, "fw")),  # the crash-loop hello of issue 10
        ("data", wire.encode_records("px", 6, [(wire.KIND_GAP, U - 1, T0, 0, (6, ((U, 1),)))])),
        ("data", wire.encode_records("px", 6, [(wire.KIND_GAP, U, T0, 0, (6, ((U - 5, 0xFFFF),)))])),
        ("data", _raw_gap(6, U, 0xFFFF)),  # a range ending past u32
        ("data", wire.encode_readings("px", 6, [(U, T0, 0, 0, 1)])),
        ("data", _offset_past_u32()),  # base seq + offset = 2^32
        ("data", rd[:20] + struct.pack(">H", 3) + rd[22:]),  # count one over
        ("data", rd[:3] + bytes([idl + 1]) + rd[4:]),  # id length one over
    ]
    # hellos last: one with oldest_boot = max retires every boot of the device
    hello = wire.encode_hello("px", 5, 50, NOW, 3, 5, 40, 0xA1, 8, "fw-1")
    shared += [("hello", v) for v in variants(hello, HDR + _layout("IIIIIB", 22 + idl))]
    shared += [("data", gap), ("data", rd)]
    return out, shared


def _raw_gap(boot, first, length):
    m = bytearray(wire.encode_records("px", boot, [(wire.KIND_GAP, 3, T0, 0, (boot, ((1, 1),)))]))
    struct.pack_into(">IH", m, 30 + len(ID) + 5, first, length)
    return bytes(m)


def _offset_past_u32():
    m = bytearray(wire.encode_readings("px", 6, [(0xFFFFFF00, T0, 0, 0, 1), (0xFFFFFF01, T0, 0, 0, 1)]))
    struct.pack_into(">H", m, 22 + len(ID) + 12, 0x100)
    return bytes(m)


def test_every_field_at_its_limits_never_fails_a_commit(tmp_path):
    own, shared = poison_messages()
    msgs = own + shared
    assert len(msgs) > 300

    async def go():
        gw = await open_gw(cfg(tmp_path))
        try:
            # the real device says hello first: acks carry its nonce (none are sent without)
            deliver(gw, TOP.hello("real"), wire.encode_hello("real", 1, 0, NOW, 0, 1, 0, 0xB1, 9, "fw"))
            seq = 0
            chars = "abcdefghijklmnopqrstuvwxyz0123456789"
            for i, (leaf, m) in enumerate(msgs):
                if i < len(own):  # its own device, so dedup does not hide a field from the checks
                    dev = chars[i // 36 % 36] + chars[i % 36]
                    m = m[:22] + dev.encode() + m[24:]
                else:  # the hellos and what follows them share one device
                    dev = "px"
                deliver(gw, getattr(TOP, leaf)(dev), m)
                if i % 7 == 0:  # a real device keeps going in between
                    deliver(gw, TOP.data("real"), wire.encode_readings("real", 1, readings(seq, 5, T0)))
                    seq += 5
                if i % 25 == 0:
                    await flush(gw)  # a failing commit raises here
            await flush(gw)
            acks = gw.ingest.acks("real")
            assert acks and acks[-1][1] == seq - 1
            for dev in gw.devices.devs:
                for a in gw.ingest.acks(dev):  # every ack sent decodes (encode_ack never raised)
                    assert 0 <= a[1] <= 0xFFFFFFFF
            return seq, gw.stats.quarantined
        finally:
            await gw.store.close()

    seq, q = run(go())
    assert len(dump(str(tmp_path / "gw.db"), "readings", ("device",))) >= seq
    real = [r for r in dump(str(tmp_path / "gw.db"), "readings") if r[0] == "real"]
    assert sorted(r[2] for r in real) == list(range(seq))
    for reason in ("bad_gap", "bad_seq", "bad_length", "bad_unsynced_time", "truncated", "micros_not_ms", "before_2020"):
        assert q.get(reason), (reason, q)


def test_memory_bounded_under_hostile_counts_and_invented_ids(tmp_path):
    """Every readings count 1..max, 20,000 invented ids, thousands of distinct bad messages:
    RSS stays bounded, devices are capped with a counted refusal, quarantine rows and bytes too."""
    limits = {"max_devices": 500, "quarantine_payload_bytes": 256, "quarantine_max_rows": 2000}
    maxn = (wire.MAX_PAYLOAD - 22 - len(ID)) // wire.READING_SIZE
    # every count to 2,000 (+440 MB before the fix), then every 17th up to the largest that fits
    counts = list(range(1, 2001)) + list(range(2001, maxn + 1, 17)) + [maxn]

    async def go():
        # raw readings not kept: 15 M of them would only time the inserts
        gw = await open_gw(cfg(tmp_path, limits=limits, store={"retain_readings": False}))
        try:
            seq = 0
            samples = []
            for k, n in enumerate(counts):
                rs = [(seq + i, T0 + seq + i, 0, 0, i) for i in range(n)]
                seq += n
                deliver(gw, TOP.data("px"), wire.encode_readings("px", 1, rs))
                if k % 300 == 0:
                    await flush(gw)
                    gc.collect()
                    samples.append(rss_kb())
            for i in range(20000):
                dev = "inv%05d" % i
                deliver(gw, TOP.data(dev), wire.encode_readings(dev, 1, [(0, T0, 0, 0, i)]))
                if i % 2000 == 0:
                    await flush(gw)
                    gc.collect()
                    samples.append(rss_kb())
            for i in range(5000):  # distinct oversize garbage, 60 KB each
                deliver(gw, TOP.data("px"), os.urandom(16) + bytes(60000) + struct.pack(">I", i))
                if i % 500 == 0:
                    await flush(gw)
            await flush(gw)
            gc.collect()
            samples.append(rss_kb())
            assert gw.dedup.hwm("px", 1) == seq - 1  # every reading counted
            return samples, gw.stats.quarantined, len(gw.devices.devs), gw.stats.quarantine_pruned
        finally:
            await gw.store.close()

    samples, q, ndev, pruned = run(go())
    first = samples[1]  # after warm-up
    assert max(samples) - first < 60 * 1024, samples  # was +440 MB from the Struct cache alone
    assert ndev == 500 and q["too_many_devices"] == 20000 - 499
    import sqlite3
    db = sqlite3.connect(str(tmp_path / "gw.db"))
    rows, nbytes = db.execute("SELECT count(*), sum(length(payload)) FROM quarantine").fetchone()
    assert rows <= 2000 and nbytes <= 2000 * 256 and pruned > 0
    db.close()


def test_gateway_config_has_the_limits():
    g = Gateway({"limits": {"max_devices": 3}, "metrics": {"port": 0}})
    assert g.max_devices == 3 and g.q_rows > 0 and g.q_bytes > 0
