# Outbox frames for tests and tools (firmware/outbox.py has the layout): build one, decode the
# records of frames with every body (shared/wire_body.py). The app never loads this module, so
# none of its names are qstrs on the board (RAM).
import struct
import binascii

from firmware import obfull

_MAGIC = 0xA5
_PAYSZ = 18  # boot, seq, t, kind, flags


def encode_frame(boot, seq, t, kind, flags, body_bytes):
    n = _PAYSZ + len(body_bytes)
    head = struct.pack(">BHIIqBB", _MAGIC, n, boot, seq, t, kind, flags) + body_bytes
    return head + struct.pack(">I", binascii.crc32(head) & 0xFFFFFFFF)


def decode_payload(data, off, n):
    """(boot, seq, t, kind, flags, body) of a verified frame payload, every body decoded."""
    rec = obfull.decode_payload(data, off, n)
    if rec[5] is not None:
        return rec
    from shared.wire_body import _decode_body
    from shared import wire_dev as wire
    body, bo = _decode_body(rec[3], data, off + _PAYSZ)
    if bo != off + n:
        raise wire.WireError("bad_length", "outbox body")
    return rec[:5] + (body,)


def records(fr):
    """The records (boot, seq, t, kind, flags, body) of frames as read_backlog / take_live
    hand them out (the uplink encodes from the frames)."""
    out = []
    o = 0
    while o < len(fr):
        n = (fr[o + 1] << 8) | fr[o + 2]
        out.append(decode_payload(fr, o + 3, n))
        o += n + 7
    return out


def read_frame(f):
    """Next (frame bytes, record) from an open segment file, every body decoded; None at the
    end or at a torn / corrupt frame (obfull.read_frame)."""
    r = obfull.read_frame(f)
    if r is None or r[1][5] is not None:
        return r
    try:
        return r[0], decode_payload(r[0], 3, len(r[0]) - 7)
    except (ValueError, KeyError):
        return None
