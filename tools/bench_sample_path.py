# The device's full per-sample path: one App.sample_step() (SimHal read of 3 channels ->
# pipeline.sample x3 + tick -> 3 raw readings into the outbox's RAM batch), default example
# pipeline config, outbox on a MemFS. Prints microseconds and bytes allocated per step:
#   - steady: batch flushes done between steps, outside the measurement (what heap_lock proves
#     in tests/logic/test_sample_path.py)
#   - amortised: flushes of the RAM batch to flash included (16 records per batch)
# Bytes are gc.mem_alloc() growth with the GC disabled (MicroPython), net traced heap growth
# under CPython (not comparable: CPython's small ints and floats are cached/pooled differently).
#   node tests/mp/run.mjs tools/bench_sample_path.py
#   python tools/bench_sample_path.py
import sys
import gc
import time

try:
    from firmware.app import App
except ImportError:
    sys.path.insert(0, ".")
    from firmware.app import App
from firmware.hal_sim import SimHal
from firmware.pexample import example_config

MP = sys.implementation.name == "micropython"
N = 300
DAY = 1767225600000


def now_us():
    if hasattr(time, "ticks_us"):
        return time.ticks_us()
    return int(time.perf_counter() * 1000000)


def elapsed_us(t0):
    if hasattr(time, "ticks_diff"):
        return time.ticks_diff(time.ticks_us(), t0)
    return now_us() - t0


def make_app(synced):
    cfg = {"device_id": "bench", "broker": {"host": "127.0.0.1", "user": "bench", "password": "pw-0123456789",
                                                      "tls": {"ca": "/ca.pem"}}}
    cfg.update(example_config())
    app = App(cfg, SimHal(seed=3, console=False))
    app._boot()
    if synced:
        app.clock.set_time(DAY + 1000, "ntp")
        app._sync_pipeline()
    for i in range(50):  # warm up
        app.sample_step()
    app.outbox.flush()
    return app


def measure(app, flush_outside):
    ob = app.outbox
    step = app.sample_step
    nch = len(app._chans)
    total = 0
    us = 0
    gc.collect()
    if MP:
        gc.disable()
    else:
        import tracemalloc
        tracemalloc.start()
    for i in range(N):
        if flush_outside and ob.pending() + nch >= ob.batch_records:
            ob.flush()
        a = gc.mem_alloc() if MP else tracemalloc.get_traced_memory()[0]
        t0 = now_us()
        step()
        us += elapsed_us(t0)
        total += (gc.mem_alloc() if MP else tracemalloc.get_traced_memory()[0]) - a
    if MP:
        gc.enable()
    else:
        tracemalloc.stop()
    return us / N, total / N


def main():
    print("runtime: %s, %d sampling steps per run (3 channels, 5 rules, 2 detectors, raw readings on)"
          % (sys.implementation.name, N))
    for synced in (False, True):
        for flush_outside in (True, False):
            app = make_app(synced)
            e0 = app.pipeline.emitted
            us, per = measure(app, flush_outside)
            print("%s, %s: %.1f us/step, %.1f bytes allocated/step (flushes %d, emitted %d)"
                  % ("synced" if synced else "unsynced",
                     "steady (batch flushes outside)" if flush_outside else "amortised (batch flushes included)",
                     us, per, app.outbox.flushes, app.pipeline.emitted - e0))


main()
