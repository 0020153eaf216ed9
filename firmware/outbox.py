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
# read_backlog() and take_live() hand out frames as stored (back to back): the uplink encodes
# its messages straight from them (frame at o: boot at o+3, seq o+7, t o+11, kind o+19,
# flags o+20, body o+21, next frame at o + 7 + len).
#
# Records are batched in RAM and appended to the open segment file with write + flush per batch
# (every batch_records records or batch_ms ms, at once for CEP/anomaly/gap records). The RAM
# batch is a preallocated bytearray: other records as complete frames (CRCs filled in at
# flush), raw readings of reading_at() (the per-sample path, allocates nothing on MicroPython)
# as 14-byte entries: t i64 | flags | channel | value i32, expanded to their 30-byte frames at
# flush (RAM: 1.0 KB instead of 2.2 KB at the default 64 records). An entry's first byte is the
# top byte of t, 0 for any time before the year 2.2 million, so never the frames' 0xA5; its seq
# is one more than the record's before it (the first: seq - pending, drop_pending keeps only
# frames, which carry their seq). On LittleFS a flush is a
# sync (about one block erase each: the batch size sets the flash life), so a power cut loses
# at most the unflushed RAM batch. A torn frame fails its CRC: the scan stops there, the
# records before it are kept, and that segment is never appended to again.
#
# Full (total bytes > max_bytes): firmware/obfull.py (compaction, gap records). Boot scan,
# set-up and the rare calls: firmware/obload.py. Both are imported on demand and unloaded
# after (RAM: docs/firmware.md).
import struct
import binascii

try:
    from micropython import const
except ImportError:  # CPython (no function object on the board: RAM)
    from firmware.cpyticks import const

from shared import wire_dev as wire  # the device side of the contract (shared/wire.py: all of it)
from firmware.hal import unload

_MAGIC = const(0xA5)
_PAYSZ = const(18)  # boot, seq, t, kind, flags
_KR = const(1)  # shared.wire.KIND_READING
_RLEN = const(23)  # payload length of a reading
_RFRAME = const(30)  # bytes per reading on flash
_RENT = const(14)  # bytes per reading in the RAM batch (obload.init sizes the batch too)
_SLACK = const(128)  # room in the RAM batch for one more big frame
_FMAX = const(256)  # no frame is longer (the biggest, a gap record, has 126 bytes)
_DONE = const(0x3FFFFFFF)  # the replay cursor's segment once the backlog is read up to L
# drop class by kind when full, lowest first: reading/status 0, window 1, CEP/anomaly 2, gap 3
PRIO = b"\x00\x00\x01\x02\x02\x00\x03"

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
# the RAM batch: Outbox._pend = [bytes used in _buf, bytes once on flash, records, now_ms of
# the first record (None: empty; -1: set by the next tick)] (one name, RAM)
_PUSED = const(0)
_PFL = const(1)
_PN = const(2)
_PSINCE = const(3)


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


class Outbox:
    # counters and flags (class defaults: an instance slot only once set, RAM)
    dropped = 0  # records dropped by policy (with a seq: also in a gap record)
    refused = 0  # records refused at the door when full (no seq given)
    rejected = 0  # records the wire encoder refused (bad body)
    write_errors = 0
    gaps_merged = 0  # gap records re-expressed in merged ones
    torn = 0  # torn/corrupt tails found at load
    need_rewind = False  # the live queue overflowed: rewind() and send as backlog
    stamp = None  # optional () -> (t, flags) for records the outbox makes itself (gaps)
    _hold = False  # set while a compaction appends its gap records (no flush per record)

    def __init__(self, fs, boot, dir="ob", max_bytes=262144, seg_bytes=8192, batch_records=64,
                 batch_ms=20000, ack_persist_ms=10000, live_max=None):
        # set-up: firmware/obload.py (attributes documented there)
        self._x("obload", "init", fs, boot, dir, max_bytes, seg_bytes, batch_records, batch_ms, ack_persist_ms,
                live_max)

    def _x(self, module, fn, *a):
        """Rarely run code: fn of firmware.<module> on self, the module unloaded after."""
        module = "firmware" + "." + module
        r = getattr(__import__(module, None, None, ("x",)), fn)(self, *a)
        unload(module)
        return r

    def load(self):
        """Scan flash after a boot: rebuild segment index, acked positions, drop garbage."""
        r = self._x("obload", "load")
        unload("firmware.obfull")  # its frame reader
        return r

    def floor(self):
        """The hello's floor (docs/wire.md): the oldest (boot, seq) held anywhere, flash or RAM
        batch, and not acked; (boot, next seq) when nothing is held."""
        return self._x("obload", "floor")

    def unacked(self):
        """Approximate number of stored records not yet acked (firmware/obload.py)."""
        return self._x("obload", "unacked")

    def _name(self, num, prefix="s"):
        return "%s/%s%08d" % (self.dir, prefix, num)

    def _rm(self, path):
        try:
            self.fs.remove(path)
        except OSError:
            pass

    # ------------------------------------------------------------ append / flush

    def total_bytes(self):
        n = self._pend[_PFL]
        for s in self.segs:
            n += s[_BYTES]
        return n

    def pending(self):
        """Records in the RAM batch (not yet on flash)."""
        return self._pend[_PN]

    def stored_records(self):
        n = self._pend[_PN]
        for s in self.segs:
            n += s[_COUNT]
        return n

    def append(self, kind, t, flags, body, now_ms=None):
        """Store a record of this boot; returns its seq, or None when refused."""
        if kind == _KR:
            bb = struct.pack(">Bi", body[0], body[1])
        else:
            try:
                bb = wire.encode_body(kind, body)
            except (ValueError, TypeError, KeyError):
                self.rejected += 1
                return None
        prio = PRIO[kind]
        size = 25 + len(bb)
        if prio < 3 and self.total_bytes() + size > self.max_bytes and not self._x("obfull", "make_room", size, prio):
            self.refused += 1
            return None
        seq = self.seq
        off = self._reserve(size)
        buf = self._buf
        struct.pack_into(">BHIIqBB", buf, off, _MAGIC, size - 7, self.boot, seq, t, kind, flags)
        buf[off + 21:off + size - 4] = bb
        self.seq = seq + 1
        p = self._pend
        p[_PUSED] = off + size
        p[_PFL] += size
        p[_PN] += 1
        if p[_PSINCE] is None:
            p[_PSINCE] = now_ms
        if self._hold:  # gap records of a compaction: one synced append per full buffer
            if p[_PUSED] >= self.batch_records * _RFRAME:
                self.flush()
        elif prio >= 2 or p[_PN] >= self.batch_records:
            self.flush()
        return seq

    def reading_at(self, ch, value, tb, flags, lo):
        """The per-sample path: store a raw reading of this boot at t = tb + lo, where tb is
        an i64 as four big-endian u16 limbs and 0 <= lo < 2**28 (firmware.clock: tb, tfl,
        ms_lo). Returns its seq, or None when refused. Allocates nothing on MicroPython
        unless the batch is flushed (batch full) or the outbox is full."""
        if self.total_bytes() + _RFRAME > self.max_bytes and not self._x("obfull", "make_room", _RFRAME, 0):
            self.refused += 1
            return None
        p = self._pend
        off = p[_PUSED]
        if off + _RENT > len(self._buf):
            off = self._reserve(_RENT)
        x = tb[3] + (lo & 0xFFFF)
        l3 = x & 0xFFFF
        x = tb[2] + (lo >> 16) + (x >> 16)
        l2 = x & 0xFFFF
        x = tb[1] + (x >> 16)
        l1 = x & 0xFFFF
        l0 = (tb[0] + (x >> 16)) & 0xFFFF
        seq = self.seq
        # a reading entry, t as four big-endian u16 limbs (small ints only)
        struct.pack_into(">HHHHBBi", self._buf, off, l0, l1, l2, l3, flags, ch, value)
        self.seq = seq + 1
        p[_PUSED] = off + _RENT
        p[_PFL] += _RFRAME
        p[_PN] += 1
        if p[_PSINCE] is None:
            p[_PSINCE] = -1  # the batch's age counts from the next tick()
        if p[_PN] >= self.batch_records:
            self.flush()
        return seq

    def _reserve(self, nbytes):
        """Offset for nbytes more in the RAM batch, growing the buffer when needed (rare:
        flash write errors, big records)."""
        off = self._pend[_PUSED]
        if off + nbytes > len(self._buf):
            nb = bytearray(max(2 * len(self._buf), off + nbytes))
            nb[0:off] = self._buf[0:off]
            self._buf = nb
        return off

    def tick(self, now_ms):
        """Call periodically: flushes an old batch, persists ack positions."""
        p = self._pend
        if p[_PN]:
            s = p[_PSINCE]
            if s == -1:
                s = p[_PSINCE] = now_ms
            if s is None or now_ms - s >= self.batch_ms:
                self.flush()
        if self._ack_dirty and (self._ack_at is None or now_ms - self._ack_at >= self.ack_persist_ms):
            self.persist_acks()
            self._ack_at = now_ms

    def flush(self):
        """Append the RAM batch to the current segment (writes + flush). Returns the number of
        records written, -1 on a write error (the batch stays in RAM and is retried)."""
        p = self._pend
        n = p[_PN]
        if not n:
            return 0
        size = p[_PUSED]
        fsz = p[_PFL]  # bytes on flash
        buf = self._buf
        cur = self._cur
        if cur is None or cur[_BYTES] + fsz > self.seg_bytes:
            self._end_cur()
            if cur is not None and cur[_COUNT] and self.acked.get(cur[_BOOT], -1) >= cur[_LAST]:
                self.segs.remove(cur)  # kept while current (on_ack): one create + delete per segment
                self._rm(self._name(cur[_NUM]))
            cur = self._cur = Seg(self._next_num, self.boot)
            self._next_num += 1
            self.segs.append(cur)
        mv = memoryview(buf)
        fr = bytearray(_RFRAME)  # a reading's frame, rebuilt from its entry
        struct.pack_into(">BHI", fr, 0, _MAGIC, _RLEN, self.boot)
        fr[19] = _KR
        fc = memoryview(fr)[0:_RFRAME - 4]
        try:
            f = self._af
            if f is None:
                f = self._af = self.fs.open(self._name(cur[_NUM]), "ab")
            off = 0
            q = self.seq - n  # the first record's seq, if it is a reading entry
            while off < size:
                if buf[off] == _MAGIC:  # seal: its CRC (idempotent, so a retry redoes it)
                    q = (buf[off + 7] << 24) | (buf[off + 8] << 16) | (buf[off + 9] << 8) | buf[off + 10]
                    e = off + 3 + ((buf[off + 1] << 8) | buf[off + 2])
                    struct.pack_into(">I", buf, e, binascii.crc32(mv[off:e]))
                    f.write(mv[off:e + 4])
                    off = e + 4
                else:
                    struct.pack_into(">I", fr, 7, q)
                    for i in range(8):
                        fr[11 + i] = buf[off + i]  # t
                    for i in range(8, 14):
                        fr[12 + i] = buf[off + i]  # flags, channel, value
                    struct.pack_into(">I", fr, 26, binascii.crc32(fc))
                    f.write(fr)
                    off += _RENT
                q += 1
            f.flush()  # LittleFS: lfs_file_sync, the batch is durable; the data block is not
            # copied again per batch as a close + reopen would (flash wear: docs/firmware.md)
        except OSError:
            return self._x("obload", "write_failed", cur)
        lv = self._lv
        if lv is not None:  # a live session: where the batch went, for take_live (no copy)
            if sum(e[3] for e in lv) + n > self.live_max:
                del lv[:]
                self.need_rewind = True
            else:
                lv.append((cur[_NUM], cur[_BYTES], fsz, n))
        mv = fc = None
        off = 0
        q = self.seq - n
        while off < size:
            if buf[off] == _MAGIC:
                q = (buf[off + 7] << 24) | (buf[off + 8] << 16) | (buf[off + 9] << 8) | buf[off + 10]
                fl = 7 + ((buf[off + 1] << 8) | buf[off + 2])
                seg_add(cur, q, PRIO[buf[off + 19]], fl)
                off += fl
            else:
                seg_add(cur, q, 0, _RFRAME)
                off += _RENT
            q += 1
        p[_PUSED] = p[_PFL] = p[_PN] = 0
        p[_PSINCE] = None
        if len(buf) > self.batch_records * _RENT + _SLACK:
            self._buf = bytearray(self.batch_records * _RENT + _SLACK)
        self.flushes += 1
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
        """Store the acked position of every boot still on flash (at most 30); forget the rest."""
        a = self.acked
        for b in list(a):
            if b != self.boot and not [1 for s in self.segs if s[_BOOT] == b]:
                del a[b]
        bs = sorted(a)[-30:]
        out = bytearray(1 + 8 * len(bs))
        out[0] = len(bs)
        for i in range(len(bs)):
            struct.pack_into(">II", out, 1 + 8 * i, bs[i], a[bs[i]])
        self._slots.store(out)
        self._ack_dirty = False

    # ------------------------------------------------------------ sessions, backlog replay

    def begin_session(self):
        """A new connection: everything stored becomes backlog (replayed within credits,
        oldest first); records flushed from now on are live."""
        self.rewind()
        self._lv = []

    def end_session(self):
        self._lv = None
        unload("firmware.obread")

    def rewind(self):
        """Resend policy: everything stored and unacked becomes backlog again."""
        self.flush()
        if self._lv:
            self._lv = []
        # the replay cursor (firmware/obread.py): segment and file offset to go on from, the
        # (boot, seq) where live begins (L), the (boot, seq) replayed last
        self._rc = [-1, 0, self.boot, self.seq, -1, -1]
        if self.need_rewind:
            self.need_rewind = False

    def has_backlog(self):
        return self._rc[0] != _DONE

    def take_live(self):
        """Frames flushed while the session is live and not taken yet, one flushed batch per
        call, read back from flash (b"" when none; RAM: no copy waits in a queue)."""
        lv = self._lv
        if not lv:
            return b""
        num, off, n, _ = lv.pop(0)
        out = bytearray(n)
        try:
            f = self.fs.open(self._name(num), "rb")
            try:
                f.seek(off)
                if f.readinto(out) == n and out[0] == _MAGIC:
                    return out
            finally:
                f.close()
        except OSError:
            pass
        self.need_rewind = True  # trimmed or rewritten meanwhile: what is left goes as backlog
        return b""

    def read_backlog(self, n):
        """Up to n backlog records, oldest first, as their frames back to back (empty when
        none). firmware/obread.py: loaded while a replay lasts, unloaded when it is done."""
        if self._rc[0] == _DONE or n <= 0:
            return b""
        from firmware.obread import read
        fr = read(self, n)
        if self._rc[0] == _DONE:
            unload("firmware.obread")
        return fr
