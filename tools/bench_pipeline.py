# Edge pipeline cost: microseconds and bytes allocated per sample for 1, 4 and 8 channels
# with 5 CEP rules and 2 anomaly detectors, and the heap the default configuration uses.
# Runs under CPython and MicroPython:
#   python tools/bench_pipeline.py
#   node tests/mp/run.mjs tools/bench_pipeline.py
import sys
import gc
import time
import array

try:
    from firmware.pipeline import Pipeline
    from firmware.pexample import example_config
except ImportError:
    sys.path.insert(0, ".")
    from firmware.pipeline import Pipeline
    from firmware.pexample import example_config

MP = sys.implementation.name == "micropython"
N = 4000 if MP else 20000
T0 = 1767225600000


def now_us():
    if hasattr(time, "ticks_us"):
        return time.ticks_us()
    return int(time.perf_counter() * 1000000)


def elapsed_us(t0):
    if hasattr(time, "ticks_diff"):
        return time.ticks_diff(time.ticks_us(), t0)
    return now_us() - t0


def config(nch):
    names = ["c%d" % i for i in range(nch)]
    a = names[0]
    b = names[1 % nch]
    c = names[2 % nch]
    return {
        "channels": dict((nm, i) for i, nm in enumerate(names)),
        "window": {"size_ms": 3600000},
        "rules": [
            {"id": "hot", "type": "threshold", "channel": a, "enter": 30, "leave": 28, "min_duration_ms": 5000},
            {"id": "seq", "type": "sequence", "first": {"channel": a, "op": ">", "value": 22},
             "then": {"channel": b, "op": "<", "value": 5}, "within_ms": 10000},
            {"id": "burst", "type": "count", "channel": c, "op": ">=", "value": 90, "count": 5, "within_ms": 2000},
            {"id": "dead", "type": "absence", "channel": names, "within_ms": 30000},
            {"id": "jump", "type": "rate", "channel": b, "delta": 10, "within_ms": 5000},
        ],
        "anomaly": {"zscore": {"channels": [a], "window": 32, "k": 4}, "ewma": {"channels": [b], "k": 6}},
    }


def inputs(nch):
    chs = array.array("i", [0] * N)
    vals = array.array("i", [0] * N)
    ts = array.array("i", [0] * N)
    x = 7
    for i in range(N):
        x = (x * 75 + 74) % 65537
        chs[i] = i % nch
        ts[i] = (i // nch) * 100  # every channel sampled at 10 Hz
        vals[i] = 21000 + x % 2001 - 1000  # quiet: no rule, anomaly or window fires
    return chs, vals, ts


def sink(kind, t, flags, body):
    pass


def run(nch):
    chs, vals, ts = inputs(nch)
    p = Pipeline(config(nch), sink)
    p.set_base(T0, True)
    samp = p.sample
    gc.collect()
    t0 = now_us()
    for i in range(N):
        samp(chs[i], vals[i], ts[i])
    us = elapsed_us(t0) / N
    per = 0.0
    if MP:
        p = Pipeline(config(nch), sink)
        p.set_base(T0, True)
        samp = p.sample
        gc.collect()
        gc.disable()
        a = gc.mem_alloc()
        for i in range(N):
            samp(chs[i], vals[i], ts[i])
        per = (gc.mem_alloc() - a) / N
        gc.enable()
    else:
        import tracemalloc
        p = Pipeline(config(nch), sink)
        p.set_base(T0, True)
        tracemalloc.start()
        a = tracemalloc.get_traced_memory()[0]
        for i in range(N):
            p.sample(chs[i], vals[i], ts[i])
        per = (tracemalloc.get_traced_memory()[0] - a) / N
        tracemalloc.stop()
    print("%d channel(s), 5 rules, 2 detectors: %.2f us/sample, %.2f bytes allocated/sample%s, emitted %d"
          % (nch, us, per, "" if MP else " (net heap growth)", p.emitted))


def footprint():
    cfg = example_config()
    gc.collect()
    if MP:
        a = gc.mem_alloc()
        p = Pipeline(cfg, sink)
        gc.collect()
        used = gc.mem_alloc() - a
    else:
        import tracemalloc
        tracemalloc.start()
        p = Pipeline(cfg, sink)
        used = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    print("heap of the default configuration (3 channels, 60 s windows, ring 64, 5 rules, 2 detectors): %d bytes"
          " (budget 32768)" % used)
    return p


def main():
    print("runtime: %s, %d samples per run" % (sys.implementation.name, N))
    for nch in (1, 4, 8):
        run(nch)
    footprint()


main()
