# The edge pipeline end to end: records of the wire contract, time bases, and the
# per-sample path's zero allocation and memory budget under the real MicroPython.
import sys
import gc
import array
from shared import wire
from firmware.pipeline import Pipeline, ConfigError
from firmware.pexample import example_config
from tests.logic.util import raises

MP = sys.implementation.name == "micropython"
T0 = 1767225600000  # 2026-01-01T00:00:00Z, a day boundary
BUDGET = 32 * 1024


class Out:
    def __init__(self):
        self.recs = []

    def __call__(self, kind, t, flags, body):
        self.recs.append((kind, t, flags, body))

    def kinds(self, kind):
        return [r for r in self.recs if r[0] == kind]


def _rand(n, amp, seed):
    # ZX81 LCG: deterministic, small ints on both runtimes
    out = []
    x = seed
    for _ in range(n):
        x = (x * 75 + 74) % 65537
        out.append(x % (2 * amp + 1) - amp)
    return out


def _quiet_inputs(n, nch):
    """n samples round-robin over nch channels, 25 ms apart, that trigger no rule, anomaly or close."""
    chs = array.array("i", [0] * n)
    vals = array.array("i", [0] * n)
    ts = array.array("i", [0] * n)
    noise = _rand(n, 1000, 7)
    for i in range(n):
        ch = i % nch
        chs[i] = ch
        ts[i] = i * 25
        if ch == 0:
            vals[i] = 21000 + noise[i]  # temp ~21: sometimes > 22 (a pending sequence A)
        elif ch == 1:
            vals[i] = 50000 + noise[i] // 100  # hum ~50 +- 1
        elif ch == 2:
            vals[i] = 95000 if (i // nch) % 50 == 0 else 50000 + noise[i]  # sparse pot matches
        else:
            vals[i] = 101325000 + noise[i] * 10
    return chs, vals, ts


def _cfg4():
    c = example_config()
    c["channels"] = {"temp": 0, "hum": 1, "pot": 2, "press": 3}
    c["count_window"] = 1000
    return c


def test_zero_allocation_per_sample():
    n = 2000
    chs, vals, ts = _quiet_inputs(n, 4)
    out = Out()
    p = Pipeline(_cfg4(), out)
    p.set_base(T0, True)
    assert len(p.rules) == 5 and len(p.detectors) == 2
    gc.collect()
    if MP:
        import micropython
        err = None
        micropython.heap_lock()
        try:
            for i in range(n):
                p.sample(chs[i], vals[i], ts[i])
                if i & 3 == 3:
                    p.tick(ts[i])
        except MemoryError as e:
            err = e
        micropython.heap_unlock()
        assert err is None, "the per-sample path allocated (MemoryError under heap_lock) at sample %d" % i
        # and measured on a fresh pipeline: gc off, mem_alloc unchanged over the samples
        p2 = Pipeline(_cfg4(), out)
        p2.set_base(T0, True)
        gc.collect()
        gc.disable()
        a = gc.mem_alloc()
        for i in range(n):
            p2.sample(chs[i], vals[i], ts[i])
        b = gc.mem_alloc()
        gc.enable()
        assert b - a == 0, b - a
    else:
        for i in range(n):
            p.sample(chs[i], vals[i], ts[i])
            if i & 3 == 3:
                p.tick(ts[i])
    assert out.recs == [] and p.emitted == 0
    assert p.late == 0
    assert p.rings[0].overwritten > 0  # the rings wrapped during the loop
    assert p.rules[2].hist.overwritten > 0  # so did the count rule's history


def test_memory_budget_default_config():
    gc.collect()
    if MP:
        a = gc.mem_alloc()
    p = Pipeline(example_config(), Out())
    gc.collect()
    if MP:
        used = gc.mem_alloc() - a
        assert used <= BUDGET, used
    assert p is not None


def test_emits_every_record_kind_encodable():
    out = Out()
    p = Pipeline(example_config(), out)
    p.set_base(T0, True)
    t = 0
    for i in range(120):  # 2 min of temp/hum at 1 Hz, temp rising past 30
        p.sample(0, 25000 + i * 100, t)
        p.sample(1, 50000, t)
        p.tick(t)
        t += 1000
    p.sample(1, 15000, t)  # hum drops: hot_then_dry and hum_jump
    for i in range(5):
        p.sample(2, 95000, t + i * 100)  # pot burst
    p.tick(t + 40000)  # temp silent for 40 s: temp_dead
    p.flush(t + 40000)
    ids = [r[3][0] for r in out.kinds(wire.KIND_CEP)]
    for rid in ("hot", "hot_then_dry", "pot_burst", "temp_dead", "hum_jump"):
        assert rid in ids, (rid, ids)
    assert out.kinds(wire.KIND_ANOMALY)
    ws = out.kinds(wire.KIND_WINDOW)
    w0 = [w for w in ws if w[3][0] == 0]
    assert w0[0][1] == T0 and w0[0][3][1] == 60000 and w0[0][3][2] == 60
    assert w0[0][3][3] == 25000 and w0[0][3][4] == 30900 and w0[0][3][7] == 0 and w0[0][3][8] == 59000
    assert w0[0][3][5] == 27950  # mean of 25.0 .. 30.9
    for r in out.recs:
        assert r[2] == 0  # synced
    recs = [(k, i, tt, f, b) for i, (k, tt, f, b) in enumerate(out.recs)]
    got = wire.decode_data(wire.encode_records("node-1", 1, recs))[3]
    assert got == [(k, s, tt, f, tuple(b)) for k, s, tt, f, b in recs]


def test_unsynced_boot_clock_then_sync():
    out = Out()
    p = Pipeline({"channels": {"temp": 0}, "window": {"size_ms": 1000}}, out)
    p.set_base(5300, False)  # t_rel 0 is boot ms 5300; no epoch yet
    p.sample(0, 1000, 0)  # boot ms 5300: window [5000, 6000) of the boot clock
    p.sample(0, 2000, 500)
    assert out.recs == []
    # the clock becomes known: boot ms 5300 was epoch T0 + 5300; t_rel keeps its origin
    p.set_base(T0 + 5300, True)
    assert len(out.recs) == 1
    k, t, flags, body = out.recs[0]
    assert (k, t, flags) == (wire.KIND_WINDOW, 5000, wire.FLAG_UNSYNCED)
    assert body[2] == 2 and body[7] == 300 and body[8] == 800
    p.sample(0, 3000, 600)  # epoch T0 + 5900: window [T0 + 5000, T0 + 6000)
    p.sample(0, 4000, 699)
    p.sample(0, 5000, -301)  # before the open window: late
    assert p.late == 1
    p.flush(700)
    k, t, flags, body = out.recs[1]
    assert (t, flags, body[2], body[7], body[8]) == (T0 + 5000, 0, 2, 900, 999)


def test_rebase_keeps_open_windows_and_rules():
    out = Out()
    cfg = {"channels": {"temp": 0}, "window": {"size_ms": 60000},
           "rules": [{"id": "s", "type": "sequence", "first": {"channel": "temp", "value": 30},
                      "then": {"channel": "temp", "op": "<", "value": 10}, "within_ms": 20000}]}
    p = Pipeline(cfg, out)
    p.set_base(T0, True)
    big = (1 << 28) + 10000  # t_rel near the rebase point
    p.sample(0, 31000, big)
    p.rebase(T0 + big)  # new origin: that sample is now at t_rel 0
    p.sample(0, 5000, 15000)
    cep = out.kinds(wire.KIND_CEP)
    assert cep == [(wire.KIND_CEP, T0 + big + 15000, 0, ("s", 1, 15000, (31000, 5000)))]
    p.flush()
    w = out.kinds(wire.KIND_WINDOW)
    assert len(w) == 1 and w[0][3][2] == 2
    start = (T0 + big) // 60000 * 60000
    assert w[0][1] == start and w[0][3][7] == T0 + big - start


def test_late_and_unknown_are_counted():
    out = Out()
    p = Pipeline({"channels": {"temp": 0, "pot": 2}, "window": {"size_ms": 1000}}, out)
    p.sample(0, 1, 1500)
    p.sample(0, 2, 999)  # older than the open window: late, not in a device window
    p.sample(1, 3, 1600)  # channel 1 is not configured
    p.sample(7, 3, 1600)
    p.sample(-1, 3, 1600)
    assert p.late == 1 and p.unknown == 3
    p.flush()
    assert out.recs[0][3][2] == 1 and out.recs[0][2] == wire.FLAG_UNSYNCED
    st = p.stats()
    assert st["late"] == 1 and st["unknown"] == 3


def test_count_windows_on_flush():
    out = Out()
    p = Pipeline({"channels": ["temp", "hum"], "window": {"size_ms": 1000000, "count": 3}}, out)
    for i in range(4):
        p.sample(1, 1000 * i, 10 * i)
    cw = [r for r in out.recs if r[3][1] == 0]
    assert len(cw) == 1 and cw[0][1] == 0 and cw[0][3][:3] == (1, 0, 3) and cw[0][3][8] == 20
    p.flush()
    cw = [r for r in out.recs if r[3][1] == 0]
    assert len(cw) == 2 and cw[1][3][2] == 1


def test_config_errors():
    for cfg, rid in (([], "pipeline"),
                     ({"channels": {"temp": 40}}, "channels"),
                     ({"channels": {"temp": 0, "hum": 0}}, "channels"),
                     ({"channels": ["wind"]}, "channels"),
                     ({"channels": {}}, "channels"),
                     ({"window": {"size_ms": 0}}, "window"),
                     ({"window": 5}, "window"),
                     ({"count_window": 0}, "count_window"),
                     ({"rules": [{"id": "r", "type": "absence", "channel": "temp"}]}, "r"),
                     ({"anomaly": {"zscore": {"channels": "nope"}}}, "anomaly.zscore")):
        e = raises(ConfigError, Pipeline, cfg, Out())
        assert e.rule_id == rid, (cfg, e.rule_id, e.reason)
