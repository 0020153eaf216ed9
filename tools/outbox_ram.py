"""What the outbox keeps in RAM, measured under the real MicroPython (npm WebAssembly build),
with firmware/outbox.py and its imports as tools/deploy.py ships them (.mpy, or .py with --py).

    python tools/outbox_ram.py [--py] [--max-bytes 262144] [--segment-bytes 8192]

Steps (bytes kept above the imported modules, read between runPython calls: tools/ram_steps.mjs):
  empty     Outbox(...).load() on empty flash (object, RAM batch buffer, ack slots)
  full      after an outage filled it to max_bytes (readings, a window a minute, gaps): the
            segment index at its largest
  reboot    the next boot's Outbox.load() on that flash (above what is left once the old
            object is dropped)
  replay    allocation of one read_backlog(50) (gc disabled: an upper bound of the peak), the
            first of a replay (it loads firmware/obread.py) and a later one
  live      allocation of one take_live() of a full batch (read back from flash)
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.ram_budget import DEFAULT_CONFIG, STEPS, build_fs  # noqa: E402

SCRIPT = r'''
import gc, os
import firmware.outbox, firmware.hal, firmware.slots
from shared import wire_dev as wire
try:
    os.mkdir("/flash")
except OSError:
    pass
fs = firmware.hal.PosixFS("/flash")
def fill():
    t = 1767225600000
    i = 0
    while ob.dropped < %(drop)d:
        ob.reading(i %% 3, t, 0, 20000 + i %% 97)
        if i %% 180 == 179:
            ob.append(wire.KIND_WINDOW, t, 0, (i %% 3, t - 60000, 60, 19000, 21000, 1200000, 0, 0, 60000))
        i += 1
        t += 333
    ob.flush()
    print("STATE full: segments", len(ob.segs), "bytes", ob.total_bytes(), "records", ob.stored_records())
#--- empty
ob = firmware.outbox.Outbox(fs, 7, "ob", %(max_bytes)d, %(seg)d).load()
#--- full
fill()
#--- dropped
ob.flush()
ob._end_cur()
ob = None
#--- churned
# the wasm build's GC is conservative: a stale pointer left on its stack can keep the dropped
# outbox alive; a deep call overwrites those slots before the next boot is measured
def deep(n):
    return 0 if n == 0 else deep(n - 1) + 1
deep(60)
#--- reboot
ob = firmware.outbox.Outbox(fs, 8, "ob", %(max_bytes)d, %(seg)d).load()
print("STATE next boot: segments", len(ob.segs))
#--- replayed
def nrec(fr):
    o = k = 0
    while o < len(fr):
        o += 7 + ((fr[o + 1] << 8) | fr[o + 2])
        k += 1
    return k
def alloc(f):
    gc.collect()
    gc.disable()
    m0 = gc.mem_alloc()
    r = f()
    m1 = gc.mem_alloc()
    gc.enable()
    return m1 - m0, r
ob.begin_session()
a, fr = alloc(lambda: ob.read_backlog(50))
print("ALLOC replay_first", a, nrec(fr))
fr = None
#--- replayed2
a, fr = alloc(lambda: ob.read_backlog(50))
print("ALLOC replay", a, nrec(fr))
fr = None
#--- live
t = 1767225600000
for i in range(ob.batch_records):
    ob.reading(i %% 3, t + i, 0, i)
a, fr = alloc(lambda: ob.take_live())
print("ALLOC live", a, nrec(fr))
fr = None
'''


def measure(as_py=False, max_bytes=262144, seg=8192, drop=3000):
    with tempfile.TemporaryDirectory() as tmp:
        build_fs(tmp, dict(DEFAULT_CONFIG), "xtensawin", as_py)
        script = os.path.join(tmp, "steps.py")
        with open(script, "w") as f:
            f.write(SCRIPT % {"max_bytes": max_bytes, "seg": seg, "drop": drop})
        p = subprocess.run(["node", STEPS, "--heap", str(1 << 21), "--fs", tmp, script],
                           capture_output=True, text=True, timeout=900)
    ram = {}
    out = {"stdout": p.stdout}
    for line in p.stdout.splitlines():
        m = re.match(r"RAM (\S+) (\d+)$", line)
        if m:
            ram[m.group(1)] = int(m.group(2))
        elif line.startswith("ALLOC "):
            out[line.split()[1]] = int(line.split()[2])
        elif line.startswith("STATE"):
            out.setdefault("state", []).append(line[6:])
    if p.returncode != 0 or "reboot" not in ram:
        raise RuntimeError("MicroPython run failed:\n" + p.stdout[-3000:] + p.stderr[-3000:])
    out["empty"] = ram["empty"] - ram["start"]  # "start": the modules imported
    out["full"] = ram["full"] - ram["start"]
    out["reboot"] = ram["reboot"] - ram["churned"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--py", action="store_true", help=".py instead of .mpy")
    ap.add_argument("--max-bytes", type=int, default=262144)
    ap.add_argument("--segment-bytes", type=int, default=8192)
    a = ap.parse_args(argv)
    r = measure(a.py, a.max_bytes, a.segment_bytes)
    for s in r.get("state", []):
        print(s)
    print("outbox RAM above its imported modules: empty %d B, full %d B, next boot %d B; "
          "read_backlog(50) allocates %d B (the first of a replay, with its module: %d B); "
          "take_live() of a batch %d B" % (r["empty"], r["full"], r["reboot"], r["replay"], r["replay_first"],
                                          r["live"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
