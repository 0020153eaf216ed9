# The outbox's full policy (firmware/outbox.py): compaction, gap records, dropping the RAM
# batch when flash keeps failing; and the frame reader (also the boot scan's, obload.py).
# Imported when the outbox is full and unloaded after (RAM: its bytecode counts only at that
# peak, docs/firmware.md).
import struct
import binascii

from shared import wire_dev as wire
from firmware.outbox import PRIO, Seg, seg_add

try:
    from micropython import const
except ImportError:  # CPython (no function object on the board: RAM)
    from firmware.cpyticks import const

# the segment index's fields (firmware/outbox.py: const names are not module attributes)
_NUM = const(0)
_BOOT = const(1)
_FIRST = const(2)
_COUNT = const(4)
_BYTES = const(5)
_PC = const(6)
_PB = const(10)
_MAGIC = const(0xA5)
_PAYSZ = const(18)
_PN = const(2)  # firmware.outbox: Outbox._pend[_PN], records in the RAM batch


def _add_range(drops, boot, first, n):
    """Add seqs [first, first + n) of boot to drops {boot: [[first, end), ...]} (extends the
    last range when contiguous: seqs mostly come in order)."""
    rs = drops.get(boot)
    if rs is None:
        rs = drops[boot] = []
    if rs and rs[-1][1] == first:
        rs[-1][1] = first + n
    else:
        rs.append([first, first + n])


def _coalesce(rs):
    """[[first, end), ...] -> sorted, merged [(first, length)], each length <= 65535."""
    rs.sort()
    out = []
    cf = ce = None
    for f, e in rs:
        if cf is not None and f <= ce:
            if e > ce:
                ce = e
            continue
        if cf is not None:
            _split(out, cf, ce)
        cf, ce = f, e
    if cf is not None:
        _split(out, cf, ce)
    return out


def _split(out, f, e):
    while e - f > 0xFFFF:
        out.append((f, 0xFFFF))
        f += 0xFFFF
    out.append((f, e - f))


def lowest(ob):
    """Lowest class stored outside the segment being appended to (compacting that one
    again and again would leave a trail of tiny files: its records are the newest anyway)."""
    q = None
    for s in ob.segs:
        if s is ob._cur:
            continue
        for p in range(3):
            if s[_PC + p]:
                if q is None or p < q:
                    q = p
                break
    return q


def make_room(ob, size, prio):
    if ob.total_bytes() + size <= ob.max_bytes:
        return True
    # hysteresis: once full, free down to the low-water mark, so a compaction merges several
    # segments at once instead of one per batch (flash wear: docs/firmware.md)
    low = ob.max_bytes - max(ob.seg_bytes, ob.max_bytes >> 3)
    guard = 0
    while ob.total_bytes() + size > low and guard < 64:
        guard += 1
        q = lowest(ob)
        if q is None or q > prio:
            break
        seg = None
        for s in ob.segs:
            if s[_PC + q] and s is not ob._cur:
                seg = s
                break
        try:
            ok = compact(ob, seg, q, ob.total_bytes() + size - low)
        except OSError:  # flash full or failing: keep what is stored, refuse the new record
            ob.write_errors += 1
            ob._rm(ob._name(seg[_NUM], "t"))
            ok = False
        if not ok:
            break
    return ob.total_bytes() + size <= ob.max_bytes


def compact(ob, seg, q, need=0):
    """Merge seg and the following segments of its boot into one file without their records
    of priority <= q (and without acked ones), as long as the survivors fit in one segment:
    the number of files stays bounded. Gap records in the group are re-expressed: their ranges,
    their own seqs and the newly dropped seqs go into fresh, coalesced gap records, so gap
    records merge instead of piling up. Crash-safe order: survivors to a temp file, gap
    records durable, rename over the first segment, then the others removed (load() drops a
    leftover that overlaps the merged segment)."""
    segs = ob.segs
    i = segs.index(seg)
    group = [seg]
    freed = drop_bytes(ob, seg, q)
    est = seg[_BYTES] - freed
    # earlier segments of the boot (survivors of earlier merges) join while they fit, so
    # merged files fill up instead of staying half empty
    while i > 0 and len(group) < 16:
        s = segs[i - 1]
        e = s[_BYTES] - drop_bytes(ob, s, q)
        if s[_BOOT] != seg[_BOOT] or s is ob._cur or est + e > ob.seg_bytes:
            break
        group.insert(0, s)
        est += e
        i -= 1
    seg = group[0]
    j = segs.index(group[-1]) + 1
    while j < len(segs) and len(group) < 16 and freed < need:  # no more than needed goes
        s = segs[j]
        if s[_BOOT] != seg[_BOOT] or s is ob._cur:
            break
        d = drop_bytes(ob, s, q)
        if est + s[_BYTES] - d > ob.seg_bytes:
            break
        group.append(s)
        est += s[_BYTES] - d
        freed += d
        j += 1
    if ob._cur in group:
        ob._end_cur()
    # gap records are re-expressed (coalesced) when windows or more go, or when nothing but
    # gap records survives (then all ranges merge); dropping raw readings between kept
    # windows makes no ranges merge (each old gap record's own seq became one more range),
    # and rewriting every gap record on every compaction cost most of a full outbox's wear
    keep = 0
    for s in group:
        keep += s[_PC + 1] + s[_PC + 2]
    regap = q > 0 or not keep
    a = ob.acked.get(seg[_BOOT], -1)
    drops = {}  # boot -> [[first, end), ...]
    ndrop = 0
    ns = Seg(seg[_NUM], seg[_BOOT])
    tmp = ob._name(seg[_NUM], "t")
    out = ob.fs.open(tmp, "wb")
    try:
        for s in group:
            g = frames_of(ob, s[_NUM])
            for frame, rec in g:
                if rec[1] <= a:
                    continue
                k = rec[3]
                p = PRIO[k]
                if k == wire.KIND_GAP and regap:
                    _add_range(drops, rec[0], rec[1], 1)
                    ob.gaps_merged += 1
                    gb, rs = rec[5]
                    for first, n in rs:
                        _add_range(drops, gb, first, n)
                elif p <= q and k != wire.KIND_GAP:
                    _add_range(drops, rec[0], rec[1], 1)
                    ndrop += 1
                else:
                    try:
                        out.write(frame)
                    except OSError:
                        g.close()
                        raise
                    seg_add(ns, rec[1], p, len(frame))
    finally:
        out.close()
    # 1. the gap records are durable before anything is deleted
    ob.dropped += ndrop
    for gb in sorted(drops):
        emit_gap_ranges(ob, gb, _coalesce(drops[gb]))
    ob.flush()
    if ob._pend[_PN]:
        ob._rm(tmp)
        return False  # flash refuses writes: keep everything, refuse the new record
    # 2. the survivors replace the group
    nums = []
    if ns[_COUNT]:
        ob.fs.rename(tmp, ob._name(seg[_NUM]))
        for k in range(_FIRST, _PB + 4):  # (no list slice assignment: a port option)
            seg[k] = ns[k]
        rest = group[1:]
    else:
        ob._rm(tmp)
        rest = group
    for s in rest:
        nums.append(s[_NUM])
        ob._rm(ob._name(s[_NUM]))
        segs.remove(s)
    if ob._lv:  # live batches may have moved: they go as backlog
        del ob._lv[:]
        ob.need_rewind = True
    rc = ob._rc  # the replay cursor (firmware/obread.py)
    if rc[0] == seg[_NUM] or rc[0] in nums:
        rc[0] = seg[_NUM] if ns[_COUNT] else -1  # replay re-reads from there; sent ones are skipped
        rc[1] = 0
    return True


def drop_bytes(ob, s, q):
    n = s[_PB + 3] if q else 0  # an estimate: gap records may be rewritten at q = 0 too
    for p in range(q + 1):
        n += s[_PB + p]
    return n


def emit_gap_ranges(ob, gboot, rs):
    """Gap records for ranges rs, appended to the RAM batch; the caller flushes (a sync
    per gap record made a compaction cost ~200 erases: docs/firmware.md)."""
    i = 0
    ob._hold = True
    try:
        while i < len(rs):
            t, fl = ob.stamp() if ob.stamp is not None else (0, wire.FLAG_UNSYNCED)
            ob.append(wire.KIND_GAP, t, fl, (gboot, rs[i:i + wire.MAX_GAP_RANGES]))
            i += wire.MAX_GAP_RANGES
    finally:
        ob._hold = False


def decode_payload(data, off, n):
    """(boot, seq, t, kind, flags, body) from a verified frame payload at data[off:off+n].
    Reading and gap bodies are decoded; the others (window, CEP, anomaly, status) are body None:
    the device's compaction and boot scan need none of them, so they load no decoder (RAM;
    tests and tools decode them with firmware/obframe.py)."""
    boot, seq, t, kind, flags = struct.unpack_from(">IIqBB", data, off)
    bo = off + _PAYSZ
    end = off + n
    if kind == wire.KIND_READING:
        body = struct.unpack_from(">Bi", data, bo)
        bo += 5
    elif kind == wire.KIND_GAP:
        gb, k = struct.unpack_from(">IB", data, bo)
        bo += 5
        if k < 1 or k > wire.MAX_GAP_RANGES or bo + 6 * k > end:
            raise wire.WireError("bad_gap", str(k))
        body = (gb, tuple([struct.unpack_from(">IH", data, bo + 6 * i) for i in range(k)]))
        bo += 6 * k
    else:
        if kind > wire.KIND_GAP or not kind:
            raise wire.WireError("unknown_kind", str(kind))
        return (boot, seq, t, kind, flags, None)
    if bo != end:
        raise wire.WireError("bad_length", "outbox body")
    return (boot, seq, t, kind, flags, body)


def read_frame(f):
    """Next (frame bytes, record) from an open segment file; None at the end or at a torn /
    corrupt frame (everything after it in that file is ignored). Record: decode_payload."""
    h = f.read(3)
    if len(h) < 3 or h[0] != _MAGIC:
        return None
    n = (h[1] << 8) | h[2]
    if n < _PAYSZ:
        return None
    rest = f.read(n + 4)
    if len(rest) != n + 4:
        return None
    crc = binascii.crc32(h)
    crc = binascii.crc32(memoryview(rest)[:n], crc) & 0xFFFFFFFF
    if crc != struct.unpack_from(">I", rest, n)[0]:
        return None
    try:
        rec = decode_payload(rest, 0, n)
    except (ValueError, KeyError):
        return None
    return h + rest, rec


def frames_of(ob, num):
    """(frame bytes, record) of each intact frame of segment num, in file order; stops at a
    torn or corrupt frame; nothing if the file is missing. Bodies: readings and gaps only."""
    try:
        f = ob.fs.open(ob._name(num), "rb")
    except OSError:
        return
    try:
        while True:
            r = read_frame(f)
            if r is None:
                return
            yield r
    finally:
        f.close()
