# The outbox's boot-time code (firmware/outbox.py): the flash scan that rebuilds the segment
# index, and the frame reader it shares with compaction (firmware/obfull.py). Imported on
# demand and unloaded after (RAM: docs/firmware.md).
import struct
import binascii

from firmware.outbox import MAGIC, _PAY, _PAY_SIZE, PRIO, Seg, seg_add, decode_payload

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

# the segment index's fields (firmware/outbox.py: const names are not module attributes)
_BOOT = const(1)
_FIRST = const(2)
_LAST = const(3)
_COUNT = const(4)
_BYTES = const(5)


def encode_frame(boot, seq, t, kind, flags, body_bytes):
    n = _PAY_SIZE + len(body_bytes)
    head = struct.pack(">BH" + _PAY[1:], MAGIC, n, boot, seq, t, kind, flags) + body_bytes
    return head + struct.pack(">I", binascii.crc32(head) & 0xFFFFFFFF)


def read_frame(f):
    """Next (frame bytes, record) from an open segment file; None at the end or at a torn /
    corrupt frame (everything after it in that file is ignored)."""
    h = f.read(3)
    if len(h) < 3 or h[0] != MAGIC:
        return None
    n = (h[1] << 8) | h[2]
    if n < _PAY_SIZE:
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
    hdr = bytearray(7)
    best = 0
    for num in nums[-4:]:  # the newest few (a torn or empty newest file is skipped)
        try:
            f = fs.open("%s/s%08d" % (dir, num), "rb")
        except OSError:
            continue
        try:
            d = f.read(7)
        finally:
            f.close()
        if len(d) == 7 and d[0] == MAGIC:
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
            seg_add(seg, rec[1], PRIO.get(rec[3], 0), len(frame))
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


def frames_of(ob, num):
    """(frame bytes, record) of each intact frame of segment num, in file order; stops at a
    torn or corrupt frame; nothing if the file is missing."""
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
