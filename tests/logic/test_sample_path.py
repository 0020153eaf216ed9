# The device's whole per-sample path (App.sample_step: SimHal -> pipeline -> outbox RAM batch)
# allocates nothing in steady state: proven under the real MicroPython with heap_lock (any
# allocation raises MemoryError). Batch flushes, window closes and rule firings may allocate
# (they are rare); the rounds run here trigger none of the latter, and a batch that is about to
# fill is flushed between rounds, outside the lock. Under CPython the same loops just run.
import sys
import gc
from shared import wire
from firmware.app import App
from firmware.clock import Clock
from firmware.hal_sim import SimHal, MemFS
from firmware.outbox import Outbox
from firmware.obframe import records
from firmware.pexample import example_config
from tests.logic.util import reading

MP = sys.implementation.name == "micropython"
DAY = 1767225600000  # 2026-01-01T00:00:00Z: window boundaries fall on it


def _app(seed=3):
    cfg = {"device_id": "sp-test", "broker": {"host": "127.0.0.1", "user": "sp-test", "password": "pw-0123456789", "tls": {"ca": "/ca.pem", "server_hostname": "broker"}},
           "ack_key": "3c" * 32}
    cfg.update(example_config())  # 3 channels, 60 s windows, 5 rules, 2 detectors
    hal = SimHal(seed=seed, console=False)  # MemFS flash
    app = App(cfg, hal)
    app._boot()  # identity, outbox, clock, pipeline, uplink: as App.run() does
    return app


def _rounds(app, n):
    """n sampling rounds; under MicroPython each one inside heap_lock. Returns the index of the
    round that allocated (MemoryError), or None."""
    ob = app.outbox
    nch = len(app._chans)
    step = app.sample_step
    if MP:
        import micropython
        lock = micropython.heap_lock
        unlock = micropython.heap_unlock
    for i in range(n):
        if ob.pending() + nch >= ob.batch_records:
            ob.flush()  # the batch would fill in this round: flush it here (allocates)
        if MP:
            lock()
            try:
                step()
            except MemoryError:
                unlock()
                return i
            unlock()
        else:
            step()
    return None


def _check_steady(app, n, flags, lo_t, hi_t):
    p = app.pipeline
    ob = app.outbox
    _rounds(app, 50)  # warm up: rings, rule and detector state
    e0 = p.emitted
    r0 = app.c["readings"]
    s0 = ob.seq
    gc.collect()
    bad = _rounds(app, n)
    assert bad is None, "the sampling step allocated (MemoryError under heap_lock) in round %d" % bad
    assert p.emitted == e0, "a window closed or a rule fired: not the quiet path"
    assert app.c["readings"] - r0 == 3 * n and ob.seq - s0 == 3 * n
    assert app.c["missing"] == 0 and app.c["refused"] == 0
    # what reached the outbox reads back intact: (boot, seq), channel, flags, time
    ob.flush()
    ob.begin_session()
    recs = []
    while True:
        got = records(ob.read_backlog(50))
        if not got:
            break
        recs.extend(got)
    recs = [r for r in recs if r[1] >= s0]
    assert [r[1] for r in recs] == list(range(s0, s0 + 3 * n))
    hi_t = hi_t()
    for i, r in enumerate(recs):
        assert r[0] == app.boot and r[3] == wire.KIND_READING and r[4] == flags
        assert r[5][0] == i % 3
        assert lo_t <= r[2] <= hi_t, (lo_t, r[2], hi_t)
    return recs


def test_sampling_step_allocates_nothing_unsynced():
    app = _app()
    ck = app.clock
    assert not ck.synced
    _check_steady(app, 500, wire.FLAG_UNSYNCED, 0, ck.boot_ms)


def test_sampling_step_allocates_nothing_synced():
    app = _app(seed=5)
    ck = app.clock
    # epoch time right after a window boundary: no window closes in the next 59 s
    ck.set_time(DAY + 1000, "ntp")
    app._sync_pipeline()  # what the housekeeping task does on the first sync
    assert ck.synced and app._psynced
    t0 = ck.now()
    _check_steady(app, 500, 0, t0, ck.now)


def test_fast_reading_frames_equal_the_general_path():
    # reading_at(tb limbs + lo) writes byte for byte the frame reading(t) writes, carries included
    fs1 = MemFS()
    fs2 = MemFS()
    a = Outbox(fs1, 7, batch_records=8).load()
    b = Outbox(fs2, 7, batch_records=8).load()
    cases = [(0, 0), (DAY, 0), (DAY, 123456), (0xFFFF, 1), (0xFFFFFFFF, 0xFFFF), (0xFFFFFFFFFFFF, (1 << 28) - 1),
             ((1 << 62) - 5, 77777), (DAY - 0xFFFF, 0x1FFFF), (0, (1 << 28) - 1)]
    for i, (base, lo) in enumerate(cases):
        tb = [(base >> 48) & 0xFFFF, (base >> 32) & 0xFFFF, (base >> 16) & 0xFFFF, base & 0xFFFF]
        fl = wire.FLAG_UNSYNCED if i % 2 else 0
        v = -2147483648 if i == 3 else 1000 * i - 4000
        assert a.reading_at(i % 4, v, tb, fl, lo) == i
        assert reading(b, i % 4, base + lo, fl, v) == i
    a.flush()
    b.flush()
    assert fs1.files == fs2.files and len(fs1.files) == 1
    b.begin_session()
    got = records(b.read_backlog(100))
    assert [r[2] for r in got] == [base + lo for base, lo in cases]


def test_clock_time_base_matches_stamp_now():
    hal = SimHal(seed=1, console=False)
    ck = Clock(hal, 1)
    for synced in (False, True):
        if synced:
            ck.set_time(DAY + 5, "ntp")
        for k in range(12):
            hal.advance(1 << 26)  # 2**26 ms per step: ms_hi rolls over every 4 steps
            ck.update()
            tb = ck.tb
            base = (tb[0] << 48) | (tb[1] << 32) | (tb[2] << 16) | tb[3]
            t, fl = ck.stamp_now()
            assert (base + ck.ms_lo, ck.tfl) == (t, fl), (k, base + ck.ms_lo, t)
            assert 0 <= ck.ms_lo < (1 << 28)
    assert ck.ms_hi >= 5


def test_sampling_rounds_survive_a_rebase_and_raw_every():
    app = _app(seed=9)
    app._every = 2
    app._n = 0
    t = app.sample_step()
    assert app.c["readings"] == 3
    app.sample_step()
    assert app.c["readings"] == 3  # every 2nd round only
    app.sample_step()
    assert app.c["readings"] == 6
    assert t >= 0
    # a rebase: force t_rel past 2**28 by moving the pipeline's origin back
    app._phi -= 1
    app.sample_step()
    assert app._phi == app.clock.ms_hi and app.sample_step() < 1000
    assert app.c["samples"] == 5
