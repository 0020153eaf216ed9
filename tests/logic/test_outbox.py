# Outbox: store-and-forward on flash. Runs under CPython and MicroPython.
from shared import wire
from firmware.outbox import Outbox
from firmware.obframe import encode_frame, records
from firmware.obframe import read_frame
from firmware.obload import _ranges
from firmware.hal_sim import MemFS, FailingFS, PowerCut
from firmware.hal import PosixFS
from firmware.identity import Identity
from tests.logic.util import raises, reading


def _val(boot, seq):
    return boot * 100000 + seq * 7 - 5000


def _ob(fs, boot, **kw):
    args = {"max_bytes": 1 << 20, "seg_bytes": 600, "batch_records": 4, "batch_ms": 1000}
    args.update(kw)
    return Outbox(fs, boot, **args).load()


def _fill(ob, n, boot):
    seqs = []
    for i in range(n):
        s = reading(ob, i % 3, 1000 + i, wire.FLAG_UNSYNCED, _val(boot, ob.seq), now_ms=i)
        seqs.append(s)
    return seqs


def _drain(ob, n=100000):
    ob.begin_session()
    out = []
    while True:
        got = records(ob.read_backlog(7))
        if not got:
            break
        out.extend(got)
        if len(out) > n:
            break
    return out


def test_frame_roundtrip_and_crc():
    fr = encode_frame(3, 9, 1700000000000, wire.KIND_READING, 0, b"\x01\x00\x00\x00\x05")
    fs = MemFS()
    with fs.open("x", "wb") as f:
        f.write(fr)
        f.write(fr[:-1] + bytes([fr[-1] ^ 1]))  # second frame: bad CRC
    f = fs.open("x", "rb")
    frame, rec = read_frame(f)
    assert rec == (3, 9, 1700000000000, wire.KIND_READING, 0, (1, 5))
    assert read_frame(f) is None
    f.close()


def test_ranges():
    assert _ranges([1, 2, 3, 7, 9, 10]) == [(1, 3), (7, 1), (9, 2)]
    assert _ranges([]) == []


def test_batching_writes_once_per_batch():
    fs = MemFS()
    ob = _ob(fs, 1, batch_records=8)
    _fill(ob, 20, 1)
    assert ob.flushes == 2  # 2 full batches of 8, 4 still in RAM
    assert ob.stored_records() == 20
    ob.tick(5000)  # batch_ms elapsed
    assert ob.flushes == 3 and not ob.pending()


def test_urgent_records_flush_at_once():
    fs = MemFS()
    ob = _ob(fs, 1)
    reading(ob, 0, 1, 0, 5)
    ob.append(wire.KIND_CEP, 10, 0, ("hot", 2, 500, (1, 2)))
    assert ob.flushes == 1 and ob.stored_records() == 2 and not ob.pending()


def test_reboot_resumes_backlog_with_original_identity():
    fs = MemFS()
    ob = _ob(fs, 1)
    _fill(ob, 10, 1)
    ob.append(wire.KIND_WINDOW, 1000, 0, (0, 10000, 10, -5, 5, 0, 2, 0, 9000))
    ob.flush()
    # reboot: boot 2 sees boot 1's records with their (boot, seq)
    ob2 = _ob(fs, 2)
    _fill(ob2, 3, 2)
    ob2.flush()
    recs = _drain(ob2)
    keys = [(r[0], r[1]) for r in recs]
    assert keys == [(1, i) for i in range(11)] + [(2, 0), (2, 1), (2, 2)], keys
    for r in recs:
        if r[3] == wire.KIND_READING:
            assert r[5][1] == _val(r[0], r[1])
    assert recs[10][5] == (0, 10000, 10, -5, 5, 0, 2, 0, 9000)


def test_ack_trims_segments_and_survives_reboot():
    fs = MemFS()
    ob = _ob(fs, 1, seg_bytes=200)
    _fill(ob, 24, 1)
    ob.flush()
    nseg = len(ob.segs)
    assert nseg >= 3
    ob.on_ack(1, 11)
    assert len(ob.segs) < nseg
    ob.persist_acks()
    ob2 = _ob(fs, 2, seg_bytes=200)
    keys = [(r[0], r[1]) for r in _drain(ob2)]
    assert keys == [(1, i) for i in range(12, 24)], keys
    # ack everything: no segment left
    ob2.on_ack(1, 23)
    assert not ob2.segs
    ob2.persist_acks()
    assert [n for n in fs.listdir("ob") if n.startswith("s")] == []


def test_backlog_within_credits_and_live_split():
    fs = MemFS()
    ob = _ob(fs, 1)
    _fill(ob, 10, 1)
    ob.begin_session()
    first = records(ob.read_backlog(4))
    assert [r[1] for r in first] == [0, 1, 2, 3]
    # live records made now are not backlog
    _fill(ob, 4, 1)
    live = records(ob.take_live())
    assert ob.take_live() == b""
    assert [r[1] for r in live] == [10, 11, 12, 13]
    rest = records(ob.read_backlog(100))
    assert [r[1] for r in rest] == [4, 5, 6, 7, 8, 9]
    assert len(ob.read_backlog(100)) == 0 and not ob.has_backlog()
    # acked records are skipped after a rewind (resend policy)
    ob.on_ack(1, 8)
    ob.rewind()
    assert [r[1] for r in records(ob.read_backlog(100))] == [9, 10, 11, 12, 13]


def test_unsent_live_overflow_rewinds():
    fs = MemFS()
    ob = _ob(fs, 1, live_max=6)
    ob.begin_session()
    _fill(ob, 12, 1)
    assert ob.need_rewind
    ob.rewind()
    assert [r[1] for r in records(ob.read_backlog(100))] == list(range(12))


def test_full_outbox_drops_raw_first_and_reports_gaps():
    fs = MemFS()
    ob = _ob(fs, 1, max_bytes=1500, seg_bytes=300)
    cep = []
    for i in range(120):
        reading(ob, 0, i, 0, i)
        if i % 10 == 0:
            cep.append(ob.append(wire.KIND_CEP, i, 0, ("r%d" % i, 1, 10, (i,))))
    ob.flush()
    assert ob.total_bytes() <= 1500
    assert ob.dropped > 0
    recs = _drain(ob)
    seqs = [r[1] for r in recs]
    gaps = [r for r in recs if r[3] == wire.KIND_GAP]
    assert gaps
    # every CEP event survives; every seq ever given is either stored or in a gap range
    for s in cep:
        assert s in seqs
    covered = {}
    for g in gaps:
        assert g[5][0] == 1
        for first, n in g[5][1]:
            for s in range(first, first + n):
                covered[s] = 1
    for s in range(ob.seq):
        assert s in seqs or s in covered, s
    # a gap record merged into a later one is covered by it too (its own seq)
    assert len(covered) == ob.dropped + ob.gaps_merged


def test_full_of_important_records_refuses_raw():
    fs = MemFS()
    ob = _ob(fs, 1, max_bytes=600, seg_bytes=200)
    for i in range(40):
        ob.append(wire.KIND_CEP, i, 0, ("c", 1, 1, ()))
    ob.flush()
    dropped = ob.dropped
    ceps = len([r for r in _drain(ob) if r[3] == wire.KIND_CEP])
    for i in range(30):
        reading(ob, 0, 1, 0, 1)  # less important than everything stored: refused when no room
    ob.flush()
    # readings get in while the low-water room lasts (and later ones replace them); no CEP goes
    assert ob.refused > 0 and ob.dropped >= dropped
    assert len([r for r in _drain(ob) if r[3] == wire.KIND_CEP]) == ceps
    assert ob.total_bytes() <= 600


def test_power_cut_at_every_byte_offset():
    # reference run without failure: how many bytes the scenario writes
    def scenario(fs, committed, acked):
        Identity(fs)
        ob = _ob(fs, 1, seg_bytes=120, batch_records=3, ack_persist_ms=0)
        for i in range(9):
            reading(ob, 0, i, 0, _val(1, i))
            if ob.pending() == 0:
                committed[:] = list(range(i + 1))
        acked[0] = 2  # the gateway committed 0..2: they may go
        ob.on_ack(1, 2)
        ob.persist_acks()
        acked[1] = 2
        ob.append(wire.KIND_CEP, 50, 0, ("x", 1, 1, (1,)))
        committed.append(9)

    c, a = [], [-1, -1]
    probe = FailingFS(MemFS())
    scenario(probe, c, a)
    total = probe.written
    assert total > 300
    for budget in range(total + 1):
        mem = MemFS()
        committed, acked = [], [-1, -1]
        try:
            scenario(FailingFS(mem, budget), committed, acked)
        except PowerCut:
            pass
        # restart on the surviving flash
        boot2 = Identity(mem).boot
        assert boot2 != 1  # never the boot of the stored records (a fresh counter starts at random)
        ob = _ob(mem, boot2)
        recs = _drain(ob)
        got = {}
        for r in recs:
            assert r[0] == 1
            assert r[1] not in got  # no duplicates
            got[r[1]] = r
            if r[3] == wire.KIND_READING:
                assert r[5][1] == _val(1, r[1])  # nothing corrupt
        for s in committed:
            assert s in got or s <= acked[0], (budget, s)
        # nothing acked and persisted comes back
        for s in got:
            assert s > acked[1], (budget, s)


def posix_fs_root():
    """A directory of its own for a PosixFS test (MicroPython has no tempfile; two runs at once
    must not share one): (its path, a function that removes it with what the test left in it)."""
    import os
    import random
    root = "/tmp/edgeflow-ob-test-%08x" % random.getrandbits(30)
    os.mkdir(root)

    def remove():
        for d in (root + "/ob", root):
            try:
                for n in os.listdir(d):
                    os.remove(d + "/" + n)
                os.rmdir(d)
            except OSError:
                pass
    return root, remove


def test_posix_fs_roundtrip():
    import os
    root, remove = posix_fs_root()
    try:
        fs = PosixFS(root)
        ob = _ob(fs, 1)
        _fill(ob, 6, 1)
        ob.flush()
        ob.on_ack(1, 1)
        ob.persist_acks()
        ob2 = _ob(fs, 2)
        assert [r[1] for r in _drain(ob2)] == [2, 3, 4, 5]
    finally:
        remove()
    try:
        os.stat(root)
        assert False, "%s left behind" % root
    except OSError:
        pass


def test_write_error_keeps_batch_and_uses_new_segment():
    class FlakyFile:
        def __init__(self, fs, f):
            self.fs = fs
            self.f = f

        def write(self, b):
            if self.fs.fail:
                self.fs.fail -= 1
                raise OSError(28, "ENOSPC")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    class Flaky(MemFS):
        fail = 0

        def open(self, path, mode):
            f = MemFS.open(self, path, mode)
            return FlakyFile(self, f) if "a" in mode else f

    fs = Flaky()
    ob = _ob(fs, 1)
    _fill(ob, 4, 1)
    fs.fail = 1
    _fill(ob, 4, 1)
    assert ob.write_errors == 1 and ob.pending() == 4
    ob.flush()
    assert not ob.pending()
    assert [r[1] for r in _drain(ob)] == list(range(8))


def test_bad_body_is_rejected_not_stored():
    ob = _ob(MemFS(), 1)
    assert ob.append(wire.KIND_CEP, 1, 0, ("bad id!", 1, 1, ())) is None
    assert ob.rejected == 1 and ob.seq == 0
    raises(KeyError, lambda: {}["x"])


def _via_backlog(fs, n):
    """Every record of the segments in fs as read_backlog(n) hands them out."""
    ob = Outbox(fs, 99, seg_bytes=1 << 16).load()
    ob.begin_session()
    out = []
    while ob.has_backlog():
        fr = ob.read_backlog(n)
        assert len(records(fr)) <= n
        out.extend(records(fr))
    return out


def test_backlog_frames_match_read_frame():
    # mixed frame sizes, reads smaller and larger than a frame, torn tails at every cut, a
    # flipped byte: read_backlog (frames read straight into its result) agrees with read_frame
    fs = MemFS()
    ob = _ob(fs, 4, seg_bytes=1 << 16, batch_records=64)
    for i in range(40):
        reading(ob, i % 3, 1700000000000 + i, 0, _val(4, i))
        if i % 9 == 0:
            ob.append(wire.KIND_CEP, 1700000000000 + i, 0, ("rule%d" % i, 2, 100, (i, -i, i * 1000)))
    ob.flush()
    name = [n for n in fs.listdir("ob") if n.startswith("s")][0]
    data = bytes(fs.files["ob/" + name])

    def ref_of(d):
        fs.files["t"] = bytearray(d)
        f = fs.open("t", "rb")
        exp = []
        while True:
            r = read_frame(f)
            if r is None:
                break
            exp.append(r[1])
        del fs.files["t"]
        return exp

    def got_of(d, n):
        m = MemFS()
        m.files["ob/s00000000"] = bytearray(d)
        return _via_backlog(m, n)

    ref = ref_of(data)
    assert len(ref) == 45
    for n in (1, 2, 7, 50, 1000):
        assert got_of(data, n) == ref, n
    for cut in range(len(data) - 80, len(data) + 1):
        assert got_of(data[:cut], 3) == ref_of(data[:cut]), cut
    # a flipped byte stops the scan at that frame
    bad = bytearray(data)
    bad[500] ^= 0x40
    got = got_of(bad, 5)
    assert 0 < len(got) < len(ref) and got == ref[:len(got)]


def test_backlog_from_big_segments_in_small_reads():
    fs = MemFS()
    ob = _ob(fs, 1, seg_bytes=8192, batch_records=16)
    _fill(ob, 700, 1)  # ~21 KB: several 8 KB segments, frames straddle the reader's refills
    ob.flush()
    ob.on_ack(1, 99)
    recs = _drain(ob)
    assert [r[1] for r in recs] == list(range(100, 700))
    for r in recs:
        assert r[5][1] == _val(1, r[1]) and r[2] == 1000 + r[1]


def test_flash_failing_drops_ram_batch_into_a_gap_record():
    class Dead(MemFS):
        fail = True

        def open(self, path, mode):
            if "a" in mode and self.fail:
                raise OSError(5, "EIO")
            return MemFS.open(self, path, mode)

    fs = Dead()
    ob = _ob(fs, 1, batch_records=4)
    tb = [0, 0, 0, 0]
    for i in range(34):  # the 17th record's failed flush drops the batch (> 4 * batch_records),
        # the 34th again: the first gap record is kept, its successors are not its seq + 1
        ob.reading_at(i % 3, i, tb, wire.FLAG_UNSYNCED, 100 + i)
    assert ob.write_errors > 0 and ob.dropped > 0
    assert ob.pending() >= 1  # the gap record(s) wait in RAM
    # readings after the kept gap records: their seqs (implicit in the RAM batch) follow them
    later = {}
    for i in range(2):
        later[ob.reading_at(1, 50 + i, tb, wire.FLAG_UNSYNCED, 500 + i)] = 50 + i
    fs.fail = False
    ob.flush()
    recs = _drain(ob)
    covered = []
    for r in recs:
        if r[3] == wire.KIND_GAP:
            for first, n in r[5][1]:
                covered.extend(range(first, first + n))
    seqs = [r[1] for r in recs]
    assert len(covered) == ob.dropped
    for s in range(34):
        assert s in seqs or s in covered, s
    got = {r[1]: r[5][1] for r in recs if r[3] == wire.KIND_READING}
    assert all(got.get(s) == v for s, v in later.items()), (later, got)


def _count_compactions(ob):
    # every compaction writes its survivors to a temp file "t..." first
    n = [0]
    fs = ob.fs
    orig = fs.open

    def counted(path, mode):
        if "w" in mode and path.split("/")[-1].startswith("t"):
            n[0] += 1
        return orig(path, mode)
    fs.open = counted
    return n


def test_acked_batches_append_to_one_segment_until_full():
    # flash wear: an ack used to delete the segment being appended to, so every batch made a new
    # file (a littlefs create + delete per batch: the hottest metadata blocks)
    fs = MemFS()
    ob = _ob(fs, 1, seg_bytes=600, batch_records=4, ack_persist_ms=0)
    for b in range(20):
        _fill(ob, 4, 1)  # one batch of 120 bytes
        ob.on_ack(1, ob.seq - 1)
        ob.tick(b)
    assert ob._next_num <= 20 * 120 // 600 + 2, ob._next_num
    assert len([n for n in fs.listdir("ob") if n.startswith("s")]) <= 2
    # nothing acked comes back after a reboot, later records do
    _fill(ob, 3, 1)
    ob.flush()
    ob2 = _ob(fs, 2, seg_bytes=600, batch_records=4)
    assert [(r[0], r[1]) for r in _drain(ob2)] == [(1, 80), (1, 81), (1, 82)]


def test_compaction_writes_its_gap_records_in_few_appends():
    # flash wear: every gap record of a compaction used to be its own synced append (a full
    # outbox with windows between the dropped readings made dozens per compaction)
    fs = MemFS()
    ob = _ob(fs, 1, max_bytes=8000, seg_bytes=1500, batch_records=8)
    n = _count_compactions(ob)
    records = 0
    for i in range(900):
        reading(ob, 0, i, 0, i)
        reading(ob, 1, i, 0, i)
        ob.append(wire.KIND_WINDOW, i, 0, (0, i * 1000, 1000, -5, 5, 0, 2, 0, 900))
        records += 3
    ob.flush()
    assert n[0] > 5 and ob.dropped > 500
    # batches of readings (8 per batch; windows are flushed with them) + a few appends per compaction
    assert ob.flushes <= records // 8 + 4 * n[0], (ob.flushes, n[0])
    assert ob.total_bytes() <= 8000


def test_full_outbox_compacts_in_steps_and_gap_records_stay_bounded():
    # hysteresis: once full, free down to max_bytes - max(seg_bytes, max_bytes / 8), so there is
    # one compaction per ~max_bytes / 8 written, not one per batch
    fs = MemFS()
    ob = _ob(fs, 1, max_bytes=12000, seg_bytes=600, batch_records=4)
    n = _count_compactions(ob)
    _fill(ob, 2400, 1)  # 72,000 bytes of readings, 6 x max_bytes
    ob.flush()
    written = 2400 * 30 - 12000
    assert 0 < n[0] <= written // 1500 + 4, n[0]
    gaps = sum(s[9] for s in ob.segs)
    assert gaps <= 40, gaps
    assert ob.total_bytes() <= 12000
    recs = _drain(ob)
    covered = {}
    for r in recs:
        covered[r[1]] = 1
        if r[3] == wire.KIND_GAP:
            for first, k in r[5][1]:
                for s in range(first, first + k):
                    covered[s] = 1
    assert all(s in covered for s in range(ob.seq))  # every seq stored or in a gap range


def test_power_cut_at_every_byte_while_full_and_compacting():
    # compactions (merge, gap records, rename, removes) cut at every byte: every record that was
    # on flash before the cut is still there or covered by a durable gap record, never twice
    def scenario(fs, committed, value):
        Identity(fs)
        ob = _ob(fs, 1, max_bytes=900, seg_bytes=300, batch_records=3)
        for i in range(45):
            s = reading(ob, 0, i, 0, i * 7 - 100)  # its seq may follow gap records of a compaction
            if s is not None:
                value[s] = i * 7 - 100
            if i % 5 == 4:
                ob.append(wire.KIND_WINDOW, i, 0, (0, i * 1000, 1000, -5, 5, 0, 2, 0, 900))
            if ob.pending() == 0:
                committed[:] = list(range(ob.seq))
        assert ob.dropped > 0

    probe = FailingFS(MemFS())
    scenario(probe, [], {})
    total = probe.written
    assert total > 2000
    for budget in range(total + 1):
        mem = MemFS()
        committed = []
        value = {}
        try:
            scenario(FailingFS(mem, budget), committed, value)
        except PowerCut:
            pass
        ob = _ob(mem, Identity(mem).boot, max_bytes=900, seg_bytes=300, batch_records=3)
        got = {}
        covered = {}
        for r in _drain(ob):
            assert r[0] == 1 and r[1] not in got, (budget, r)
            got[r[1]] = 1
            if r[3] == wire.KIND_READING:
                assert r[5][1] == value[r[1]], (budget, r)  # nothing corrupt
            elif r[3] == wire.KIND_GAP:
                for first, n in r[5][1]:
                    for s in range(first, first + n):
                        covered[s] = 1
        for s in committed:
            assert s in got or s in covered, (budget, s)


def test_live_batches_read_back_through_compactions():
    # live batches are read back from flash (take_live keeps only where they went): a session
    # that stays live while the outbox fills and compacts, and acks that trim, must neither
    # hand out moved / wrong frames nor lose a record (each seq sent or in a gap range)
    fs = MemFS()
    ob = _ob(fs, 1, max_bytes=3000, seg_bytes=300, batch_records=4, live_max=400)
    ob.begin_session()
    got = {}
    covered = {}
    value = {}
    rewinds = 0

    def take(recs):
        for r in recs:
            assert r[0] == 1
            if r[3] == wire.KIND_READING:
                assert r[5][1] == value[r[1]], r  # the frame of that seq, not a moved one
            elif r[3] == wire.KIND_GAP:
                for first, k in r[5][1]:
                    for s in range(first, first + k):
                        covered[s] = 1
            got[r[1]] = 1

    for i in range(400):
        s = reading(ob, i % 3, 1000 + i, 0, i * 11 - 2000)
        if s is not None:
            value[s] = i * 11 - 2000
        if i % 7 == 0:
            ob.append(wire.KIND_WINDOW, i, 0, (0, i * 1000, 1000, -5, 5, 0, 2, 0, 900))
        if i % 13 == 0:  # a slow uplink: several batches wait
            while ob._lv:
                take(records(ob.take_live()))
        if i == 200:
            ob.on_ack(1, ob.seq // 3)  # trims old segments, maybe one with live batches
        if ob.need_rewind:
            rewinds += 1
            ob.rewind()
            while ob.has_backlog():
                take(records(ob.read_backlog(5)))
    ob.flush()
    take(records(ob.take_live()))
    assert ob.dropped > 0 and rewinds > 0
    for s in range(ob.seq):
        assert s in got or s in covered or s <= ob.seq // 3, s


def test_biggest_records_pass_the_backlog_reader():
    # the replay reader treats a frame longer than 256 bytes as corrupt: the biggest records the
    # wire allows (a CEP event with the longest rule id and all evidence, a gap record with all
    # ranges) must fit, and come back whole
    from firmware.obfull import emit_gap_ranges
    ob = _ob(MemFS(), 1)
    cep = ("r" * wire.MAX_RULE_ID, 3, 4000000000, tuple(range(-4, wire.MAX_EVIDENCE - 4)))
    assert ob.append(wire.KIND_CEP, 5, 0, cep) == 0
    ranges = tuple((1000 * i, 65535) for i in range(wire.MAX_GAP_RANGES))
    emit_gap_ranges(ob, 7, ranges)
    ob.flush()
    recs = _drain(ob)
    assert [r[3] for r in recs] == [wire.KIND_CEP, wire.KIND_GAP]
    assert recs[0][5] == cep and recs[1][5] == (7, ranges)
