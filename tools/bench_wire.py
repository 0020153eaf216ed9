# Wire encoding cost: bytes per reading and encode/decode time per reading, binary
# (shared/wire.py) next to JSON of the same batch. Runs under CPython and MicroPython:
#   python tools/bench_wire.py
#   node tests/mp/run.mjs tools/bench_wire.py
import sys
import time
import json

try:
    from shared import wire
except ImportError:
    sys.path.insert(0, ".")
    from shared import wire

T0 = 1767225600000
N = 50  # readings per MQTT message, as the firmware's uplink batches them
ROUNDS = 40 if sys.implementation.name == "micropython" else 400


def now_us():
    if hasattr(time, "ticks_us"):
        return time.ticks_us()
    return int(time.perf_counter() * 1000000)


def main():
    rs = [(1000 + i, T0 + i * 1000, i % 4, 0, 21000 + i * 7) for i in range(N)]
    js = [{"seq": s, "t": t, "ch": c, "f": f, "v": v} for s, t, c, f, v in rs]
    p = wire.encode_readings("node-0001", 3, rs)
    j = json.dumps({"v": 1, "dev": "node-0001", "boot": 3, "r": js}).encode()
    t = now_us()
    for _ in range(ROUNDS):
        wire.encode_readings("node-0001", 3, rs)
    enc = (now_us() - t) / (ROUNDS * N)
    t = now_us()
    for _ in range(ROUNDS):
        json.dumps({"v": 1, "dev": "node-0001", "boot": 3, "r": js})
    jenc = (now_us() - t) / (ROUNDS * N)
    t = now_us()
    for _ in range(ROUNDS):
        wire.decode_data(p)
    dec = (now_us() - t) / (ROUNDS * N)
    t = now_us()
    for _ in range(ROUNDS):
        json.loads(j)
    jdec = (now_us() - t) / (ROUNDS * N)
    print("runtime: %s, batch of %d readings" % (sys.implementation.name, N))
    print("binary: %.1f bytes/reading, encode %.2f us/reading, decode %.2f us/reading" % (len(p) / N, enc, dec))
    print("json:   %.1f bytes/reading, encode %.2f us/reading, decode %.2f us/reading" % (len(j) / N, jenc, jdec))
    print("ratio json/binary: size %.1fx, encode %.1fx, decode %.1fx" % (len(j) / len(p), jenc / enc, jdec / dec))


main()
