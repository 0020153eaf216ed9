"""Pure-Python units of the gateway: dedup, watermarks, windows, admission, config (no broker)."""
import pytest

from gateway import dedup as dd
from gateway.admission import Admission
from gateway.config import Config, ConfigError
from gateway.watermark import Watermarks
from gateway.windows import AMENDED, LATE, OK, WindowSet

# ------------------------------------------------------------------ dedup


def test_dedup_in_order_and_duplicates():
    d = dd.Dedup(window=64)
    assert [d.mark("a", 1, s) for s in range(5)] == [dd.NEW] * 5
    assert d.hwm("a", 1) == 4
    assert d.mark("a", 1, 3) == dd.DUP
    assert d.mark("a", 1, 4) == dd.DUP
    assert d.hwm("a", 2) == -1  # other boots are separate


def test_dedup_bitmap_fills_hole_and_advances():
    d = dd.Dedup(window=64)
    d.mark("a", 1, 0)
    assert d.mark("a", 1, 2) == dd.NEW and d.mark("a", 1, 3) == dd.NEW
    assert d.hwm("a", 1) == 0  # hole at 1
    assert d.mark("a", 1, 3) == dd.DUP  # in the bitmap
    assert d.mark("a", 1, 1) == dd.NEW
    assert d.hwm("a", 1) == 3  # contiguous again, bitmap shifted out


def test_dedup_window_edges():
    d = dd.Dedup(window=64)
    # hwm = -1: seq 63 is the last inside the window, 64 is beyond
    assert d.mark("a", 1, 63) == dd.NEW
    assert d.mark("a", 1, 64) == dd.BEYOND
    assert d.peek("a", 1, 64) == dd.BEYOND
    assert d.hwm("a", 1) == -1
    for s in range(63):
        d.mark("a", 1, s)
    assert d.hwm("a", 1) == 63
    assert d.mark("a", 1, 64) == dd.NEW  # fits now that the window moved
    assert d.hwm("a", 1) == 64
    assert d.mark("a", 1, 64 + 65) == dd.BEYOND  # hwm + 1 + window
    assert d.mark("a", 1, 64 + 64) == dd.NEW


def test_dedup_beyond_leaves_no_trace():
    d = dd.Dedup(window=64)
    d.export()
    assert d.mark("a", 1, 1000) == dd.BEYOND
    ups, dels, mins = d.export()
    assert ups == [] or all(r[2] == -1 and int.from_bytes(r[3], "little") == 0 for r in ups)


def test_dedup_run_fast_path():
    d = dd.Dedup(window=64)
    assert d.mark_run("a", 1, 0, 50) == dd.NEW
    assert d.hwm("a", 1) == 49
    assert d.mark_run("a", 1, 0, 50) == dd.DUP
    assert d.mark_run("a", 1, 40, 20) is None  # half old, half new: one by one
    d.mark("a", 1, 52)
    assert d.mark_run("a", 1, 50, 10) is None  # bitmap not empty


def test_dedup_gap_ranges():
    d = dd.Dedup(window=64)
    for s in range(10):
        d.mark("a", 1, s)
    assert d.mark_range("a", 1, 10, 5) == 5  # contiguous: advances hwm
    assert d.hwm("a", 1) == 14
    assert d.mark_range("a", 1, 10, 5) == 0  # idempotent
    assert d.mark_range("a", 1, 20, 5) == 5  # above a hole: bitmap
    assert d.hwm("a", 1) == 14
    assert d.mark("a", 1, 22) == dd.DUP
    assert d.mark_range("a", 1, 13, 10) == 5  # overlap counts only new ones (15..19)
    assert d.hwm("a", 1) == 24
    assert d.mark_range("a", 1, 200, 3) is None  # beyond the window: nothing changes
    assert d.mark_range("a", 1, 25, 10000) == 10000  # long contiguous range is fine
    assert d.hwm("a", 1) == 10024


def test_dedup_hello_retires_boots_and_sets_floor():
    d = dd.Dedup(window=64)
    d.mark("a", 1, 0)
    d.mark("a", 2, 5)
    skipped = d.hello("a", 2, 10)  # device holds nothing before (2, 10)
    assert d.mark("a", 1, 1) == dd.DUP  # boot 1 retired
    assert d.hwm("a", 1) == 0xFFFFFFFF
    assert d.hwm("a", 2) == 9
    assert skipped == 9  # 0..9 except 5, never received
    assert d.hello("a", 1, 0) == 0  # a stale hello changes nothing
    assert d.mark("a", 1, 7) == dd.DUP


def test_dedup_max_boots_bounded():
    d = dd.Dedup(window=64, max_boots=3)
    for b in range(1, 6):
        d.mark("a", b, 0)
    assert len(d.devs["a"].boots) == 3
    assert d.evicted_boots == 2
    assert d.mark("a", 1, 1) == dd.DUP


def test_dedup_export_restore_roundtrip():
    d = dd.Dedup(window=64)
    for s in (0, 1, 2, 5, 9):
        d.mark("a", 3, s)
    d.hello("b", 4, 7)
    ups, dels, mins = d.export()
    e = dd.Dedup(window=64)
    e.restore(ups, mins)
    for s in range(20):
        assert e.peek("a", 3, s) == d.peek("a", 3, s)
    assert e.hwm("b", 4) == 6 and e.min_boot("b") == 4


# ------------------------------------------------------------------ watermarks


def test_watermark_formula_and_min():
    w = Watermarks(out_of_orderness_ms=100, idle_timeout_ms=1000)
    assert w.observe("a", 10000, now=0) == 10000 - 100 - 1
    assert w.global_wm == 9899
    w.observe("b", 5000, now=0)
    assert w.global_wm == 9899  # monotonic: b joining lower does not pull it back
    w.observe("a", 20000, now=0)
    assert w.global_wm == 9899  # b (4899) holds the minimum below the current value
    w.observe("b", 15000, now=0)
    assert w.global_wm == 14899


def test_watermark_idle_leaves_min_and_rejoin_is_monotonic():
    w = Watermarks(out_of_orderness_ms=0, idle_timeout_ms=1000)
    w.observe("a", 1000, now=0)
    w.observe("b", 500, now=0)
    assert w.global_wm == 999  # first value: a alone; b joined lower, no step back
    w.observe("a", 5000, now=900)
    assert w.global_wm == 999  # b still the minimum (499)
    w.tick(now=999)
    assert w.devs["b"].active  # 999 ms without data: not yet idle
    w.tick(now=1000)
    assert not w.devs["b"].active
    assert w.global_wm == 4999  # b left the minimum
    w.observe("b", 600, now=1200)  # rejoins far behind
    assert w.devs["b"].active and w.global_wm == 4999  # never backwards
    w.observe("b", 9000, now=1300)
    assert w.global_wm == 4999  # a (4999) is the minimum again
    w.observe("a", 9500, now=1300)
    assert w.global_wm == 8999


def test_watermark_offline_state_leaves_min():
    w = Watermarks(out_of_orderness_ms=0, idle_timeout_ms=10 ** 9)
    w.observe("a", 1000, now=0)
    w.observe("b", 2000, now=0)
    w.observe("a", 1500, now=0)
    assert w.global_wm == 1499
    w.set_online("a", False)
    assert w.global_wm == 1999


def test_watermark_restore_keeps_devices_active():
    w = Watermarks(0, 1000)
    w.observe("a", 100, now=0)
    w.observe("b", 200, now=0)
    rows, g = w.export()
    v = Watermarks(0, 1000)
    v.restore(rows, g, now=50)
    assert v.global_wm == g == 99
    v.observe("b", 300, now=60)
    assert v.global_wm == 99  # a still holds it: a restart does not let b race ahead


def test_watermark_matches_a_brute_force_model_and_the_heap_stays_one_entry_per_device():
    # the heap is re-keyed lazily and the idle scan skipped until something can be idle
    # (issue 16: a 10,000-device storm pushed an entry per message, scanned the fleet 20 x a
    # second); the global watermark and the idle transitions must be exactly the plain rule's
    import random
    rnd = random.Random(16)
    for _ in range(12):
        n, timeout, delay = rnd.randint(1, 12), rnd.choice((50, 300, 2000)), rnd.choice((0, 7))
        w = Watermarks(delay - 1, timeout)
        mt, last, active, g = {}, {}, {}, None
        now = 0
        for _ in range(600):
            now += rnd.choice((0, 1, 5, 40, 40, -30))  # the wall clock may step back
            dev = "d%d" % rnd.randrange(n)
            op = rnd.random()
            if op < 0.7:
                t = max(0, mt.get(dev, 1000) + rnd.randint(-50, 200))
                w.observe(dev, t, now)
                mt[dev] = max(mt.get(dev, t), t)
                last[dev], active[dev] = now, True
            elif op < 0.8:
                w.set_online(dev, False)
                active[dev] = False
            else:
                w.tick(now)
                for d in active:
                    if active[d] and now - last[d] >= timeout:
                        active[d] = False
            low = [mt[d] - delay for d in active if active[d]]
            if low and (g is None or min(low) > g):
                g = min(low)
            assert w.global_wm == g
            assert {d for d in active if active[d]} == {d for d, x in w.devs.items() if x.active}
            assert len(w._heap) <= len(w.devs)  # one entry per device, not one per advance


# ------------------------------------------------------------------ windows


def ws(lateness=0, size=1000, offset=0):
    return WindowSet("device", size, offset, lateness)


def test_window_alignment_and_offset():
    w = ws(size=1000, offset=250)
    assert w.start_of(1250) == 1250 and w.start_of(1249) == 250 and w.start_of(2249) == 1250


def test_window_fires_exactly_at_end_minus_one():
    w = ws()
    assert w.add("a", 0, 1000, 5, None) == OK
    assert w.add("a", 0, 1999, 7, None) == OK
    w.advance("a", 1998)
    assert w.results == []
    w.advance("a", 1999)  # watermark == end - 1
    (r,) = w.results
    assert r[:6] == ("device", "a", 0, 1000, 2000, 0)
    assert r[6:10] == (2, 12, 5, 7)  # count, sum, min, max
    assert r[10] == 6.0 and r[11] == 1.0  # mean, population std (fixed point)
    assert "a" not in w.keys  # lateness 0: purged at once


def test_window_late_boundary_follows_flink():
    w = ws(lateness=100)
    w.add("a", 0, 1500, 1, None)
    w.advance("a", 1999)  # fired, kept until 1999 + 100
    assert w.add("a", 0, 1600, 2, 2098) == AMENDED  # 1999 + 100 > 2098: within lateness
    assert w.add("a", 0, 1700, 3, 2099) == LATE  # end - 1 + lateness <= watermark
    revs = [r[5] for r in w.results]
    assert revs == [0, 1]
    assert w.results[1][6:8] == (2, 3)


def test_window_revisions_numbered_per_record():
    w = ws(lateness=1000)
    w.add("a", 0, 100, 10, None)
    w.advance("a", 999)
    for i, t in enumerate((200, 300, 400)):
        assert w.add("a", 0, t, i, 999) == AMENDED
    assert [r[5] for r in w.results] == [0, 1, 2, 3]
    assert w.results[-1][6] == 4
    w.advance("a", 1998)
    assert "a" in w.keys
    w.advance("a", 1999)  # 999 + 1000: purged
    assert "a" not in w.keys and w.purged


def test_window_opened_after_watermark_fires_at_once():
    w = ws(lateness=5000)
    assert w.add("a", 0, 100, 1, 2500) == OK  # window [0,1000) already passed, within lateness
    assert [r[5] for r in w.results] == [0]
    assert w.add("a", 0, 200, 1, 2500) == AMENDED


def test_window_agg_equals_one_by_one():
    vals = [3, -7, 11, 0, 2 ** 31 - 1, -2 ** 31]
    a, b = ws(), ws()
    for v in vals:
        a.add("k", 1, 500, v, None)
    assert b.add_agg("k", 1, 0, len(vals), sum(vals), sum(v * v for v in vals), min(vals), max(vals), None)
    a.advance("k", 999)
    b.advance("k", 999)
    assert a.results == b.results
    assert not ws().add_agg("k", 1, 0, 1, 1, 1, 1, 1, 999)  # due: refuses the fast path


def test_window_export_restore():
    a = ws(lateness=1000)
    a.add("k", 2, 100, 5, None)
    a.add("k", 2, 1100, 6, None)
    a.advance("k", 999)
    ups, dels, res = a.export()
    ups, dels = a.rows(ups, dels)
    b = ws(lateness=1000)
    b.restore([u[1:] for u in ups])
    assert b.add("k", 2, 150, 1, 999) == AMENDED
    assert b.results[-1][5] == 1 and b.results[-1][6] == 2


# ------------------------------------------------------------------ admission


def test_admission_bucket_and_cap():
    a = Admission(rate=1000, burst=100, max_replayers=1, chunk=60, timeout_s=5, now=0)
    assert a.hello("d1", 150, now=0)
    assert not a.hello("d2", 10, now=0)  # cap of 1 replayer: waits
    assert a.grant("d2", now=0) == (0, False)  # held
    assert a.grant("d1", now=0) == (60, True)  # chunk
    assert a.grant("d1", now=0) == (0, True)  # 60 outstanding
    a.backlog_received("d1", 60, now=10)
    assert a.grant("d1", now=10) == (50, True)  # bucket: 100 - 60 + 10 ms * 1 token/ms
    a.backlog_received("d1", 50, now=20)
    c, _ = a.grant("d1", now=100)
    assert c == 40 and "d1" not in a.active  # whole backlog granted: slot freed
    assert a.tick(now=100) == ["d2"]
    assert a.grant("d2", now=100)[1] is True
    assert a.credits_granted >= 150


def test_admission_no_backlog_and_pause():
    a = Admission(rate=1000, burst=100, max_replayers=2, chunk=50, timeout_s=5, now=0)
    assert not a.hello("d", 0, now=0)
    assert a.grant("d", now=0) == (0, True)
    a.hello("e", 10, now=0)
    assert a.grant("e", now=0, paused=True) == (0, True)
    assert a.tick(now=0, paused=True) == []


def test_admission_stalled_replayer_times_out():
    a = Admission(rate=1000, burst=100, max_replayers=1, chunk=10, timeout_s=1, now=0)
    a.hello("d1", 100, now=0)
    a.hello("d2", 100, now=0)
    a.grant("d1", now=0)
    assert a.tick(now=999) == []
    assert a.tick(now=1000) == ["d2"] and a.first_byte_timeouts == 1  # granted, nothing back
    # d1 still holds backlog: it queues again and is granted once d2's slot frees
    assert a.is_waiting("d1")
    a.grant("d2", now=1000)
    a.backlog_received("d2", 10, now=1500)
    a.leave("d2")
    assert a.tick(now=1500) == ["d1"]
    assert a.grant("d1", now=1500)[0] > 0


def test_admission_resent_duplicates_count_as_progress():
    # a storm replayer whose records were resent (first copies already committed) must not
    # be starved: duplicates spend the credits they were sent under (found by bench_storm)
    a = Admission(rate=100.0, burst=100, max_replayers=1, chunk=2000, timeout_s=1.0, now=0)
    a.hello("d", 430, 0)
    assert a.grant("d", 0) == (100, True)
    a.backlog_received("d", 100, 500)  # the 100 arrive again as duplicates
    assert a.tick(2000) == ["d"]  # nothing outstanding: it gets the next grant
    assert a.grant("d", 2000)[0] > 0
    a2 = Admission(100.0, 100, 1, 2000, 1.0, 0)
    a2.hello("d", 430, 0)
    a2.grant("d", 0)
    a2.tick(2000)  # no progress at all: timed out, but not forgotten
    assert a2.tick(2000) == ["d"] and a2.grant("d", 60000)[0] > 0


def test_tick_all_admits_until_the_tokens_run_out_not_one_round_of_slots():
    a = Admission(rate=1.0, burst=1000, max_replayers=2, chunk=2000, timeout_s=30, now=0)
    for i in range(10):
        a.hello("d%d" % i, 100, 0)  # the first 2 take the slots, 8 wait
    sent = []

    def send(dev):
        c, replay = a.grant(dev, 0)
        sent.append((dev, c))

    a.tick_all(0, send)
    assert sent == [("d%d" % i, 100) for i in range(10)]  # 5 rounds of 2 slots, 1000 tokens
    assert a.tokens == 0 and not a.active and a.waiting_count() == 0
    # bounded by the tokens: 250 tokens grant 2 whole backlogs and a part of the third
    b = Admission(rate=1.0, burst=250, max_replayers=2, chunk=2000, timeout_s=30, now=0)
    for i in range(10):
        b.hello("d%d" % i, 100, 0)
    got = []
    b.tick_all(0, lambda dev: got.append(b.grant(dev, 0)[0]))
    assert got == [100, 100, 50, 0] and b.tokens == 0 and b.waiting_count() == 6
    # paused (ingest queue full): nothing is sent, the slots are taken for later
    c = Admission(rate=1.0, burst=1000, max_replayers=2, chunk=2000, timeout_s=30, now=0)
    for i in range(4):
        c.hello("d%d" % i, 100, 0)
    c.tick_all(0, lambda dev: got.append(dev), paused=True)
    assert len(c.active) == 2 and c.waiting_count() == 2 and c.tokens == 1000
    # rounds are bounded even when every round admits (a device with no nonce never takes a grant)
    d = Admission(rate=1.0, burst=10 ** 9, max_replayers=1, chunk=2000, timeout_s=30, now=0)
    for i in range(100):
        d.hello("d%d" % i, 100, 0)
    n = []
    d.tick_all(0, lambda dev: n.append(d.grant(dev, 0)), rounds=16)
    assert len(n) == 16


def _adaptive(outstanding=0, per_s=None, rate=10000.0, rate_min=500.0):
    """An adaptive Admission with `outstanding` credits granted to one device and T = per_s."""
    a = Admission(rate, burst=10 ** 9, max_replayers=4, chunk=10 ** 9, timeout_s=30, now=0, adaptive=True,
                  rate_min=rate_min, target_s=5.0, beta=0.5, increase=0.1)
    if outstanding:
        a.hello("d", outstanding, 0)
        assert a.grant("d", 0) == (outstanding, True)
    if per_s is not None:
        a.committed(0, 0)  # the first commit only starts the clock
        a.committed(per_s, 1000)
        assert a.throughput == per_s
    return a


def test_adaptive_no_measurement_keeps_the_starting_rate():
    a = _adaptive(outstanding=10 ** 6)  # huge outstanding, but no T yet
    for t in (1000, 2000, 3000):
        assert a.adapt(t, queue_full=True) == 10000.0
    assert a.decreases == 0
    a.committed(5000, 3500)  # a single commit starts the clock, still no T
    assert a.throughput is None and a.adapt(4500, queue_full=True) == 10000.0
    # not adaptive: tick() never touches the rate
    b = Admission(10000.0, 100, 1, 10, 30, 0)
    b.committed(0, 0)
    b.committed(10, 1000)
    b.hello("d", 10, 0)
    b.grant("d", 0)
    b.tick(5000, paused=True)
    b.tick(9000, paused=True)
    assert b.rate * 1000 == 10000.0


def test_adaptive_wait_exactly_at_target_holds():
    a = _adaptive(outstanding=5000, per_s=1000)  # D = 5000 / 1000 per s = 5 s = target
    assert a.adapt(1000) == 10000.0 and a.adapt(2000) == 10000.0 and a.adapt(3000) == 10000.0
    assert a.delay_ms == 5000.0 and a.decreases == 0
    a.backlog_received("d", 2500, 3000)  # D = 2.5 s = target / 2: still holds (increase needs < half)
    assert a.outstanding == 2500 and a.adapt(4000) == 10000.0
    a.backlog_received("d", 1, 4000)  # just under half the target: additive increase, 0.1 x 10000 per s
    a.rate = 5000 / 1000.0
    assert a.adapt(5000) == 6000.0


def test_adaptive_wait_over_target_backs_off_at_most_to_half_the_rate():
    # the rule (docs/gateway.md "Adaptive replay rate"): rate = max(rate / 2, beta x min(rate, T))
    a = _adaptive(outstanding=5001, per_s=1000)  # D just over 5 s, T tiny against the rate
    assert a.adapt(1000) == 10000.0  # first congested step: T may still lag a step up in load
    assert a.adapt(2000) == 5000.0  # second: 0.5 x T = 500 would be a 20x cut; one cut at most halves
    assert a.decreases == 1
    a2 = _adaptive(outstanding=50000, per_s=8000)  # D = 6.25 s
    a2.adapt(1000)
    assert a2.adapt(2000) == 5000.0  # max(10000 / 2, 0.5 x 8000 = 4000)
    assert a2.adapt(3000) == 5000.0 and a2.decreases == 1  # at most one decrease per target (5 s)
    assert a2.adapt(7000) == 2500.0 and a2.decreases == 2  # max(2500, 0.5 x min(5000, 8000) = 2500)
    # the bucket refills at the new rate
    t0 = a2.tokens
    a2._refill(8000)
    assert a2.tokens - t0 == 2500.0
    # beta x T above half the rate: the measured throughput decides (drains the queue in one step)
    for per_s, want in ((18000, 0.8 * 18000), (12500, 10000.0), (12000, 10000.0)):  # 12500: exactly half
        a3 = Admission(20000.0, burst=10 ** 9, max_replayers=4, chunk=10 ** 9, timeout_s=30, now=0, adaptive=True,
                       rate_min=500.0, target_s=5.0, beta=0.8, increase=0.1)
        a3.hello("d", per_s * 5 + 1, 0)  # D just over the target
        a3.grant("d", 0)
        a3.committed(0, 0)
        a3.committed(per_s, 1000)
        a3.adapt(1000)
        assert a3.adapt(2000) == want


def test_adaptive_climbs_multiplicatively_far_under_the_target():
    # D < target / 4: rate = max(rate + increase x rate_max x dt, min(rate x growth ^ dt, growth x T)), growth 2
    a = _adaptive(outstanding=0, per_s=50000, rate=1000000.0, rate_min=500.0)
    a.rate = 10000 / 1000.0
    assert a.adapt(1000) == 110000.0  # +0.1 x 1000000 beats x2
    a.rate = 30000 / 1000.0
    a.increase = 0.001
    assert a.adapt(2000) == 60000.0  # x2 beats +1000
    assert a.adapt(3000) == 100000.0  # x2 = 120000, capped at growth x T = 100000
    assert a.adapt(4000) == 101000.0  # at the cap: the additive step only
    # dt is capped at 2 s: a late step cannot multiply by more than growth ^ 2
    b = _adaptive(outstanding=0, per_s=3000, rate=100000.0)  # growth x T = 6000 and the floor T stay out of the way
    b.rate = 1000 / 1000.0
    b.adapt(1000)
    b.rate = 1000 / 1000.0
    assert b.adapt(11000) == max(1000 * 4.0, 1000 + 0.1 * 100000 * 2)  # additive is larger here: 21000
    b.increase = 0.0
    b.rate = 1000 / 1000.0
    assert b.adapt(21000) == 4000.0  # x 2 ^ 2
    # boundary: D exactly target / 4 is additive only, just under it multiplicative
    d = _adaptive(outstanding=1250, per_s=1000, rate=100000.0)  # D = 1.25 s = 5 s / 4
    d.rate = 1000 / 1000.0
    assert d.adapt(1000) == 11000.0
    d.backlog_received("d", 1, 1000)  # D = 1.249 s; growth x T = 2000 caps the x2 (22000)
    assert d.adapt(2000) == 21000.0  # so the additive step wins
    e = _adaptive(outstanding=1249, per_s=1000, rate=100000.0)
    e.increase = 0.0
    e.rate = 600 / 1000.0
    assert e.adapt(1000) == 1200.0  # x2 under the cap of 2000
    assert e.adapt(2000) == 2000.0  # capped


def _storm_admission(outstanding, per_s):
    """The gateway's defaults (200k/s ceiling, target 5 s), one device holding `outstanding`
    credits, T = per_s."""
    a = Admission(200000.0, burst=10 ** 9, max_replayers=4, chunk=10 ** 9, timeout_s=30, now=0, adaptive=True,
                  rate_min=2000.0, target_s=5.0, beta=0.8, increase=0.05)
    a.hello("d", outstanding, 0)
    a.grant("d", 0)
    a.committed(0, 0)
    a.committed(per_s, 1000)
    return a


def test_adaptive_burst_cut_is_undone_in_seconds():
    # the bench_storm case: T measured during the connect/hello burst is a fifth of the rate;
    # the rate halves once, and climbs back to the ceiling within 2 steps once the wait is small
    a = _storm_admission(500000, 36000)  # T = 36k/s, O = 500k: D = 13.9 s
    a.adapt(1000)
    assert a.adapt(2000) == 100000.0 and a.decreases == 1  # not 0.8 x 36000 = 28800
    a.backlog_received("d", 500000, 2500)  # the broker queue drained
    a.committed(300000, 3000)  # 150k/s since the last commit: T = 150k
    assert a.delay_ms == 13888.888888888889 and a.adapt(3000) == 200000.0  # x2 in one step (cap 2 x T = 300k)
    assert a.delay_ms == 0.0


def test_adaptive_queue_full_holds_the_rate():
    # a full ingest queue already pauses grants (pause_queue_fraction); the rate holds, it
    # does not grow (backing off on it too cost 15% of the drain rate in bench_storm)
    a = _adaptive(outstanding=30000, per_s=20000, rate=100000.0)  # D = 1.5 s, over a quarter of the target
    a.rate = 5000 / 1000.0
    for t in (1000, 2000, 3000):
        assert a.adapt(t, queue_full=True) == 5000.0
    assert a.decreases == 0 and a.tick(3500, paused=True) == []
    a.backlog_received("d", 30000, 3500)
    assert a.adapt(4000, queue_full=False) == 20000.0  # queue drained, D = 0: x2 = 10000, and at least T
    b = _adaptive(outstanding=50000, per_s=8000)  # D over target and queue full: backs off
    b.adapt(1000, queue_full=True)
    assert b.adapt(2000, queue_full=True) == 5000.0


def test_adaptive_rate_floor_and_ceiling():
    a = _adaptive(outstanding=10 ** 6, per_s=10, rate_min=500.0)  # tiny T, huge wait
    a.adapt(1000)
    assert a.adapt(2000) == 5000.0  # halves
    rates = [a.adapt(t) for t in range(7000, 29000, 5000)]  # one cut per target (5 s)
    assert rates == [2500.0, 1250.0, 625.0, 500.0, 500.0]  # never below replay_rate_min
    assert a.rate * 1000 == 500.0 and a.decreases == 6
    b = _adaptive(outstanding=0, per_s=10 ** 6)  # D = 0: increase, but never above replay_rate
    for t in range(1000, 30000, 1000):
        r = b.adapt(t)
    assert r == 10000.0 and b.rate * 1000 == 10000.0
    assert b.adapt(29500) == 10000.0  # at most one step per second


def test_adaptive_outstanding_credits_are_tracked():
    a = Admission(1000.0, 1000, 4, 300, 5, 0, adaptive=True)
    a.hello("a", 500, 0)
    a.hello("b", 100, 0)
    assert a.grant("a", 0)[0] == 300 and a.grant("b", 0)[0] == 100
    assert a.outstanding == 400
    a.backlog_received("b", 100, 10)  # "b" was fully granted and left its slot: still counted
    assert a.outstanding == 300 and "b" not in a.active
    a.backlog_received("a", 1000, 20)  # more than outstanding (resends): clamps at 0
    assert a.outstanding == 0
    a.grant("a", 30)
    assert a.outstanding > 0
    a.hello("a", 200, 40)  # a rewind voids what the device held
    assert a.outstanding == 0
    a.grant("a", 40)
    a.leave("a")
    assert a.outstanding == 0
    a.hello("c", 50, 100)
    a.grant("c", 100)
    a.adapt(5100)  # silent since its grant for replay_timeout_s: no longer counted
    assert a.outstanding == 0


# ------------------------------------------------------------------ config


def test_config_defaults_run_against_local_broker():
    c = Config()
    assert (c.mqtt.host, c.mqtt.port, c.store.synchronous) == ("127.0.0.1", 1883, "FULL")


@pytest.mark.parametrize("data, msg", [
    ({"mqtt": {"prot": 1}}, "unknown key mqtt.prot"),
    ({"mqtt": {"port": 0}}, "mqtt.port must be within"),
    ({"mqtt": {"port": "x"}}, "mqtt.port must be int"),
    ({"windows": {"groups": [{"name": "g", "channel": 1, "devices": "all"}]}}, "devices must be"),
    ({"windows": {"groups": [{"name": "g g", "channel": 1}]}}, ".name must be"),
    ({"store": {"synchronous": "OFF"}}, "store.synchronous"),
    ({"mqtt": {"prefix": "a b"}}, "mqtt.prefix"),
    ({"bogus": {}}, "unknown section"),
])
def test_config_errors_are_clear(data, msg):
    with pytest.raises(ConfigError, match=msg):
        Config(data)


def test_config_file_and_overrides(tmp_path):
    p = tmp_path / "gw.toml"
    p.write_text('[mqtt]\nport = 1999\n[[windows.groups]]\nname = "hall"\ndevices = ["n1", "n2"]\nchannel = 3\n')
    c = Config.load(str(p), {"store.path": "/tmp/x.db"})
    assert c.mqtt.port == 1999 and c.store.path == "/tmp/x.db"
    (g,) = c.windows.groups
    assert g.matches("n1") and not g.matches("n3") and g.channel == 3
    with pytest.raises(ConfigError, match="not found"):
        Config.load(str(tmp_path / "missing.toml"))
    (tmp_path / "bad.toml").write_text("[mqtt\n")
    with pytest.raises(ConfigError):
        Config.load(str(tmp_path / "bad.toml"))


def _fake_hello_attack(first_byte_s=3.0, fakes=300, seconds=45):
    """300 hellos announce backlog and never send; then a real device hellos, sends live data
    at once and its backlog whenever it holds credits. Returns (ms until its first credit,
    backlog records it replayed within `seconds`) on a simulated clock, ticks every 50 ms."""
    a = Admission(rate=20000, burst=20000, max_replayers=32, chunk=500, timeout_s=30, now=0,
                  first_byte_s=first_byte_s)
    for i in range(fakes):
        a.hello("fake%03d" % i, 10000, now=i)
        a.grant("fake%03d" % i, now=i)
    a.hello("real", 2000, now=400)
    a.heard("real")  # its live records arrive right after its hello
    first, got, credits = None, 0, 0
    for now in range(400, seconds * 1000, 50):
        for dev in a.tick(now):
            c, _ = a.grant(dev, now)
            if dev == "real":
                credits += c
        if "real" in a.active:
            c, _ = a.grant("real", now)
            credits += c
        if credits:
            first = now if first is None else first
            a.backlog_received("real", credits, now + 20)
            got += credits
            credits = 0
        # the fakes keep saying hello, as an attacker would
        if now % 1000 == 0:
            for i in range(fakes):
                a.hello("fake%03d" % i, 10000, now)
    return first, got


def test_fake_hellos_do_not_starve_real_replay():
    # issue 10.5: on v1 the real device got nothing in 45 s (fakes held all 32 slots)
    first, got = _fake_hello_attack()
    assert first is not None and first - 400 <= 3500, first  # within one first-byte timeout
    assert got == 2000  # its whole backlog


def test_adaptive_never_grants_under_T_with_little_outstanding():
    # bench_storm (issue 16): cuts took the rate to 54k/s; T came back to ~119k/s, the queue was
    # full and only 0.75 s of granted backlog was left. The old rule held 54k/s (full queue), so
    # the outstanding drained and the gateway sat with an empty queue until the x2 climb caught
    # up. Under target / 4 the rate is at least T, full queue or not.
    a = _storm_admission(89136, 118930)
    a.rate = 54447 / 1000.0
    assert a.adapt(1000, queue_full=True) == 118930.0  # D = 0.75 s < 1.25 s: at least T, no climb
    assert a.adapt(2000, queue_full=True) == 118930.0  # and no further while the queue is full
    assert a.adapt(3000) == 200000.0  # queue not full: the climb as before (x2, capped at 2 x T, ceiling)
    # between a quarter and the target nothing changes: the rate may stay under T there, O drains
    b = _storm_admission(300000, 100000)  # D = 3 s
    b.rate = 54447 / 1000.0
    assert b.adapt(1000, queue_full=True) == 54447.0


def test_switch_interval_held_while_any_gateway_of_the_process_runs(monkeypatch):
    """Scale-out runs several gateways (partitions) in one process: one stopping (a rebalance)
    must not put the others back on CPython's 5 ms GIL switch interval, nor on its GC
    thresholds; the last to stop restores both."""
    import asyncio
    import gc
    import sys

    from gateway import service

    gates = {}

    async def fake_run(self):
        await gates[self].wait()

    monkeypatch.setattr(service.Gateway, "_run", fake_run)
    before = sys.getswitchinterval()
    gc_before = gc.get_threshold()

    async def main():
        a, b = service.Gateway.__new__(service.Gateway), service.Gateway.__new__(service.Gateway)  # its C base: not object.__new__
        gates[a], gates[b] = asyncio.Event(), asyncio.Event()
        ta, tb = asyncio.create_task(a.run()), asyncio.create_task(b.run())
        await asyncio.sleep(0)
        assert sys.getswitchinterval() == service.SWITCH_INTERVAL_S
        assert gc.get_threshold() == service.GC_THRESHOLD != gc_before
        service._gc_snapshot()  # a checkpoint's
        gates[a].set()
        await ta
        assert sys.getswitchinterval() == service.SWITCH_INTERVAL_S  # b still runs
        assert gc.get_threshold() == service.GC_THRESHOLD
        assert gc.get_freeze_count() > 0  # b's snapshots stay out of the young collections
        gates[b].set()
        await tb
        assert sys.getswitchinterval() == before
        assert gc.get_threshold() == gc_before
        assert gc.get_freeze_count() == 0  # the collector sees everything again

    try:
        asyncio.run(main())
    finally:
        sys.setswitchinterval(before)
        gc.set_threshold(*gc_before)
        gc.unfreeze()


def test_a_checkpoint_freezes_the_heap_and_the_sweep_collects_cycles_that_died_frozen(tmp_path):
    """service._gc_snapshot: young collections must not walk the rows of the commits in flight
    (a storm's three raw-reading lists of ~700,000 values); what that hides from the collector,
    a reference cycle that became garbage while frozen, the sweep collects."""
    import asyncio
    import gc
    import weakref

    from gateway import service
    from gateway.service import Gateway
    from tools import bench_compare as bc
    from tools import bench_gateway as bg

    class Node:
        pass

    msgs, n, _rows = bc.workload(3, 1, 100, per_msg=10, dup_frac=0)
    cfg = bg.gateway_cfg(1883, str(tmp_path / "gw.db"), "FULL")
    cfg["web"] = {"port": 0}
    gc.unfreeze()
    refs = []

    async def go():
        gw = Gateway(cfg, ingest_factory=lambda c, s: bc.MemIngest(msgs, c, s))
        task = asyncio.ensure_future(gw.run())
        node = Node()
        node.me = node  # a cycle: only the collector can free it
        refs.append(weakref.ref(node))
        for _ in range(1000):  # at most 10 s
            await asyncio.sleep(0.01)
            if task.done():
                task.result()
            if gw.stats.readings >= n and gw._snapshots:
                break
        assert gw._snapshots and gc.get_freeze_count() > 0  # the checkpoints froze the heap
        del node
        gc.collect()
        assert refs[0]() is not None  # frozen: not collected yet
        last = service._running.swept
        assert not service._gc_sweep(last + service.GC_SWEEP_S - 0.5)  # not due
        # due, but a busy gateway (messages in the last tick) puts it off, up to GC_SWEEP_BUSY_S
        assert not service._gc_sweep(last + service.GC_SWEEP_S, busy=True)
        assert not service._gc_sweep(last + service.GC_SWEEP_BUSY_S - 0.5, busy=True)
        assert refs[0]() is not None
        assert service._gc_sweep(last + service.GC_SWEEP_BUSY_S, busy=True)
        assert refs[0]() is None  # the sweep collected it
        assert not service._gc_sweep(last + service.GC_SWEEP_BUSY_S + 1)  # swept just now
        assert service._gc_sweep(last + service.GC_SWEEP_BUSY_S + service.GC_SWEEP_S)  # idle: when due
        gw.stop()
        await task
        assert gw.stats.readings == n

    try:
        asyncio.run(go())
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_the_timer_puts_the_gc_sweep_off_while_messages_flow_and_sweeps_when_idle(tmp_path, monkeypatch):
    """The full-heap sweep (0.4-0.5 s with 10,000 devices) must not stall a storm's drain: the timer
    calls it busy while messages arrive or wait, idle once a tick saw none and nothing is pending."""
    import asyncio
    from gateway import service
    from gateway.service import Gateway
    from tools import bench_compare as bc, bench_gateway as bg

    calls = []  # (busy, messages processed by then, messages queued or awaiting their commit)
    real = service._gc_sweep

    msgs, n, _rows = bc.workload(20, 1, 2000, per_msg=10, dup_frac=0)
    cfg = bg.gateway_cfg(1883, str(tmp_path / "gw.db"), "FULL")
    cfg["web"] = {"port": 0}

    async def go():
        gw = Gateway(cfg, ingest_factory=lambda c, s: bc.MemIngest(msgs, c, s))

        def spy(mono, busy=False):
            calls.append((busy, gw.stats.messages, gw.queue_depth() + len(gw.out.mids)))
            return real(-1e9, True)  # never due: nothing is swept here

        monkeypatch.setattr(service, "_gc_sweep", spy)
        task = asyncio.ensure_future(gw.run())
        for _ in range(2000):  # at most 20 s
            await asyncio.sleep(0.01)
            if task.done():
                task.result()
            if gw.stats.readings >= n and sum(1 for c in calls if c[1] == len(msgs)) >= 3:
                break
        gw.stop()
        await task
        assert gw.stats.readings == n

    asyncio.run(go())
    assert calls and calls[0][0]  # the first tick has seen messages
    for i, (busy, seen, pending) in enumerate(calls):
        if pending or (i and seen != calls[i - 1][1]):
            assert busy, calls[i]  # messages waiting or processed since the tick before
    assert calls[-1] == (False, len(msgs), 0)  # all processed, nothing pending: idle
