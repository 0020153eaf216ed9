# The outbox's rarely run code (firmware/outbox.py): set-up, the flash scan that rebuilds the
# segment index at boot (with the frame reader of firmware/obfull.py), the hello's floor and
# backlog count, a failed batch write. Imported on demand and unloaded after (RAM:
# docs/firmware.md).
import struct
import binascii

from firmware.outbox import PRIO, Seg, seg_add

try:
    from micropython import const
except ImportError:  # CPython (no function object on the board: RAM)
    from firmware.cpyticks import const

# the frame and the segment index (firmware/outbox.py: const names are not module attributes)
_MAGIC = const(0xA5)
_PAYSZ = const(18)
_BOOT = const(1)
_FIRST = const(2)
_LAST = const(3)
_COUNT = const(4)
_BYTES = const(5)
_NUM = const(0)
_KGAP = const(6)  # shared.wire.KIND_GAP
_PUSED = const(0)  # firmware.outbox: Outbox._pend
_PFL = const(1)
_PN = const(2)


def init(ob, fs, boot, dir, max_bytes, seg_bytes, batch_records, batch_ms, ack_persist_ms, live_max):
    """Outbox.__init__ (its arguments: firmware/outbox.py)."""
    ob.fs = fs
    ob.boot = boot
    ob.dir = dir
    ob.max_bytes = max_bytes
    ob.seg_bytes = seg_bytes
    ob.batch_records = batch_records
    ob.batch_ms = batch_ms
    ob.ack_persist_ms = ack_persist_ms
    # live batches (flushed while a session is live) wait for take_live up to this many
    # records; more: need_rewind, they are sent as backlog
    ob.live_max = live_max if live_max is not None else 2 * batch_records
    ob.seq = 0  # next seq of this boot
    ob.segs = []  # the segment index, oldest first
    ob.acked = {}  # boot -> highest acked seq
    ob._cur = None  # segment being appended to
    ob._af = None  # its file, kept open: a batch is write + flush (sync), not open/close
    ob._next_num = 0
    # RAM batch (not yet on flash): frames and reading entries (firmware/outbox.py) in
    # _buf[:_pend[0]], _pend[1] bytes once on flash; 14 bytes per reading + 128
    ob._buf = bytearray(batch_records * 14 + 128)
    ob._pend = [0, 0, 0, None]  # used, on flash, records, now_ms of the first (-1: set by the next tick)
    ob._ack_dirty = False
    ob._ack_at = None
    ob.flushes = 0
    from firmware.slots import Slots
    ob._slots = Slots(fs, dir + "/ack")
    ob._lv = None  # while a session is live: (segment, offset, bytes, records) per live batch
    ob.rewind()  # the replay cursor


def highest_boot(fs, dir="ob"):
    """The boot of the newest segment on flash (0 if none): read before the boot counter is
    written, so a new boot number is always above every record still held."""
    try:
        names = fs.listdir(dir)
    except OSError:
        return 0
    nums = []
    for nm in names:
        if len(nm) == 9 and nm[0] == "s" and nm[1:].isdigit():
            nums.append(int(nm[1:]))
    nums.sort()
    best = 0
    for num in nums[-4:]:  # the newest few (a torn or empty newest file is skipped)
        try:
            f = fs.open("%s/%s%08d" % (dir, "s", num), "rb")
        except OSError:
            continue
        try:
            d = f.read(7)
        finally:
            f.close()
        if len(d) == 7 and d[0] == _MAGIC:
            b = (d[3] << 24) | (d[4] << 16) | (d[5] << 8) | d[6]
            if b > best:
                best = b
    return best


def load(ob):
    """Scan flash after a boot: rebuild segment index, acked positions, drop garbage."""
    try:
        ob.fs.mkdir(ob.dir)
    except OSError:
        pass
    raw = ob._slots.load()
    if raw:
        n = raw[0]
        for i in range(n):
            b, s = struct.unpack_from(">II", raw, 1 + 8 * i)
            ob.acked[b] = s
    nums = []
    try:
        names = ob.fs.listdir(ob.dir)
    except OSError:
        names = []
    for nm in names:
        if len(nm) == 9 and nm[0] in "st" and nm[1:].isdigit():
            if nm[0] == "t":
                ob._rm(ob.dir + "/" + nm)  # a compaction interrupted before its rename
            else:
                nums.append(int(nm[1:]))
    nums.sort()
    for num in nums:
        seg = scan(ob, num)
        prev = ob.segs[-1] if ob.segs else None
        if (seg is None or seg[_COUNT] == 0 or ob.acked.get(seg[_BOOT], -1) >= seg[_LAST]
                or (prev is not None and prev[_BOOT] == seg[_BOOT] and seg[_FIRST] <= prev[_LAST])):
            # the last case: left over by a merge cut short after its rename; its records are
            # in the merged segment or covered by gap records (written before the rename)
            ob._rm(ob._name(num))
        else:
            ob.segs.append(seg)
        ob._next_num = num + 1
    # forget acked positions of boots with nothing stored (keep this boot's)
    keep = {}
    for s in ob.segs:
        if s[_BOOT] in ob.acked:
            keep[s[_BOOT]] = ob.acked[s[_BOOT]]
    ob.acked = keep
    return ob


def scan(ob, num):
    from firmware.obfull import frames_of  # the frame reader (unloaded with obload)
    name = ob._name(num)
    seg = None
    good = 0
    g = frames_of(ob, num)
    try:
        for frame, rec in g:
            if seg is None:
                seg = Seg(num, rec[0])
            if rec[0] != seg[_BOOT]:
                break
            seg_add(seg, rec[1], PRIO[rec[3]], len(frame))
            good += len(frame)
    finally:
        g.close()  # MicroPython runs a dropped generator's finally (the file close) only so
    if seg is not None:
        try:
            size = ob.fs.stat_size(name)
        except OSError:
            size = good
        if size != good:
            ob.torn += 1
        seg[_BYTES] = size
    return seg


def oldest(ob):
    """(boot, seq) of the oldest unacked stored record, or (boot, next seq) when empty."""
    for s in ob.segs:
        a = ob.acked.get(s[_BOOT], -1)
        if a < s[_LAST]:
            return s[_BOOT], (s[_FIRST] if s[_FIRST] > a else a + 1)
    return ob.boot, ob.seq


def floor(ob):
    """Outbox.floor: oldest(), or the first record of the RAM batch when that is older."""
    b, s = oldest(ob)
    if ob._pend[_PN] and b == ob.boot:
        buf = ob._buf  # its first record: a frame, or a reading entry (firmware/outbox.py)
        p = struct.unpack_from(">I", buf, 7)[0] if buf[0] == _MAGIC else ob.seq - ob._pend[_PN]
        if p < s:
            s = p
    return b, s


def unacked(ob):
    """Approximate number of stored records not yet acked (exact unless a segment is
    partially acked and has holes from a compaction)."""
    n = ob._pend[_PN]
    for s in ob.segs:
        a = ob.acked.get(s[_BOOT], -1)
        if a >= s[_LAST]:
            continue
        if a < s[_FIRST]:
            n += s[_COUNT]
        else:
            n += s[_COUNT] * (s[_LAST] - a) // (s[_LAST] - s[_FIRST] + 1)
    return n


# ------------------------------------------------------------ flash failing (rare)


def _ranges(seqs):
    """Sorted seqs -> [(first, length)] runs, each length <= 65535."""
    out = []
    for s in seqs:
        if out and out[-1][0] + out[-1][1] == s and out[-1][1] < 0xFFFF:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((s, 1))
    return out


def emit_gaps(ob, gboot, seqs):
    if seqs:
        from firmware.obfull import emit_gap_ranges
        emit_gap_ranges(ob, gboot, _ranges(seqs))


def write_failed(ob, cur):
    """Outbox.flush could not write the batch to segment cur: never append to that file
    again (it may hold a torn tail); the batch stays in RAM and is retried, unless flash
    keeps failing (then it is dropped, except gap records, and accounted for). Returns -1."""
    ob.write_errors += 1
    ob._end_cur()
    if cur[_COUNT] == 0:
        ob.segs.remove(cur)
        ob._rm(ob._name(cur[_NUM]))
    else:
        try:
            cur[_BYTES] = ob.fs.stat_size(ob._name(cur[_NUM]))
        except OSError:
            pass
    if ob._pend[_PN] > 4 * ob.batch_records:
        drop_pending(ob)
        from firmware.hal import unload
        unload("firmware.obfull")  # its gap records (emit_gaps)
    return -1


def drop_pending(ob):
    """Flash keeps failing: drop the RAM batch (except gap records) and account for it."""
    buf = ob._buf
    size = ob._pend[_PUSED]
    seqs = []
    out = 0
    kept = 0
    off = 0
    q = ob.seq - ob._pend[_PN]  # the first record's seq, if it is a reading entry
    while off < size:
        if buf[off] != _MAGIC:  # a reading entry (firmware/outbox.py): its seq follows
            seqs.append(q)
            off += 14
            q += 1
            continue
        fl = 7 + ((buf[off + 1] << 8) | buf[off + 2])
        q = struct.unpack_from(">I", buf, off + 7)[0]
        if buf[off + 19] == _KGAP:
            if out != off:
                buf[out:out + fl] = buf[off:off + fl]
            out += fl
            kept += 1
        else:
            seqs.append(q)
        off += fl
        q += 1
    ob._pend[_PUSED] = ob._pend[_PFL] = out
    ob._pend[_PN] = kept
    ob.dropped += len(seqs)
    emit_gaps(ob, ob.boot, seqs)
