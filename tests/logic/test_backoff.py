# Exponential backoff with full jitter and a cap (firmware/backoff.py), both runtimes.
from firmware.backoff import Backoff
from firmware.hal_sim import Rng
from tests.logic.util import raises


def test_ceiling_doubles_to_the_cap():
    b = Backoff(100, 1000, rng=lambda n: n - 1)  # always the ceiling
    assert [b.next() for _ in range(6)] == [100, 200, 400, 800, 1000, 1000]
    b.reset()
    assert b.next() == 100


def test_full_jitter_is_uniform_below_ceiling_and_deterministic():
    r1 = Rng(42)
    r2 = Rng(42)
    a = Backoff(50, 5000, rng=r1.below)
    b = Backoff(50, 5000, rng=r2.below)
    da = [a.next() for _ in range(30)]
    db = [b.next() for _ in range(30)]
    assert da == db
    c = 50
    for i, d in enumerate(da):
        assert 0 <= d <= c, (i, d, c)
        c = min(c * 2, 5000)
    assert len(set(da[8:])) > 5  # spread, not a fixed delay


def test_zero_jitter_and_bad_args():
    b = Backoff(100, 1000, rng=lambda n: 0, min_ms=10)
    assert b.next() == 10
    raises(ValueError, Backoff, 0, 10, lambda n: 0)
    raises(ValueError, Backoff, 100, 10, lambda n: 0)
    raises(ValueError, Backoff, 100, 1000)  # no rng


def test_fleet_spreads_reconnects():
    # 200 devices after the same outage: first retries spread over the whole window
    ds = [Backoff(1000, 60000, rng=Rng(i + 1).below) for i in range(200)]
    for d in ds:
        d.attempt = 4  # fifth attempt: ceiling 16 s
    got = [d.next() for d in ds]
    buckets = [0] * 4
    for g in got:
        assert 0 <= g <= 16000
        buckets[g * 4 // 16001] += 1
    assert min(buckets) > 25, buckets
