# Device tumbling windows: epoch alignment, [start, end) boundaries, late samples, exact stats.
from firmware.window import Agg, EventWindow, isqrt
from firmware.cwindow import CountWindow


class Sink:
    def __init__(self):
        self.out = []

    def on_window(self, w):
        a = w.agg
        self.out.append((w.start, w.end) + a.result() + (a.t0 - w.start, a.t1 - w.start))

    def on_count_window(self, w):
        self.out.append(("count",) + w.agg.result() + (w.agg.t0, w.agg.t1))


def _pstd_fixed(vs):
    # reference: population std in fixed point, rounded half up, computed exactly
    n = len(vs)
    s = sum(vs)
    v2 = n * sum(v * v for v in vs) - s * s
    return (isqrt(4 * v2) + n) // (2 * n)


def test_isqrt():
    for n in (0, 1, 2, 3, 4, 15, 16, 17, 99, 100, 10 ** 12, 10 ** 30 + 7):
        r = isqrt(n)
        assert r * r <= n < (r + 1) * (r + 1)


def test_agg_single_sample_and_empty():
    a = Agg()
    assert a.result() == (0, 0, 0, 0, 0)
    a.add(21500, 10)
    assert a.result() == (1, 21500, 21500, 21500, 0)
    assert a.t0 == 10 and a.t1 == 10


def test_agg_exact_mean_std():
    vs = [21000, 21500, 20990, 22001, 21337, 20000, 23999]
    a = Agg()
    for i, v in enumerate(vs):
        a.add(v, i)
    n, mn, mx, mean, std = a.result()
    assert (n, mn, mx) == (7, 20000, 23999)
    assert mean == (2 * sum(vs) + 7) // 14
    assert std == _pstd_fixed(vs)
    assert std == 1151  # statistics.pstdev gives 1150.61


def test_agg_large_deltas_use_limbs_exactly():
    # deltas far beyond the fast path (|d| >= 23170) and near the documented 2**28 bound
    vs = [0, 268435455, -268435455, 100000000, -5, 123456789, 30000, -30000]
    a = Agg()
    for i, v in enumerate(vs):
        a.add(v, i)
    n, mn, mx, mean, std = a.result()
    assert mean == (2 * sum(vs) + n) // (2 * n)
    assert std == _pstd_fixed(vs)
    s, q = a.sums()
    assert s == sum(v - vs[0] for v in vs)
    assert q == sum((v - vs[0]) ** 2 for v in vs)


def test_agg_many_samples_carry():
    a = Agg()
    vs = []
    for i in range(3000):
        v = 50000 + (i * 7919) % 40000  # deltas up to 40 units: both limb paths, many carries
        vs.append(v)
        a.add(v, i)
    s, q = a.sums()
    assert q == sum((v - vs[0]) ** 2 for v in vs)
    assert a.result()[4] == _pstd_fixed(vs)


def test_window_boundaries_start_inclusive_end_exclusive():
    k = Sink()
    w = EventWindow(0, 1000, 0, k)
    w.set_phase(0)
    assert w.add(5, 0) == 0  # exactly at start
    assert w.add(6, 999) == 0
    assert k.out == []
    assert w.add(7, 1000) == 0  # exactly at end: next window, closes [0, 1000)
    assert k.out == [(0, 1000, 2, 5, 6, 6, 1, 0, 999)]  # mean 5.5 rounds half up to 6
    assert w.start == 1000 and w.end == 2000


def test_window_aligned_to_epoch_with_base_and_offset():
    k = Sink()
    base = 1767225600000 + 12345  # base not aligned to the window
    w = EventWindow(1, 60000, 5000, k)
    w.set_phase(base)
    w.add(1, 0)
    # absolute window start = floor((base - 5000) / 60000) * 60000 + 5000
    start_abs = (base - 5000) // 60000 * 60000 + 5000
    assert base + w.start == start_abs
    assert w.end - w.start == 60000
    assert w.start <= 0 < w.end


def test_empty_windows_emit_nothing_and_gap_skips():
    k = Sink()
    w = EventWindow(0, 100, 0, k)
    w.add(1, 50)
    w.add(2, 1050)  # windows 100..1000 were empty: nothing for them
    assert len(k.out) == 1 and k.out[0][0] == 0
    assert w.start == 1000
    w.tick(1099)
    assert len(k.out) == 1
    w.tick(1100)  # tick at exactly end closes
    assert len(k.out) == 2 and k.out[1][2] == 1
    w.tick(5000)
    w.close()
    assert len(k.out) == 2


def test_late_sample_counted_not_added():
    k = Sink()
    w = EventWindow(0, 100, 0, k)
    w.add(1, 150)
    assert w.add(2, 99) == 1  # before the open window
    assert w.late == 1
    w.tick(200)
    assert w.add(3, 199) == 1  # belongs to the closed window
    assert w.late == 2
    assert k.out[0][2] == 1
    assert w.add(4, 200) == 0


def test_grace_delays_tick_close():
    k = Sink()
    w = EventWindow(0, 100, 0, k, grace_ms=20)
    w.add(1, 10)
    w.tick(110)
    assert k.out == []
    assert w.add(2, 105) == 0  # t >= end: a sample closes regardless of grace
    assert len(k.out) == 1


def test_count_window():
    k = Sink()
    c = CountWindow(2, 3, k)
    for i in range(7):
        c.add(100 * i, 10 * i)
    assert len(k.out) == 2
    assert k.out[0] == ("count", 3, 0, 200, 100, 82, 0, 20)
    c.close()  # partial window on flush
    assert k.out[2][1] == 1
    c.close()
    assert len(k.out) == 3


def test_shift_keeps_window_alignment():
    k = Sink()
    w = EventWindow(0, 1000, 0, k)
    w.set_phase(0)
    w.add(1, 2500)
    w.shift(2000)  # rebase by +2000 ms
    w.set_phase(2000)
    assert (w.start, w.end) == (0, 1000)
    w.add(2, 999)
    w.add(3, 1000)
    assert k.out[0][:3] == (0, 1000, 2)
