# The wire contract between devices and the gateway (MQTT topics + binary messages).
# Runs unchanged under MicroPython and CPython: only struct, no classes from typing/dataclasses.
# Layouts, limits and the reasons for a binary encoding are in docs/wire.md.
from shared.wire_dev import *  # noqa: F401,F403 (the device side of the contract)
from shared.wire_ctl import *  # noqa: F401,F403
from shared.wire_ctl import _HELLO, _mac  # noqa: F401
from shared import wire_ctl as _ctl
from shared.wire_body import _need, _ascii, _decode_body  # noqa: F401
# the numbers and layouts the device module keeps as consts (shared/wire_dev.py contract())
from shared.wire_body import (VERSION, MAGIC, MSG_READINGS, MSG_RECORDS, MSG_ACK, MSG_STATE, MSG_GW_STATE,  # noqa: F401
                              MAX_PAYLOAD, MAX_DEVICE_ID, MAX_EVIDENCE, ACK_HAS_TIME, ACK_BODY, ACK_SIZE, _HDR,
                              _READING, _REC, _WINDOW, _ANOMALY, _STATUS, _CEP, _GAP, _ACK)
from shared.wire_dev import records_buffer, _check_max, _u32, _header, _ID_CHARS, _offsets, _i32  # noqa: F401
import struct
from shared.auth import MAC_LEN, equal

HDR_SIZE = struct.calcsize(_HDR)  # 22, followed by the device id bytes
_STATE = ">BB"  # online, reserved
FLAG_CLAMPED = 2  # value saturated to the int32 range

# ---------------------------------------------------------------- gateway side
# (and the encoders the board does not run: RAM, docs/firmware.md)


def to_fixed(x):
    """float -> fixed point int (value * SCALE), saturated to int32. Not for the per-sample path."""
    v = int(round(x * SCALE))
    if v > I32_MAX:
        return I32_MAX
    if v < I32_MIN:
        return I32_MIN
    return v


def readings_buffer(device_id, boot, base_seq, base_time, n):
    """(buffer, offset of the first record) of a readings message of n records (gateway side
    and tools; the board calls records_buffer(..., readings=True) itself)."""
    return records_buffer(device_id, boot, base_seq, base_time, n, n * READING_SIZE, True)


def put_reading(out, off, seq, t, ch, flags, value, base_seq, base_time):
    """One reading record at out[off:] of a readings_buffer (the board writes its records from
    the stored frames: firmware/uplink.py)."""
    ds = seq - base_seq
    dt = t - base_time
    if ds < 0 or ds > 0xFFFF or dt < I32_MIN or dt > I32_MAX:
        _offsets(seq, t, base_seq, base_time)  # raises the precise error
    if ch < 0 or ch > 255 or flags < 0 or flags > 255:
        raise WireError("bad_channel", repr((seq, t, ch, flags, value)))
    struct.pack_into(_READING, out, off, ds, dt, ch, flags, _i32(value, "value"))


def encode_readings(device_id, boot, readings):
    """readings: list of (seq, t_ms, channel, flags, value_fixed), seq ascending.

    One message per call; seqs must lie within 65535 of the first and times within +-24 days.
    """
    n = len(readings)
    if n == 0:
        raise WireError("empty")
    base_seq = readings[0][0]
    base_time = readings[0][1]
    out, off = readings_buffer(device_id, boot, base_seq, base_time, n)
    for r in readings:
        put_reading(out, off, r[0], r[1], r[2], r[3], r[4], base_seq, base_time)
        off += READING_SIZE
    return bytes(out)


def encode_records(device_id, boot, records):
    """records: list of (kind, seq, t_ms, flags, body), seq ascending; kind != READING."""
    n = len(records)
    if n == 0:
        raise WireError("empty")
    base_seq = records[0][1]
    base_time = records[0][2]
    out = bytearray(_header(MSG_RECORDS, device_id, boot, base_seq, base_time, n))
    for kind, seq, t, flags, body in records:
        ds, dt = _offsets(seq, t, base_seq, base_time)
        b = encode_body(kind, body)
        out.extend(struct.pack(_REC, kind, ds, dt, flags))
        out.extend(b)
    if len(out) > MAX_PAYLOAD:
        raise WireError("oversize", str(len(out)))
    return bytes(out)


KIND_NAMES = {1: "reading", 2: "window", 3: "cep", 4: "anomaly", 5: "status", 6: "gap"}


class Topics(_ctl.Topics):  # the device side + the gateway's subscriptions and parse
    def __init__(self, prefix="edgeflow"):
        super().__init__(prefix)
        self.sub_data = prefix + "/d/+/data"
        self.sub_hello = prefix + "/d/+/hello"
        self.sub_state = prefix + "/d/+/state"

    def parse(self, topic):
        """Return (device_id, leaf) for a device topic, raise WireError otherwise."""
        if isinstance(topic, (bytes, bytearray)):
            topic = bytes(topic).decode()
        p = self.prefix + "/d/"
        if not topic.startswith(p):
            raise WireError("bad_topic", topic)
        rest = topic[len(p):]
        i = rest.find("/")
        if i <= 0:
            raise WireError("bad_topic", topic)
        dev = rest[:i]
        leaf = rest[i + 1:]
        check_device_id(dev)
        if leaf not in ("data", "hello", "state", "ack"):
            raise WireError("bad_topic", topic)
        return dev, leaf


def decode_data(payload, max_size=MAX_PAYLOAD):
    """Decode a MSG_READINGS or MSG_RECORDS payload.

    Returns (mtype, device_id, boot, records). Readings are tuples
    (seq, t, channel, flags, value); other records (kind, seq, t, flags, body).
    Every problem raises WireError.
    """
    _check_max(payload, max_size)
    buf = payload
    _need(buf, 0, HDR_SIZE, "header")
    _m, _v, mtype, idlen, boot, base_seq, base_time, n = struct.unpack_from(_HDR, buf, 0)
    if mtype != MSG_READINGS and mtype != MSG_RECORDS:
        raise WireError("unexpected_type", str(mtype))
    if n == 0:
        raise WireError("empty")
    _need(buf, HDR_SIZE, idlen, "device id")
    dev = _ascii(buf[HDR_SIZE:HDR_SIZE + idlen], "device_id")
    check_device_id(dev)
    off = HDR_SIZE + idlen
    out = []
    last = -1
    if mtype == MSG_READINGS:
        if len(buf) != off + n * READING_SIZE:
            raise WireError("bad_length", "%d readings need %d bytes, got %d" % (n, off + n * READING_SIZE, len(buf)))
        for i in range(n):
            ds, dt, ch, fl, v = struct.unpack_from(_READING, buf, off)
            off += READING_SIZE
            if ds <= last:
                raise WireError("seq_order", "offset %d after %d" % (ds, last))
            last = ds
            out.append((base_seq + ds, base_time + dt, ch, fl, v))
    else:
        for i in range(n):
            _need(buf, off, REC_SIZE, "record header")
            kind, ds, dt, fl = struct.unpack_from(_REC, buf, off)
            off += REC_SIZE
            if kind == KIND_READING or kind not in KIND_NAMES:
                raise WireError("unknown_kind", str(kind))
            if ds <= last:
                raise WireError("seq_order", "offset %d after %d" % (ds, last))
            last = ds
            body, off = _decode_body(kind, buf, off)
            out.append((kind, base_seq + ds, base_time + dt, fl, body))
        if off != len(buf):
            raise WireError("trailing_bytes", str(len(buf) - off))
    if base_seq + last > 0xFFFFFFFF:
        raise WireError("bad_seq", "seq beyond u32")
    return mtype, dev, boot, out


def encode_ack(device_id, boot, seq, gw_time_ms, credits, nonce, key=None, replay=True, flags=ACK_HAS_TIME):
    """Gateway -> device: every record of `boot` with seq <= `seq` is committed.

    credits: backlog records the device may replay now; replay False holds replay.
    nonce: the one of the device's latest hello. key: the device's ack_key (bytes or an
    auth.Hmac); the MAC covers the device id and every field before it.
    """
    body = struct.pack(_ACK, MAGIC, VERSION, MSG_ACK, flags, _u32(boot, "boot"), _u32(seq, "seq"),
                       gw_time_ms, _u32(credits, "credits"), 1 if replay else 0, _u32(nonce, "nonce"))
    return body + _mac(key, (device_id.encode(), body))


def decode_hello(payload):
    """Returns a dict: device_id, boot, next_seq, now_ms, flags, backlog, floor_boot, floor_seq,
    instance, nonce, fw. Checks no MAC (hello_mac_ok does)."""
    _check_max(payload, 512)
    _need(payload, 0, HDR_SIZE, "header")
    _m, _v, mtype, idlen, boot, next_seq, now, flags = struct.unpack_from(_HDR, payload, 0)
    if mtype != MSG_HELLO:
        raise WireError("unexpected_type", str(mtype))
    _need(payload, HDR_SIZE, idlen + 21, "hello")
    dev = check_device_id(_ascii(payload[HDR_SIZE:HDR_SIZE + idlen], "device_id"))
    off = HDR_SIZE + idlen
    backlog, fb, fs, inst, nonce, fl = struct.unpack_from(_HELLO, payload, off)
    off += 21
    if len(payload) != off + fl + MAC_LEN:
        raise WireError("bad_length", "hello")
    fw = _ascii(payload[off:off + fl], "fw")
    if fb > boot or (fb == boot and fs > next_seq):
        raise WireError("bad_floor", "floor (%d, %d) above (%d, %d)" % (fb, fs, boot, next_seq))
    return {"device_id": dev, "boot": boot, "next_seq": next_seq, "now_ms": now, "flags": flags,
            "backlog": backlog, "floor_boot": fb, "floor_seq": fs, "instance": inst, "nonce": nonce, "fw": fw}


def hello_mac_ok(payload, key):
    """True if a decoded hello carries the MAC of `key` (bytes or auth.Hmac)."""
    n = len(payload) - MAC_LEN
    mv = memoryview(payload)
    return equal(_mac(key, (mv[:n],)), mv[n:])


MAX_FUTURE_MS = 86400000  # one day ahead of the gateway's clock


def check_event_time(t, now_ms, max_future=MAX_FUTURE_MS):
    """Gateway-side validation of an epoch-ms event time. Returns None or a reason."""
    if t < MIN_TIME_MS:
        if t >= 1577836800 and t < 4102444800:
            return "seconds_not_ms"
        return "before_2020"
    if t > now_ms + max_future:
        if t >= 1577836800000000:
            return "micros_not_ms"
        return "far_future"
    return None
