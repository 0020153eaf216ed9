# The wire contract: decoders of record bodies (window, CEP, anomaly, status, gap) and their
# helpers. The gateway decodes every records message with them (shared/wire.py re-exports this
# module); the board does not load it: the device sends stored bodies as they are
# (wire_dev.put_record) and the outbox's compaction decodes only gap bodies (firmware/obfull.py).
import struct

from shared.wire_dev import (WireError, check_topic_part, KIND_WINDOW, KIND_CEP, KIND_ANOMALY, KIND_STATUS,
                             KIND_GAP, MAX_RULE_ID, MAX_GAP_RANGES, DETECTOR_ZSCORE, DETECTOR_EWMA, contract)

# the numbers and layouts shared/wire_dev.py keeps as consts (shared/wire.py re-exports them)
(VERSION, MAGIC, MSG_READINGS, MSG_RECORDS, MSG_ACK, MSG_STATE, MSG_GW_STATE, MAX_PAYLOAD, MAX_DEVICE_ID, MAX_EVIDENCE,
 ACK_HAS_TIME, ACK_BODY, ACK_SIZE, _HDR, _READING, _REC, _WINDOW, _ANOMALY, _STATUS, _CEP, _GAP, _ACK) = contract()


def _need(buf, off, size, what):
    if off + size > len(buf):
        raise WireError("truncated", what)


def _ascii(b, what):
    try:
        s = bytes(b).decode()
    except Exception:
        raise WireError("bad_" + what, "not utf-8")
    return s


def _decode_body(kind, buf, off):
    """Return (body tuple, new offset)."""
    if kind == KIND_WINDOW:
        size = 33
        _need(buf, off, size, "window")
        return struct.unpack_from(_WINDOW, buf, off), off + size
    if kind == KIND_CEP:
        _need(buf, off, 1, "cep")
        ln = buf[off]
        off += 1
        _need(buf, off, ln + 6, "cep")
        rule = _ascii(buf[off:off + ln], "rule_id")
        check_topic_part(rule, "rule_id", MAX_RULE_ID)
        off += ln
        sev, span, ne = struct.unpack_from(_CEP, buf, off)
        off += 6
        if ne > MAX_EVIDENCE:
            raise WireError("bad_evidence", str(ne))
        _need(buf, off, 4 * ne, "cep evidence")
        ev = struct.unpack_from(">" + "i" * ne, buf, off) if ne else ()
        return (rule, sev, span, tuple(ev)), off + 4 * ne
    if kind == KIND_ANOMALY:
        _need(buf, off, 14, "anomaly")
        b = struct.unpack_from(_ANOMALY, buf, off)
        if b[1] not in (DETECTOR_ZSCORE, DETECTOR_EWMA):
            raise WireError("bad_detector", str(b[1]))
        return b, off + 14
    if kind == KIND_STATUS:
        _need(buf, off, 32, "status")
        return struct.unpack_from(_STATUS, buf, off), off + 32
    if kind == KIND_GAP:
        _need(buf, off, 5, "gap")
        gboot, nr = struct.unpack_from(_GAP, buf, off)
        off += 5
        if nr < 1 or nr > MAX_GAP_RANGES:
            raise WireError("bad_gap", str(nr))
        _need(buf, off, 6 * nr, "gap ranges")
        ranges = []
        for i in range(nr):
            first, length = struct.unpack_from(">IH", buf, off)
            if length < 1:
                raise WireError("bad_gap", "empty range")
            if first + length - 1 > 0xFFFFFFFF:
                raise WireError("bad_gap", "range beyond u32")
            ranges.append((first, length))
            off += 6
        return (gboot, tuple(ranges)), off
    raise WireError("unknown_kind", str(kind))
