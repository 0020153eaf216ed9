"""Window results and the late/on-time split do not depend on how a device batched its records
into messages (a resend after a crash may batch differently): each record is judged against the
watermark as it stands after the records before it, as Flink does with per-record emission.
"""
import asyncio
import random

from hypothesis import HealthCheck, given, settings, strategies as st

from gateway.service import Gateway
from shared import wire
from tests.test_gateway_fakes import T0
from tests.test_gateway_pipeline import StubIngest

TOP = wire.Topics()


def _cfg():
    return {"store": {"path": ":memory:"}, "metrics": {"port": 0}, "checkpoint": {"ack_interval_ms": 0},
            "watermark": {"out_of_orderness_ms": 300, "idle_timeout_ms": 10 ** 9},
            "windows": {"size_ms": 1000, "allowed_lateness_ms": 1500,
                        "groups": [{"name": "g0", "devices": ["*"], "channel": 0},
                                   {"name": "g1", "devices": ["other"], "channel": 1}]}}


def outcome(records, cuts, now):
    """Feed records (seq, t, ch, flags, v) of device n1, split at `cuts`, plus a fixed stream of a
    second device; return everything the windows produced (without committing)."""
    async def go():
        gw = Gateway(_cfg())
        gw.ingest = StubIngest()
        gw._loop = asyncio.get_running_loop()
        results, late = [], []
        bounds = [0] + sorted(cuts) + [len(records)]
        other_seq = 0
        for i in range(len(bounds) - 1):
            chunk = records[bounds[i]:bounds[i + 1]]
            if not chunk:
                continue
            gw._handle(TOP.data("n1").encode(), wire.encode_readings("n1", 1, chunk), now)
            # the other device speaks after records 0, 10, 20, ... of n1 (batches are cut there too,
            # so both devices' records interleave the same way whatever the batching)
            while other_seq * 10 < bounds[i + 1]:
                gw._handle(TOP.data("other").encode(), wire.encode_readings(
                    "other", 1, [(other_seq, T0 + other_seq * 400, 1, 0, other_seq)]), now)
                other_seq += 1
        opened = []
        for ws in (gw.dev_windows, gw.group_windows):
            results += ws.export()[2]
            opened += [(k, ch, s, tuple(w)) for k, kk in ws.keys.items() for (ch, s), w in kk.wins.items()]
        late += gw.out.late
        return sorted(results), sorted(late), sorted(opened)
    return asyncio.run(go())


def _records(deltas, chans):
    t = T0
    out = []
    for i, (d, ch) in enumerate(zip(deltas, chans)):
        t += d
        out.append((i, t, ch, 0, 1000 * (i % 17) - 5000))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deltas=st.lists(st.one_of(st.integers(0, 120), st.integers(-2500, 3000)), min_size=5, max_size=120),
       data=st.data())
def test_batching_does_not_change_results(deltas, data):
    chans = data.draw(st.lists(st.integers(0, 2), min_size=len(deltas), max_size=len(deltas)))
    recs = _records(deltas, chans)
    now = T0 + 10 ** 7
    one_by_one = outcome(recs, range(1, len(recs)), now)
    rng = random.Random(data.draw(st.integers(0, 10 ** 6)))
    cuts, i = [], 0
    while i < len(recs):
        i += rng.randint(1, 8)
        cuts.append(i)
    cuts += range(1, len(recs), 10)
    batched = outcome(recs, [c for c in set(cuts) if c < len(recs)], now)
    assert batched == one_by_one


def test_batching_example_from_the_issue():
    """In-order data with a jump back every 40 records: 1 per message vs 1..8 per message."""
    rng = random.Random(7)
    deltas = [(-2200 if i % 40 == 39 else rng.randint(20, 90)) for i in range(800)]
    recs = _records(deltas, [i % 2 for i in range(800)])
    now = T0 + 10 ** 7
    a = outcome(recs, range(1, len(recs)), now)
    cuts, i = [], 0
    while i < len(recs):
        i += rng.randint(1, 8)
        cuts.append(i)
    cuts += range(1, len(recs), 10)
    b = outcome(recs, [c for c in set(cuts) if c < len(recs)], now)
    assert a[1], "the workload must produce late records"
    assert a == b
