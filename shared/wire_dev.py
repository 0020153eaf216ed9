# The wire contract, device side: everything the firmware runs in steady state (constants,
# encoders, the ack / state decoders it needs); topics and the hello are in shared/wire_ctl.py
# (boot and connect time: the board unloads it after use). shared/wire.py is the whole contract: it re-exports this
# module and adds the gateway-side decoders (decode_data, decode_hello, encode_ack,
# check_event_time), which the board never loads (RAM: docs/firmware.md). One contract, two
# modules: change a layout here, the gateway side reads the same constants.
import struct

from shared.auth import equal

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

# The numbers and layouts only this module and the gateway side use are underscore consts: the
# board keeps no name for them (RAM: each kept name is a qstr); shared/wire.py takes them from
# contract() under their public names (MAGIC, VERSION, MSG_READINGS, ..., via shared/wire_body.py).
_VERSION = const(2)  # v2: hello carries instance id, session nonce, floor and a MAC; acks are authenticated
_MAGIC = const(0xE5)

# Message types (byte 2 of every message).
_MSG_READINGS = const(1)  # batch of raw readings, fixed 12-byte records
_MSG_RECORDS = const(2)  # batch of window / cep / anomaly / status / gap records
_MSG_ACK = const(3)  # gateway -> device
MSG_HELLO = 4  # device birth: firmware, backlog
_MSG_STATE = const(5)  # device online/offline (retained; offline is the last will)
_MSG_GW_STATE = const(6)  # gateway online/offline (retained; offline is its last will)

# Record kinds. Identity of every record is (device_id, boot, seq).
KIND_READING = 1
KIND_WINDOW = 2
KIND_CEP = 3
KIND_ANOMALY = 4
KIND_STATUS = 5
KIND_GAP = 6  # seq ranges the device dropped by policy (outbox full)

# Record flags (FLAG_CLAMPED: shared/wire.py).
FLAG_UNSYNCED = 1  # t is ms since boot, not epoch: the device had no clock yet

# Values travel as fixed point: value * SCALE as a signed 32-bit integer.
SCALE = 1000
I32_MIN = -2147483648
I32_MAX = 2147483647

_MAX_PAYLOAD = const(65536)  # bytes; larger payloads are rejected before parsing
_MAX_DEVICE_ID = const(32)
MAX_RULE_ID = 32
_MAX_EVIDENCE = const(8)
MAX_GAP_RANGES = 16
MAX_FW = 32

_HDR = const(">BBBBIIqH")  # magic, version, type, id length, boot, base_seq, base_time, count (22 bytes)
_READING = const(">HiBBi")  # seq offset, time offset, channel, flags, value
READING_SIZE = 12  # struct.calcsize(_READING) (tests/logic/test_wire.py checks these sizes)
_REC = const(">BHiB")  # kind, seq offset, time offset, flags
REC_SIZE = 8
_WINDOW = const(">BIIiiiIII")  # channel, size_ms, count, min, max, mean, std, first_dt, last_dt
_ANOMALY = const(">BBiii")  # channel, detector, score, value, baseline
_STATUS = const(">IIIIIiII")  # uptime_s, outbox_records, outbox_bytes, dropped, late, clock_offset_ms, free_mem, reconnects
_CEP = const(">BIB")  # severity, span_ms, evidence count (rule id and evidence follow)
_GAP = const(">IB")  # boot of the dropped records, range count; then (first_seq u32, length u16) each
_ACK = const(">BBBBIIqIBI")  # magic, version, type, flags, boot, seq, gw_time_ms, credits, replay (0/1), nonce; + MAC

DETECTOR_ZSCORE = 1
DETECTOR_EWMA = 2

# Ack flags.
_ACK_HAS_TIME = const(1)  # gw_time_ms is a valid time beacon
ACK_NONE = 2  # nothing of this boot committed yet (seq is meaningless)
_ACK_BODY = const(29)  # struct.calcsize(_ACK)
_ACK_SIZE = const(45)  # _ACK_BODY + shared.auth.MAC_LEN


def contract():
    """The consts above, for the gateway side (shared/wire_body.py names them in this order):
    one definition, and on MicroPython a const's name is not kept, so it cannot be imported."""
    # a list: a constant tuple would keep its strings as heap objects, not the interned layouts
    return [_VERSION, _MAGIC, _MSG_READINGS, _MSG_RECORDS, _MSG_ACK, _MSG_STATE, _MSG_GW_STATE, _MAX_PAYLOAD,
            _MAX_DEVICE_ID, _MAX_EVIDENCE, _ACK_HAS_TIME, _ACK_BODY, _ACK_SIZE, _HDR, _READING, _REC, _WINDOW,
            _ANOMALY, _STATUS, _CEP, _GAP, _ACK]


class WireError(ValueError):
    """The one error every decoder raises; .reason is a short machine-readable cause."""

    def __init__(self, reason, detail=""):
        super().__init__(reason + (": " + detail if detail else ""))
        self.reason = reason
        self.detail = detail


_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"


def check_topic_part(s, what, limit, allow_slash=False):
    if not isinstance(s, str) or not s or len(s) > limit:
        raise WireError("bad_" + what, repr(s))
    for c in s:
        if c not in _ID_CHARS and not (allow_slash and c == "/"):
            raise WireError("bad_" + what, repr(s))
    return s


def check_device_id(dev):
    """Device ids are 1..32 of [A-Za-z0-9_-]: safe in topics and file names."""
    return check_topic_part(dev, "device_id", _MAX_DEVICE_ID)


# ---------------------------------------------------------------- helpers


def _u32(v, what):
    if not isinstance(v, int) or v < 0 or v > 0xFFFFFFFF:
        raise WireError("bad_" + what, repr(v))
    return v


def _i32(v, what):
    if not isinstance(v, int) or v < I32_MIN or v > I32_MAX:
        raise WireError("bad_" + what, repr(v))
    return v


# ---------------------------------------------------------------- data messages


def _header(mtype, device_id, boot, base_seq, base_time, n):
    check_device_id(device_id)
    _u32(boot, "boot")
    _u32(base_seq, "seq")
    if not isinstance(base_time, int):
        raise WireError("bad_time", repr(base_time))
    if n > 0xFFFF:
        raise WireError("too_many_records", str(n))
    idb = device_id.encode()
    return struct.pack(_HDR, _MAGIC, _VERSION, mtype, len(idb), boot, base_seq, base_time, n) + idb


def _offsets(seq, t, base_seq, base_time):
    ds = seq - base_seq
    if ds < 0 or ds > 0xFFFF:
        raise WireError("seq_span", "seq %d base %d" % (seq, base_seq))
    dt = t - base_time
    if dt < I32_MIN or dt > I32_MAX:
        raise WireError("time_span", "t %d base %d" % (t, base_time))
    return ds, dt


def records_buffer(device_id, boot, base_seq, base_time, n, nbytes, readings=False):
    """(buffer, offset of the first record): a records message (a readings message with
    readings) of n records taking nbytes in all, its header written. The device encodes straight
    from its stored frames (firmware/uplink.py): a reading is READING_SIZE bytes; any other
    record is put_record's REC_SIZE bytes and the stored body after it (the outbox keeps
    encode_body's bytes). The gateway side: shared/wire.py put_reading / encode_records."""
    if n == 0:
        raise WireError("empty")
    h = _header(_MSG_READINGS if readings else _MSG_RECORDS, device_id, boot, base_seq, base_time, n)
    off = len(h)
    if off + nbytes > _MAX_PAYLOAD:
        raise WireError("oversize", str(off + nbytes))
    out = bytearray(off + nbytes)
    out[0:off] = h
    return out, off


def put_record(out, off, kind, seq, t, flags, base_seq, base_time):
    """The record header (kind, seq and time offsets, flags) of a records message at out[off:];
    its body follows at off + REC_SIZE."""
    ds, dt = _offsets(seq, t, base_seq, base_time)
    struct.pack_into(_REC, out, off, kind, ds, dt, flags)


def encode_body(kind, body):
    """Kind-specific bytes of a non-reading record. body is a tuple, see docs/wire.md."""
    if kind == KIND_WINDOW:
        ch, size_ms, count, mn, mx, mean, std, first_dt, last_dt = body
        return struct.pack(_WINDOW, ch, size_ms, count, _i32(mn, "min"), _i32(mx, "max"),
                           _i32(mean, "mean"), _u32(std, "std"), first_dt, last_dt)
    if kind == KIND_CEP:
        rule_id, severity, span_ms, evidence = body
        check_topic_part(rule_id, "rule_id", MAX_RULE_ID)
        if len(evidence) > _MAX_EVIDENCE:
            raise WireError("bad_evidence", "more than %d values" % _MAX_EVIDENCE)
        rb = rule_id.encode()
        out = bytearray(struct.pack(">B", len(rb)) + rb + struct.pack(_CEP, severity, _u32(span_ms, "span"), len(evidence)))
        for v in evidence:
            out.extend(struct.pack(">i", _i32(v, "evidence")))
        return bytes(out)
    if kind == KIND_ANOMALY:
        ch, detector, score, value, baseline = body
        return struct.pack(_ANOMALY, ch, detector, _i32(score, "score"), _i32(value, "value"), _i32(baseline, "baseline"))
    if kind == KIND_STATUS:
        up, ob_n, ob_b, dropped, late, offset, free, reconnects = body
        return struct.pack(_STATUS, up, ob_n, ob_b, dropped, late, _i32(offset, "offset"), free, reconnects)
    if kind == KIND_GAP:
        gboot, ranges = body
        if not ranges or len(ranges) > MAX_GAP_RANGES:
            raise WireError("bad_gap", "1..%d ranges" % MAX_GAP_RANGES)
        out = bytearray(struct.pack(_GAP, _u32(gboot, "boot"), len(ranges)))
        for first, length in ranges:
            if length < 1 or length > 0xFFFF:
                raise WireError("bad_gap", "length %r" % length)
            out.extend(struct.pack(">IH", _u32(first, "seq"), length))
        return bytes(out)
    raise WireError("unknown_kind", str(kind))


def _check_max(payload, max_size):
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WireError("not_bytes", str(type(payload)))
    if len(payload) > max_size:
        raise WireError("oversize", "%d > %d bytes" % (len(payload), max_size))
    if len(payload) < 4:
        raise WireError("truncated", "%d bytes" % len(payload))
    if payload[0] != _MAGIC:
        raise WireError("bad_magic", "0x%02x" % payload[0])
    if payload[1] != _VERSION:
        if payload[1] > _VERSION:
            raise WireError("newer_version", "v%d, this side speaks v%d" % (payload[1], _VERSION))
        raise WireError("unknown_version", "v%d" % payload[1])


# ---------------------------------------------------------------- control messages


def decode_ack(payload):
    """Returns (boot, seq, gw_time_ms or None, credits, replay, flags, nonce). Checks no MAC:
    the device does (ack_mac_ok) before it acts on anything in it."""
    _check_max(payload, 256)
    if len(payload) != _ACK_SIZE:
        raise WireError("bad_length", "ack is %d bytes" % _ACK_SIZE)
    _m, _v, mtype, flags, boot, seq, t, credits, replay, nonce = struct.unpack_from(_ACK, payload, 0)
    if mtype != _MSG_ACK:
        raise WireError("unexpected_type", str(mtype))
    if replay > 1:
        raise WireError("bad_replay", str(replay))
    return boot, seq, (t if flags & _ACK_HAS_TIME else None), credits, replay == 1, flags, nonce


def ack_mac_ok(payload, device_id_bytes, key):
    """True if an ack payload (decode_ack checked its size) carries the MAC of `key` (an
    auth.Hmac) for this device."""
    mv = memoryview(payload)
    return equal(key.mac(device_id_bytes, mv[:_ACK_BODY]), mv[_ACK_BODY:_ACK_SIZE])


def encode_state(online, gateway=False):
    """Device or gateway presence (retained). The offline form is the last will."""
    return bytes((_MAGIC, _VERSION, _MSG_GW_STATE if gateway else _MSG_STATE, 0, 1 if online else 0, 0))


def decode_state(payload, gateway=False):
    """Returns True for online, False for offline."""
    _check_max(payload, 64)
    if len(payload) != 6:
        raise WireError("bad_length", "state is 6 bytes")
    if payload[2] != (_MSG_GW_STATE if gateway else _MSG_STATE):
        raise WireError("unexpected_type", str(payload[2]))
    if payload[4] > 1:
        raise WireError("bad_state", str(payload[4]))
    return payload[4] == 1


# ---------------------------------------------------------------- event time


MIN_TIME_MS = 1577836800000  # 2020-01-01T00:00:00Z
