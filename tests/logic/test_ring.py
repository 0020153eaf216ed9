# Circular buffers: overwrite-oldest with a counter, latest-N, statistics, wrap-around.
from firmware.ring import Ring, TimedRing
from tests.logic.util import raises


def test_push_until_full_then_overwrite_oldest():
    r = Ring(3)
    for v in (1, 2, 3):
        r.push(v)
    assert len(r) == 3 and r.overwritten == 0
    r.push(4)
    r.push(5)
    assert len(r) == 3 and r.overwritten == 2
    assert [r.at(i) for i in range(3)] == [3, 4, 5]
    assert r.latest(0) == 5 and r.latest(2) == 3
    assert list(r) == [3, 4, 5]


def test_index_errors_and_empty_stats():
    r = Ring(2)
    raises(IndexError, r.at, 0)
    raises(IndexError, r.latest, 0)
    raises(ValueError, r.min)
    raises(ValueError, r.mean)
    raises(ValueError, Ring, 0)
    r.push(7)
    raises(IndexError, r.at, 1)
    raises(IndexError, r.latest, -1)


def test_copy_latest_across_wrap():
    import array
    r = Ring(4)
    for v in range(10):  # wraps twice
        r.push(v)
    out = array.array("i", [0] * 3)
    assert r.copy_latest(out, 3) == 3
    assert list(out) == [7, 8, 9]
    big = array.array("i", [0] * 8)
    assert r.copy_latest(big, 8) == 4
    assert list(big[:4]) == [6, 7, 8, 9]


def test_statistics_over_wrapped_ring():
    r = Ring(5)
    for v in (100, -50, 30, 7, 8, 9, -200, 40):
        r.push(v)
    # holds 7, 8, 9, -200, 40
    assert r.min() == -200 and r.max() == 40
    assert r.sum() == -136
    assert r.mean() == -27  # -27.2 rounded half up
    r.clear()
    assert len(r) == 0 and r.overwritten == 3


def test_typed_slots():
    assert Ring(4).bytes_per_slot() == 4
    assert Ring(4, "h").bytes_per_slot() == 2
    assert TimedRing(4).bytes_per_slot() == 8


def test_timed_ring_pairs_and_shift():
    r = TimedRing(3)
    for i in range(5):
        r.push(i * 100, i * 10)
    assert r.overwritten == 2
    assert [r.t_at(i) for i in range(3)] == [200, 300, 400]
    assert r.latest_v(0) == 40 and r.latest_t(2) == 200
    assert r.count_since(300) == 2
    assert r.count_since(0) == 3
    r.shift(250)
    assert [r.t_at(i) for i in range(3)] == [-50, 50, 150]
    assert list(r) == [(-50, 20), (50, 30), (150, 40)]
