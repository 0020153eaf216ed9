# Store-and-forward outbox on flash: every record is written here before it is sent, and
# deleted only when the gateway acknowledges it.
#
# Flash layout (under `dir`, default "ob"; docs/firmware.md has the full picture):
#   s00000042        segment files, append-only, at most seg_bytes each (one boot per segment)
#   t00000042        temporary file of a compaction (renamed over its segment)
#   ack.0 / ack.1    acked (boot, seq) per boot, two CRC slots (firmware.identity.Slots)
# Frame: 0xA5 | len u16 | payload | crc32 u32 (over magic, len and payload)
# Payload: boot u32 | seq u32 | t i64 | kind u8 | flags u8 | body
#   reading body: channel u8 | value i32; other kinds: the wire body (shared.wire.encode_body)
#
# Records are batched in RAM and appended to the open segment file with write + flush per batch
# (every batch_records records or batch_ms ms, at once for CEP/anomaly/gap records). The RAM
# batch is a preallocated bytearray of complete frames; their CRCs are filled in at flush, so
# reading_at() (the per-sample path) allocates nothing on MicroPython. On LittleFS a flush is a
# sync (about one block erase each: the batch size sets the flash life), so a power cut loses
# at most the unflushed RAM batch. A torn frame (power cut mid-write on a filesystem
# that shows partial appends) fails its CRC: the scan stops there, the records before it are
# kept, and that segment is never appended to again (a new boot starts a new segment).
#
# Full (total bytes > max_bytes): the oldest segment holding the least important records is
# rewritten without them (raw readings and status first, then windows, then CEP/anomaly; gap
# records are never dropped), with the segments after it, down to a low-water mark. The dropped seq ranges go out as KIND_GAP records (written before
# the rewrite) and are counted in `dropped`. A new record less important than everything stored
# is refused instead (it gets no seq, so it leaves no gap; it is still counted in `dropped`).
import struct
import binascii

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

from shared import wire_dev as wire  # the device side of the contract (shared/wire.py: all of it)

MAGIC = 0xA5
_PAY = ">IIqBB"  # boot, seq, t, kind, flags
_PAY_SIZE = 18
_RBODY = ">Bi"
_KR = wire.KIND_READING
_RLEN = _PAY_SIZE + 5  # payload length of a reading
_RFRAME = 3 + _RLEN + 4  # 30 bytes per reading on flash
# a whole reading frame but its crc, t as four big-endian u16 limbs (small ints only)
_FAST = ">BHIIHHHHBBBi"

# Drop order when full: lowest first. Gap records (3) are never dropped.
PRIO = {wire.KIND_READING: 0, wire.KIND_STATUS: 0, wire.KIND_WINDOW: 1,
        wire.KIND_ANOMALY: 2, wire.KIND_CEP: 2, wire.KIND_GAP: 3}
_URGENT = 2  # records of this priority or more are flushed at once
_LIVE_CHUNK = 32  # live records decoded per take_live()


# The segment index: one plain list per segment file (a list of 14 small ints takes ~88 bytes
# of heap under MicroPython, an object with the same fields ~141): [num, boot, first seq,
# last seq, records, bytes, records per priority 0..3, bytes per priority 0..3].
_NUM = const(0)
_BOOT = const(1)
_FIRST = const(2)
_LAST = const(3)
_COUNT = const(4)
_BYTES = const(5)
_PC = const(6)
_PB = const(10)


def Seg(num, boot):
    return [num, boot, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]


def seg_add(s, seq, prio, nbytes):
    if s[_COUNT] == 0:
        s[_FIRST] = seq
    s[_LAST] = seq
    s[_COUNT] += 1
    s[_PC + prio] += 1
    s[_PB + prio] += nbytes
    s[_BYTES] += nbytes


def encode_frame(boot, seq, t, kind, flags, body_bytes):
    n = _PAY_SIZE + len(body_bytes)
    head = struct.pack(">BH" + _PAY[1:], MAGIC, n, boot, seq, t, kind, flags) + body_bytes
    return head + struct.pack(">I", binascii.crc32(head) & 0xFFFFFFFF)


def decode_payload(data, off, n):
    """(boot, seq, t, kind, flags, body) from a verified frame payload at data[off:off+n]."""
    boot, seq, t, kind, flags = struct.unpack_from(_PAY, data, off)
    bo = off + _PAY_SIZE
    if kind == wire.KIND_READING:
        body = struct.unpack_from(_RBODY, data, bo)
    else:
        body, end = wire._decode_body(kind, data, bo)
        if end != off + n:
            raise wire.WireError("bad_length", "outbox body")
    return (boot, seq, t, kind, flags, body)


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


class _Frames:
    """The frames of one segment file, read through one reusable buffer (readinto): per frame
    only the CRC check allocates (a memoryview slice and the crc int) until the caller decodes
    it. Same verdicts as read_frame."""

    def __init__(self, size=1024):
        self.buf = bytearray(size)
        self.mv = memoryview(self.buf)  # kept: a memoryview per frame was garbage on every read
        self.crc = bytearray(4)
        self.f = None
        self.s = 0  # next frame at buf[s:], valid data up to e
        self.e = 0
        self.p = 0  # payload offset of the frame next() returned

    def start(self, f):
        self.f = f
        self.s = self.e = 0

    def _need(self, k):
        """buf[s:s + k] holds the next k bytes of the file; False at its end."""
        if self.e - self.s >= k:
            return True
        buf = self.buf
        n = self.e - self.s
        if k > len(buf):
            nb = bytearray(k + 256)
            nb[0:n] = buf[self.s:self.e]
            self.buf = buf = nb
            self.mv = memoryview(nb)
        elif self.s:
            buf[0:n] = buf[self.s:self.e]
        self.s = 0
        self.e = n
        f = self.f
        while n < k:
            if hasattr(f, "readinto"):
                got = f.readinto(self.mv[n:])
            else:
                d = f.read(len(buf) - n)
                got = len(d)
                buf[n:n + got] = d
            if not got:
                return False
            n += got
            self.e = n
        return True

    def next(self):
        """Payload length of the next intact frame (its payload at buf[p:]), -1 at the end or
        at a torn / corrupt frame."""
        if not self._need(3):
            return -1
        buf = self.buf
        s = self.s
        if buf[s] != MAGIC:
            return -1
        n = (buf[s + 1] << 8) | buf[s + 2]
        if n < _PAY_SIZE or not self._need(n + 7):
            return -1
        buf = self.buf
        s = self.s
        e = s + 3 + n
        c = self.crc
        struct.pack_into(">I", c, 0, binascii.crc32(self.mv[s:e]) & 0xFFFFFFFF)
        if c[0] != buf[e] or c[1] != buf[e + 1] or c[2] != buf[e + 2] or c[3] != buf[e + 3]:
            return -1
        self.p = s + 3
        self.s = e + 4
        return n


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


def _ranges(seqs):
    """Sorted seqs -> [(first, length)] runs, each length <= 65535."""
    out = []
    for s in seqs:
        if out and out[-1][0] + out[-1][1] == s and out[-1][1] < 0xFFFF:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((s, 1))
    return out


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


class Outbox:
    def __init__(self, fs, boot, dir="ob", max_bytes=262144, seg_bytes=8192, batch_records=64,
                 batch_ms=20000, ack_persist_ms=10000, live_max=None):
        self.fs = fs
        self.boot = boot
        self.dir = dir
        self.max_bytes = max_bytes
        self.seg_bytes = seg_bytes
        self.batch_records = batch_records
        self.batch_ms = batch_ms
        self.ack_persist_ms = ack_persist_ms
        # live records waiting for take_live (flushed while a session is live); more: rewind
        self.live_max = live_max if live_max is not None else 2 * batch_records
        self.seq = 0  # next seq of this boot
        self.segs = []  # Seg, oldest first
        self.acked = {}  # boot -> highest acked seq
        self._cur = None  # Seg being appended to
        self._af = None  # its file, kept open: a batch is write + flush (sync), not open/close
        self._next_num = 0
        # RAM batch (not yet on flash): complete frames in _buf[:_pend_bytes], CRCs filled at flush
        self._cap0 = batch_records * _RFRAME + 256
        self._buf = bytearray(self._cap0)
        self._pend_bytes = 0
        self._pend_n = 0
        self._pend_since = None  # now_ms of the batch's first record; -1: set by the next tick
        self._ack_dirty = False
        self._ack_at = None
        self._hold = False  # set while a compaction appends its gap records (no flush per record)
        from firmware.identity import Slots
        self._slots = Slots(fs, dir + "/ack")
        # session state (see begin_session)
        self.live = False
        self._live_reset()
        self._L = (boot, 0)
        self._rseg = -1
        self._roff = 0
        self._rlb = -1  # (boot, seq) of the last record replayed, -1: none
        self._rls = -1
        self._rd = None  # _Frames of read_backlog, made on first use
        self._rdone = False
        # counters
        self.dropped = 0  # records dropped by policy (with a seq: also in a gap record)
        self.refused = 0  # records refused at the door when full (no seq given)
        self.rejected = 0  # records the wire encoder refused (bad body)
        self.write_errors = 0
        self.gaps_merged = 0  # gap records re-expressed in merged ones (their seqs are in a gap range)
        self.flushes = 0
        self.flushed_records = 0
        self.torn = 0  # torn/corrupt tails found at load
        self.need_rewind = False
        self.stamp = None  # optional () -> (t, flags) for records the outbox makes itself (gaps)

    # ------------------------------------------------------------ load / recovery

    def _name(self, num, pre="s"):
        return "%s/%s%08d" % (self.dir, pre, num)

    def load(self):
        """Scan flash after a boot: rebuild segment index, acked positions, drop garbage."""
        try:
            self.fs.mkdir(self.dir)
        except OSError:
            pass
        raw = self._slots.load()
        if raw:
            n = raw[0]
            for i in range(n):
                b, s = struct.unpack_from(">II", raw, 1 + 8 * i)
                self.acked[b] = s
        nums = []
        try:
            names = self.fs.listdir(self.dir)
        except OSError:
            names = []
        for nm in names:
            if len(nm) == 9 and nm[0] in "st" and nm[1:].isdigit():
                if nm[0] == "t":
                    self._rm(self.dir + "/" + nm)  # a compaction interrupted before its rename
                else:
                    nums.append(int(nm[1:]))
        nums.sort()
        for num in nums:
            seg = self._scan(num)
            prev = self.segs[-1] if self.segs else None
            if (seg is None or seg[_COUNT] == 0 or self.acked.get(seg[_BOOT], -1) >= seg[_LAST]
                    or (prev is not None and prev[_BOOT] == seg[_BOOT] and seg[_FIRST] <= prev[_LAST])):
                # the last case: left over by a merge cut short after its rename; its records are
                # in the merged segment or covered by gap records (written before the rename)
                self._rm(self._name(num))
            else:
                self.segs.append(seg)
            self._next_num = num + 1
        # forget acked positions of boots with nothing stored (keep this boot's)
        keep = {}
        for s in self.segs:
            if s[_BOOT] in self.acked:
                keep[s[_BOOT]] = self.acked[s[_BOOT]]
        self.acked = keep
        return self

    def _scan(self, num):
        name = self._name(num)
        seg = None
        good = 0
        g = self._frames_of(num)
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
                size = self.fs.stat_size(name)
            except OSError:
                size = good
            if size != good:
                self.torn += 1
            seg[_BYTES] = size
        return seg

    def _frames_of(self, num):
        """(frame bytes, record) of each intact frame of segment num, in file order; stops at a
        torn or corrupt frame; nothing if the file is missing."""
        try:
            f = self.fs.open(self._name(num), "rb")
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

    def _rm(self, path):
        try:
            self.fs.remove(path)
        except OSError:
            pass

    # ------------------------------------------------------------ append / flush

    def total_bytes(self):
        n = self._pend_bytes
        for s in self.segs:
            n += s[_BYTES]
        return n

    def pending(self):
        """Records in the RAM batch (not yet on flash)."""
        return self._pend_n

    def stored_records(self):
        n = self._pend_n
        for s in self.segs:
            n += s[_COUNT]
        return n

    def boots(self):
        """The boot of each segment on flash, oldest first."""
        return [s[_BOOT] for s in self.segs]

    def class_records(self, prio):
        """Records of priority prio on flash (3: gap records, 2: CEP/anomaly)."""
        n = 0
        for s in self.segs:
            n += s[_PC + prio]
        return n

    def append(self, kind, t, flags, body, now_ms=None):
        """Store a record of this boot; returns its seq, or None when refused."""
        if kind == wire.KIND_READING:
            bb = struct.pack(_RBODY, body[0], body[1])
        else:
            try:
                bb = wire.encode_body(kind, body)
            except (ValueError, TypeError, KeyError):
                self.rejected += 1
                return None
        prio = PRIO.get(kind, 0)
        size = 3 + _PAY_SIZE + len(bb) + 4
        if prio < 3 and not self._make_room(size, prio):
            self.refused += 1
            return None
        seq = self.seq
        off = self._reserve(size)
        buf = self._buf
        struct.pack_into(">BH" + _PAY[1:], buf, off, MAGIC, size - 7, self.boot, seq, t, kind, flags)
        buf[off + 3 + _PAY_SIZE:off + size - 4] = bb
        self.seq = seq + 1
        self._pend_bytes = off + size
        self._pend_n += 1
        if self._pend_since is None:
            self._pend_since = now_ms
        if self._hold:  # gap records of a compaction: one synced append per full buffer
            if self._pend_bytes >= self._cap0 - 256:
                self.flush()
        elif prio >= _URGENT or self._pend_n >= self.batch_records:
            self.flush()
        return seq

    def reading(self, ch, t, flags, value, now_ms=None):
        return self.append(wire.KIND_READING, t, flags, (ch, value), now_ms)

    def reading_at(self, ch, value, tb, flags, lo):
        """The per-sample path: store a raw reading of this boot at t = tb + lo, where tb is
        an i64 as four big-endian u16 limbs and 0 <= lo < 2**28 (firmware.clock: tb, tfl,
        ms_lo). Returns its seq, or None when refused. Allocates nothing on MicroPython
        unless the batch is flushed (batch full) or the outbox is full."""
        if not self._make_room(_RFRAME, 0):
            self.refused += 1
            return None
        off = self._pend_bytes
        if off + _RFRAME > len(self._buf):
            off = self._reserve(_RFRAME)
        x = tb[3] + (lo & 0xFFFF)
        l3 = x & 0xFFFF
        x = tb[2] + (lo >> 16) + (x >> 16)
        l2 = x & 0xFFFF
        x = tb[1] + (x >> 16)
        l1 = x & 0xFFFF
        l0 = (tb[0] + (x >> 16)) & 0xFFFF
        seq = self.seq
        struct.pack_into(_FAST, self._buf, off, MAGIC, _RLEN, self.boot, seq, l0, l1, l2, l3, _KR, flags, ch, value)
        self.seq = seq + 1
        self._pend_bytes = off + _RFRAME
        self._pend_n += 1
        if self._pend_since is None:
            self._pend_since = -1  # the batch's age counts from the next tick()
        if self._pend_n >= self.batch_records:
            self.flush()
        return seq

    def _reserve(self, nbytes):
        """Offset for nbytes more in the RAM batch, growing the buffer when needed (rare:
        flash write errors, big records)."""
        off = self._pend_bytes
        if off + nbytes > len(self._buf):
            nb = bytearray(max(2 * len(self._buf), off + nbytes))
            nb[0:off] = self._buf[0:off]
            self._buf = nb
        return off

    def tick(self, now_ms):
        """Call periodically: flushes an old batch, persists ack positions."""
        if self._pend_n:
            s = self._pend_since
            if s == -1:
                s = self._pend_since = now_ms
            if s is None or now_ms - s >= self.batch_ms:
                self.flush()
        if self._ack_dirty and (self._ack_at is None or now_ms - self._ack_at >= self.ack_persist_ms):
            self.persist_acks()
            self._ack_at = now_ms

    def flush(self):
        """Append the RAM batch to the current segment (one open/write/close). Returns the number
        of records written, -1 on a write error (the batch stays in RAM and is retried)."""
        n = self._pend_n
        if not n:
            return 0
        size = self._pend_bytes
        buf = self._buf
        mv = memoryview(buf)
        off = 0
        while off < size:  # seal: the CRC of every frame (idempotent, so a retry redoes it)
            e = off + 3 + ((buf[off + 1] << 8) | buf[off + 2])
            struct.pack_into(">I", buf, e, binascii.crc32(mv[off:e]) & 0xFFFFFFFF)
            off = e + 4
        data = mv[0:size]  # written from the batch buffer itself: no copy
        cur = self._cur
        if cur is None or cur[_BYTES] + size > self.seg_bytes:
            self._end_cur()
            if cur is not None and cur[_COUNT] and self.acked.get(cur[_BOOT], -1) >= cur[_LAST]:
                self.segs.remove(cur)  # kept while current (on_ack): one create + delete per segment
                self._rm(self._name(cur[_NUM]))
            cur = Seg(self._next_num, self.boot)
            self._next_num += 1
            self.segs.append(cur)
            self._cur = cur
        try:
            f = self._af
            if f is None:
                f = self._af = self.fs.open(self._name(cur[_NUM]), "ab")
            f.write(data)
            f.flush()  # LittleFS: lfs_file_sync, the batch is durable; the data block is not
            # copied again per batch as a close + reopen would (flash wear: docs/firmware.md)
        except OSError:
            self.write_errors += 1
            self._end_cur()  # the file may hold a torn tail: never append to it again
            if cur[_COUNT] == 0:
                self.segs.remove(cur)
                self._rm(self._name(cur[_NUM]))
            else:
                try:
                    cur[_BYTES] = self.fs.stat_size(self._name(cur[_NUM]))
                except OSError:
                    pass
            if self._pend_n > 4 * self.batch_records:
                self._drop_pending()
            return -1
        live = self.live
        if live:
            if self._lv_n + n > self.live_max:
                self._live_reset()
                self.need_rewind = True
            else:  # the frames as written, decoded by take_live a chunk at a time (RAM)
                self._flushed.append(bytes(mv[0:size]))
                self._lv_n += n
        data = mv = None
        off = 0
        while off < size:
            ln = (buf[off + 1] << 8) | buf[off + 2]
            seq = (buf[off + 7] << 24) | (buf[off + 8] << 16) | (buf[off + 9] << 8) | buf[off + 10]
            seg_add(cur, seq, PRIO.get(buf[off + 19], 0), ln + 7)
            off += ln + 7
        self._pend_bytes = 0
        self._pend_n = 0
        self._pend_since = None
        if len(buf) > self._cap0:
            self._buf = bytearray(self._cap0)
        self.flushes += 1
        self.flushed_records += n
        return n

    def _end_cur(self):
        """Stop appending to the current segment (close its file)."""
        self._cur = None
        f = self._af
        self._af = None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def close(self):
        """Flush and close the open segment file (graceful stop)."""
        self.flush()
        self._end_cur()

    def _drop_pending(self):
        """Flash keeps failing: drop the RAM batch (except gap records) and account for it."""
        buf = self._buf
        size = self._pend_bytes
        seqs = []
        out = 0
        kept = 0
        off = 0
        while off < size:
            fl = 7 + ((buf[off + 1] << 8) | buf[off + 2])
            if buf[off + 19] == wire.KIND_GAP:
                if out != off:
                    buf[out:out + fl] = buf[off:off + fl]
                out += fl
                kept += 1
            else:
                seqs.append(struct.unpack_from(">I", buf, off + 7)[0])
            off += fl
        self._pend_bytes = out
        self._pend_n = kept
        self.dropped += len(seqs)
        self._emit_gaps(self.boot, seqs)

    def take_live(self):
        """Records flushed while a session is live and not taken yet (to send now), oldest
        first, at most _LIVE_CHUNK per call: decoded records cost ~150 B each, the frames ~30."""
        out = []
        fl = self._flushed
        off = self._lv_off
        while fl and len(out) < _LIVE_CHUNK:
            b = fl[0]
            ln = (b[off + 1] << 8) | b[off + 2]
            out.append(decode_payload(b, off + 3, ln))
            off += ln + 7
            if off >= len(b):
                fl.pop(0)
                off = 0
        self._lv_off = off
        self._lv_n -= len(out)
        return out

    def _live_reset(self):
        self._flushed = []  # frames of flushed batches (bytes) not yet taken by take_live
        self._lv_n = 0
        self._lv_off = 0

    # ------------------------------------------------------------ full policy

    def _lowest(self):
        """Lowest class stored outside the segment being appended to (compacting that one
        again and again would leave a trail of tiny files: its records are the newest anyway)."""
        q = None
        for s in self.segs:
            if s is self._cur:
                continue
            for p in range(3):
                if s[_PC + p]:
                    if q is None or p < q:
                        q = p
                    break
        return q

    def _make_room(self, size, prio):
        if self.total_bytes() + size <= self.max_bytes:
            return True
        # hysteresis: once full, free down to the low-water mark, so a compaction merges several
        # segments at once instead of one per batch (flash wear: docs/firmware.md)
        low = self.max_bytes - max(self.seg_bytes, self.max_bytes >> 3)
        guard = 0
        while self.total_bytes() + size > low and guard < 64:
            guard += 1
            q = self._lowest()
            if q is None or q > prio:
                break
            seg = None
            for s in self.segs:
                if s[_PC + q] and s is not self._cur:
                    seg = s
                    break
            try:
                ok = self._compact(seg, q, self.total_bytes() + size - low)
            except OSError:  # flash full or failing: keep what is stored, refuse the new record
                self.write_errors += 1
                self._rm(self._name(seg[_NUM], "t"))
                ok = False
            if not ok:
                break
        return self.total_bytes() + size <= self.max_bytes

    def _compact(self, seg, q, need=0):
        """Merge seg and the following segments of its boot into one file without their records
        of priority <= q (and without acked ones), as long as the survivors fit in one segment:
        the number of files stays bounded. Gap records in the group are re-expressed: their ranges,
        their own seqs and the newly dropped seqs go into fresh, coalesced gap records, so gap
        records merge instead of piling up. Crash-safe order: survivors to a temp file, gap
        records durable, rename over the first segment, then the others removed (load() drops a
        leftover that overlaps the merged segment)."""
        segs = self.segs
        i = segs.index(seg)
        group = [seg]
        freed = self._drop_bytes(seg, q)
        est = seg[_BYTES] - freed
        # earlier segments of the boot (survivors of earlier merges) join while they fit, so
        # merged files fill up instead of staying half empty
        while i > 0 and len(group) < 16:
            s = segs[i - 1]
            e = s[_BYTES] - self._drop_bytes(s, q)
            if s[_BOOT] != seg[_BOOT] or s is self._cur or est + e > self.seg_bytes:
                break
            group.insert(0, s)
            est += e
            i -= 1
        seg = group[0]
        j = segs.index(group[-1]) + 1
        while j < len(segs) and len(group) < 16 and freed < need:  # no more than needed goes
            s = segs[j]
            if s[_BOOT] != seg[_BOOT] or s is self._cur:
                break
            d = self._drop_bytes(s, q)
            if est + s[_BYTES] - d > self.seg_bytes:
                break
            group.append(s)
            est += s[_BYTES] - d
            freed += d
            j += 1
        if self._cur in group:
            self._end_cur()
        # gap records are re-expressed (coalesced) when windows or more go, or when nothing but
        # gap records survives (then all ranges merge); dropping raw readings between kept
        # windows makes no ranges merge (each old gap record's own seq became one more range),
        # and rewriting every gap record on every compaction cost most of a full outbox's wear
        keep = 0
        for s in group:
            keep += s[_PC + 1] + s[_PC + 2]
        regap = q > 0 or not keep
        a = self.acked.get(seg[_BOOT], -1)
        drops = {}  # boot -> [[first, end), ...]
        ndrop = 0
        ns = Seg(seg[_NUM], seg[_BOOT])
        tmp = self._name(seg[_NUM], "t")
        out = self.fs.open(tmp, "wb")
        try:
            for s in group:
                g = self._frames_of(s[_NUM])
                for frame, rec in g:
                    if rec[1] <= a:
                        continue
                    k = rec[3]
                    p = PRIO.get(k, 0)
                    if k == wire.KIND_GAP and regap:
                        _add_range(drops, rec[0], rec[1], 1)
                        self.gaps_merged += 1
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
        self.dropped += ndrop
        for gb in sorted(drops):
            self._emit_gap_ranges(gb, _coalesce(drops[gb]))
        self.flush()
        if self._pend_n:
            self._rm(tmp)
            return False  # flash refuses writes: keep everything, refuse the new record
        # 2. the survivors replace the group
        nums = []
        if ns[_COUNT]:
            self.fs.rename(tmp, self._name(seg[_NUM]))
            for k in range(_FIRST, _PB + 4):  # (no list slice assignment: a port option)
                seg[k] = ns[k]
            rest = group[1:]
        else:
            self._rm(tmp)
            rest = group
        for s in rest:
            nums.append(s[_NUM])
            self._rm(self._name(s[_NUM]))
            segs.remove(s)
        if self._rseg == seg[_NUM] or self._rseg in nums:
            self._rseg = seg[_NUM] if ns[_COUNT] else -1  # replay re-reads from there; sent ones are skipped
            self._roff = 0
        return True

    def _drop_bytes(self, s, q):
        n = s[_PB + 3] if q else 0  # an estimate: gap records may be rewritten at q = 0 too
        for p in range(q + 1):
            n += s[_PB + p]
        return n

    def _emit_gap_ranges(self, gboot, rs):
        """Gap records for ranges rs, appended to the RAM batch; the caller flushes (a sync
        per gap record made a compaction cost ~200 erases: docs/firmware.md)."""
        i = 0
        self._hold = True
        try:
            while i < len(rs):
                t, fl = self.stamp() if self.stamp is not None else (0, wire.FLAG_UNSYNCED)
                self.append(wire.KIND_GAP, t, fl, (gboot, rs[i:i + wire.MAX_GAP_RANGES]))
                i += wire.MAX_GAP_RANGES
        finally:
            self._hold = False

    def _emit_gaps(self, gboot, seqs):
        if seqs:
            self._emit_gap_ranges(gboot, _ranges(seqs))

    # ------------------------------------------------------------ acks

    def on_ack(self, boot, seq):
        """Gateway committed every record of `boot` with seq <= `seq`: trim. Returns True if new."""
        if seq <= self.acked.get(boot, -1):
            return False
        self.acked[boot] = seq
        self._ack_dirty = True
        keep = []
        for s in self.segs:
            if s[_BOOT] == boot and s[_LAST] <= seq and s[_COUNT] > 0 and s is not self._cur:
                # the segment being appended to stays until it is full (flush): deleting it per
                # ack made a file create + delete per batch, the hottest flash (docs/firmware.md)
                self._rm(self._name(s[_NUM]))
            else:
                keep.append(s)
        self.segs = keep
        return True

    def persist_acks(self):
        boots = {}
        for s in self.segs:
            boots[s[_BOOT]] = 1
        items = [(b, self.acked[b]) for b in sorted(boots) if b in self.acked][-30:]
        out = bytearray(1 + 8 * len(items))
        out[0] = len(items)
        for i, (b, s) in enumerate(items):
            struct.pack_into(">II", out, 1 + 8 * i, b, s)
        self._slots.store(bytes(out))
        self._ack_dirty = False
        # forget boots that left the outbox
        for b in list(self.acked):
            if b != self.boot and b not in boots:
                del self.acked[b]

    def unacked(self):
        """Approximate number of stored records not yet acked (exact unless a segment is
        partially acked and has holes from a compaction)."""
        n = self._pend_n
        for s in self.segs:
            a = self.acked.get(s[_BOOT], -1)
            if a >= s[_LAST]:
                continue
            if a < s[_FIRST]:
                n += s[_COUNT]
            else:
                n += s[_COUNT] * (s[_LAST] - a) // (s[_LAST] - s[_FIRST] + 1)
        return n

    def oldest(self):
        """(boot, seq) of the oldest unacked stored record, or (boot, next seq) when empty."""
        for s in self.segs:
            a = self.acked.get(s[_BOOT], -1)
            if a < s[_LAST]:
                return s[_BOOT], (s[_FIRST] if s[_FIRST] > a else a + 1)
        return self.boot, self.seq

    def floor(self):
        """The hello's floor (docs/wire.md): the oldest (boot, seq) still held anywhere, flash or
        RAM batch, and not acked; (boot, next seq) when nothing is held."""
        b, s = self.oldest()
        if self._pend_n and b == self.boot:
            p = struct.unpack_from(">I", self._buf, 7)[0]  # first frame of the RAM batch
            if p < s:
                s = p
        return b, s

    # ------------------------------------------------------------ sessions, backlog replay

    def begin_session(self):
        """A new connection: flush, then everything stored becomes backlog (replayed within
        credits, oldest first); records flushed from now on are live."""
        self.flush()
        self.live = True
        self._live_reset()
        self.rewind()

    def end_session(self):
        self.live = False
        self._live_reset()

    def rewind(self):
        """Resend policy: everything stored and unacked becomes backlog again."""
        self.flush()
        self._live_reset()
        self._L = (self.boot, self.seq)
        self._rseg = -1
        self._roff = 0
        self._rlb = self._rls = -1
        self._rdone = False
        self.need_rewind = False

    def has_backlog(self):
        return not self._rdone

    def read_backlog(self, n):
        """Up to n backlog records (boot, seq, t, kind, flags, body), oldest first."""
        out = []
        if self._rdone or n <= 0:
            return out
        L = self._L
        for s in list(self.segs):
            if s[_NUM] < self._rseg:
                continue
            a = self.acked.get(s[_BOOT], -1)
            if a >= s[_LAST] or (s[_BOOT], s[_FIRST]) >= L:
                if (s[_BOOT], s[_FIRST]) >= L:
                    self._rdone = True
                    return out
                continue
            try:
                f = self.fs.open(self._name(s[_NUM]), "rb")
            except OSError:
                continue
            Lb, Ls = L
            rd = self._rd
            if rd is None:
                rd = self._rd = _Frames()
            try:
                off = self._roff if s[_NUM] == self._rseg else 0
                if off:
                    f.seek(off)
                rd.start(f)
                while True:
                    ln = rd.next()
                    if ln < 0:
                        break
                    off += ln + 7
                    buf = rd.buf
                    p = rd.p
                    b = (buf[p] << 24) | (buf[p + 1] << 16) | (buf[p + 2] << 8) | buf[p + 3]
                    q = (buf[p + 4] << 24) | (buf[p + 5] << 16) | (buf[p + 6] << 8) | buf[p + 7]
                    if b > Lb or (b == Lb and q >= Ls):
                        self._rdone = True
                        self._rseg = s[_NUM]
                        self._roff = off - ln - 7
                        return out
                    if q <= self.acked.get(b, -1):
                        continue
                    if b < self._rlb or (b == self._rlb and q <= self._rls):
                        continue
                    try:
                        if buf[p + 16] == _KR and ln == _RLEN:  # a reading: no 5-tuple on the way
                            rec = (b, q, struct.unpack_from(">q", buf, p + 8)[0], _KR, buf[p + 17],
                                   struct.unpack_from(_RBODY, buf, p + _PAY_SIZE))
                        else:
                            rec = decode_payload(buf, p, ln)
                    except (ValueError, KeyError):
                        break  # as read_frame: nothing after an undecodable frame
                    out.append(rec)
                    self._rlb = b
                    self._rls = q
                    self._rseg = s[_NUM]
                    self._roff = off
                    if len(out) >= n:
                        return out
            finally:
                f.close()
        self._rdone = True
        return out

    def stats(self):
        return {"records": self.stored_records(), "bytes": self.total_bytes(), "segments": len(self.segs),
                "dropped": self.dropped, "refused": self.refused, "rejected": self.rejected,
                "write_errors": self.write_errors, "flushes": self.flushes, "torn": self.torn}
