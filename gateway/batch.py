"""The per-reading loops of a readings batch (service._readings_fast): decode, per-channel aggregates.

Pure Python, and compiled by Cython when the package is built with a C compiler (setup.py,
gateway/batch.pxd declares the C types): then `COMPILED` is True and the byte loops below
(`_scan_bytes`, `_aggs_bytes`) run in C straight over the payload, with no Python int per
value. Uncompiled, the same functions run as Python (slow, used by the tests to compare) and
the gateway takes the struct/slice path instead (`scan` returns the unpacked values).
gateway/accel.py picks the compiled module (gateway._c_batch) only if it was built from this
very source.

A reading is 12 bytes, big-endian: seq offset u16, time offset i32, channel u8, flags u8,
value i32 (shared/wire.py).
"""
import struct
from itertools import compress
from operator import mul

from shared.wire import MAGIC, MAX_PAYLOAD, MSG_READINGS, VERSION
from shared.wire_dev import READING_SIZE

COMPILED = not __file__.endswith(".py")

_FMT = {}  # count -> (Struct for count readings unpacked flat, tuple(range(count)))
_FMT_BUDGET = 16384  # sum of the cached counts: every count an attacker sends must not stay cached
_fmt_size = [0]
_TWO32 = 1 << 32  # a Python int: the halves are joined as Python ints, not in 64 C bits


def _readings_struct(n):
    """(Struct, tuple(range(n))) for n readings; the cache is bounded (oldest entries leave)."""
    s = _FMT.get(n)
    if s is None:
        while _FMT and _fmt_size[0] + n > _FMT_BUDGET:
            _fmt_size[0] -= _FMT.pop(next(iter(_FMT)))[0].size // READING_SIZE
        s = _FMT[n] = (struct.Struct(">" + "HiBBi" * n), tuple(range(n)))
        _fmt_size[0] += n
    return s


_HDR = struct.Struct(">BBBBIIqH")  # magic, version, type, id length, boot, base seq, base time, count


def head(payload, devb):
    """A readings batch of device devb (its id as bytes) whose seq offsets are exactly 0..n-1 (the
    common batch): (boot, base seq, base time, n, offset of the readings, src, time offsets,
    flags of all readings or-ed, first time, last time, times in order). None for anything else
    (the full decoder says what). src: as scan(). The time offsets are None when compiled (a
    Python int each: most batches need none): scan() gives them."""
    if COMPILED and type(payload) is bytes and type(devb) is bytes:
        return _head_bytes(payload, devb)
    size = len(payload)
    if not (22 <= size <= MAX_PAYLOAD and payload[2] == MSG_READINGS and payload[0] == MAGIC and
            payload[1] == VERSION):
        return None
    _m, _v, _t, idlen, boot, base, base_t, n = _HDR.unpack_from(payload)
    off = 22 + idlen
    if not (n and size == off + 12 * n and payload[22:off] == devb and base + n <= 0x100000000):
        return None
    sc = scan(payload, off, n)
    if sc is None:
        return None
    src, toffs, fl = sc
    return (boot, base, base_t, n, off, src, toffs, fl, base_t + min(toffs), base_t + max(toffs),
            toffs == tuple(sorted(toffs)))


def _head_bytes(payload, devb):
    """head() reading the bytes one by one (C when compiled). The times stay Python ints: a
    hostile base time near 2^63 plus an offset must not wrap."""
    p = payload
    size = len(payload)
    if not (22 <= size <= MAX_PAYLOAD and p[2] == MSG_READINGS and p[0] == MAGIC and p[1] == VERSION):
        return None
    idlen = p[3]
    n = p[20] << 8 | p[21]
    off = 22 + idlen
    if n == 0 or size != off + 12 * n or len(devb) != idlen:
        return None
    d = devb
    for k in range(idlen):
        if p[22 + k] != d[k]:
            return None
    boot = _u32(p, 4)
    base = _u32(p, 8)
    if base + n > 0x100000000:
        return None
    base_t = _i32(p, 12) * 4294967296 + _u32(p, 16)  # int64: in the C range at every step
    fl = 0
    ordered = True
    t = _i32(p, off + 2)
    lo = hi = prev = t
    for k in range(n):
        o = off + 12 * k
        if (p[o] << 8 | p[o + 1]) != k:
            return None
        t = _i32(p, o + 2)
        fl |= p[o + 7]
        if t < prev:
            ordered = False
        if t < lo:
            lo = t
        elif t > hi:
            hi = t
        prev = t
    bto = base_t  # a Python int (object when compiled): the sums below must not wrap
    return boot, base, bto, n, off, None, None, fl, bto + lo, bto + hi, ordered


def _u32(p, o):
    hi = p[o] << 8 | p[o + 1]  # a C long long when compiled: the shifts below stay in range
    return hi * 65536 + (p[o + 2] << 8 | p[o + 3])


def scan(payload, off, n):
    """n readings at payload[off:]. None unless their seq offsets are exactly 0..n-1 (the common
    batch); else (src, time offsets as a tuple, the flags of all readings or-ed). src is what
    aggs() and columns() take: the unpacked values (pure Python) or None (compiled: they read
    the payload)."""
    if COMPILED and type(payload) is bytes:
        return _scan_bytes(payload, off, n)
    fmt, rng = _readings_struct(n)
    flat = fmt.unpack_from(payload, off)
    if flat[0::5] != rng:
        return None
    fl = 0
    for f in set(flat[3::5]):
        fl |= f
    return flat, flat[1::5], fl


def columns(src, payload, off, i, j):
    """(channels, flags, values) of readings i..j-1, as tuples."""
    if src is not None:
        return src[5 * i + 2:5 * j:5], src[5 * i + 3:5 * j:5], src[5 * i + 4:5 * j:5]
    fmt, _rng = _readings_struct(j - i)
    flat = fmt.unpack_from(payload, off + 12 * i)
    return flat[2::5], flat[3::5], flat[4::5]


def raw_rows(dev, boot, base, base_t, toffs, chans, flags, vals):
    """The raw rows of n readings as one flat list, store.RAW_COLS (7) values per reading (the
    columns filled by C loops: slice assignments)."""
    n = len(toffs)
    buf = [dev] * (7 * n)
    buf[1::7] = [boot] * n
    buf[2::7] = range(base, base + n)
    buf[3::7] = map(base_t.__add__, toffs)
    buf[4::7] = chans
    buf[5::7] = flags
    buf[6::7] = vals
    return buf


def aggs(src, payload, off, i, j, hint):
    """Per-channel aggregates of readings i..j-1: ([(channel, count, sum, sum of squares, min,
    max)], hint). hint: the channels per tick of the device's last batch (a guess that lets the
    pure path take every m-th value); returned updated."""
    if src is None:
        return _aggs_bytes(payload, off, i, j), hint
    chans = src[5 * i + 2:5 * j:5]
    vals = src[5 * i + 4:5 * j:5]
    n = j - i
    # Channel k of a period of m is vals[k::m] (aggregates add, so a channel may recur
    # within the period). m: the hint, else found again.
    m = hint if hint < n else n
    if chans[m:] != chans[:-m]:
        hint = len(set(chans))
        m = hint if hint < n else n
        if chans[m:] != chans[:-m]:
            m = 0  # no period: split by channel
    if m == 1:
        return [(chans[0], n, sum(vals), sum(map(mul, vals, vals)), min(vals), max(vals))], hint
    out = []
    if m:
        sq = list(map(mul, vals, vals))
        for k in range(m):
            vs = vals[k::m]
            out.append((chans[k], len(vs), sum(vs), sum(sq[k::m]), min(vs), max(vs)))
    else:
        for ch in set(chans):
            vs = list(compress(vals, map(ch.__eq__, chans)))
            out.append((ch, len(vs), sum(vs), sum(map(mul, vs, vs)), min(vs), max(vs)))
    return out, hint


def _i32(p, o):
    # the signed top byte times 2^24 plus the rest: in the int32 range at every step (C ints)
    return ((p[o] ^ 0x80) - 0x80) * 16777216 + (p[o + 1] << 16 | p[o + 2] << 8 | p[o + 3])


def _scan_bytes(payload, off, n):
    """scan() reading the bytes one by one (C when compiled)."""
    p = payload
    toffs = [0] * n
    fl = 0
    for k in range(n):
        o = off + 12 * k
        if (p[o] << 8 | p[o + 1]) != k:
            return None
        toffs[k] = _i32(p, o + 2)
        fl |= p[o + 7]
    return None, tuple(toffs), fl


def _aggs_bytes(payload, off, i, j):
    """aggs() reading the bytes one by one (C when compiled). Sums of squares in two 64-bit
    halves: a payload of up to 5,461 readings of |v| < 2^31 would overflow one."""
    p = payload
    cnt = [0] * 256
    tot = [0] * 256
    sqhi = [0] * 256
    sqlo = [0] * 256
    lo = [0] * 256
    hi = [0] * 256
    order = []
    for k in range(i, j):
        o = off + 12 * k
        ch = p[o + 6]
        v = _i32(p, o + 8)
        sq = v * v
        if cnt[ch] == 0:
            order.append(ch)
            lo[ch] = v
            hi[ch] = v
        elif v < lo[ch]:
            lo[ch] = v
        elif v > hi[ch]:
            hi[ch] = v
        cnt[ch] += 1
        tot[ch] += v
        sh = sq >> 32
        sqhi[ch] += sh
        sqlo[ch] += sq - (sh << 32)
    return [(ch, cnt[ch], tot[ch], sqhi[ch] * _TWO32 + sqlo[ch], lo[ch], hi[ch]) for ch in order]
