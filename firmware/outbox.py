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
from firmware.hal import unload


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


class _Frames:
    """The frames of one segment file, read through one reusable buffer (readinto): per frame
    only the CRC check allocates (a memoryview slice and the crc int) until the caller decodes
    it. Same verdicts as read_frame."""

    def __init__(self, size=256):
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
        struct.pack_into(">I", c, 0, binascii.crc32(self.mv[s:e]))  # unsigned: no & (a long int less)
        if c[0] != buf[e] or c[1] != buf[e + 1] or c[2] != buf[e + 2] or c[3] != buf[e + 3]:
            return -1
        self.p = s + 3
        self.s = e + 4
        return n


def _full():
    from firmware import obfull
    return obfull


def _unload(name):
    unload("firmware." + name)  # on MicroPython: rarely run code (firmware.hal.unload)


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
        from firmware import obload
        obload.load(self)
        _unload("obload")
        return self

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
            struct.pack_into(">I", buf, e, binascii.crc32(mv[off:e]))
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
        _full().drop_pending(self)
        _unload("obfull")

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

    def _make_room(self, size, prio):
        if self.total_bytes() + size <= self.max_bytes:
            return True
        r = _full().make_room(self, size, prio)
        _unload("obfull")
        _unload("obload")
        return r

    def _compact(self, seg, q, need=0):
        # firmware/obfull.py; a method, so tests can count compactions
        return _full().compact(self, seg, q, need)

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
