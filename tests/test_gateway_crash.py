"""kill -9 the gateway at seeded random moments; the tables must equal an uninterrupted run.

Fake devices keep every record until it is acked and resend on the gateway's
online state; mosquitto redelivers messages the gateway never PUBACKed. The
workload covers readings, late records and revisions, gaps, device records,
unsynced and bad input. Group windows see only devices whose data is in event
order, and final barrier records (the group's devices, then the others) close every
window, so the outcome does not depend on how devices interleave, only on exactness.
"""
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from shared import wire
from tests.conftest import ROOT
from tests.test_gateway_fakes import T0, FakeDevice, pump_all
from tools.broker import Mosquitto
from tools.proc import popen

pytestmark = pytest.mark.broker

HOUR = 3600000
GROUP_DEVS = ("g0", "g1", "g2")

# columns that legitimately differ (processing time, redelivery counts, latest hello)
VOLATILE = {
    "quarantine": {"id", "received_ms", "digest"},  # digest covers the topic, whose prefix is per run
    "devices": {"last_seen_ms", "last_hello_ms", "duplicates", "quarantined", "live", "backlog_received",
                "backlog", "oldest_boot", "oldest_seq", "hello_next_seq", "deferred"},
}
TABLES = ("readings", "unsynced", "device_windows", "cep_events", "anomalies", "device_status", "gaps",
          "window_results", "window_revisions", "late", "quarantine", "devices", "dedup", "dedup_devices",
          "device_watermarks", "open_windows", "meta")


def make_devices(port, prefix):
    devs = []
    for name in GROUP_DEVS:
        d = FakeDevice(port, name, prefix=prefix, inflight=3, resend_s=1.0)
        seq = 0
        while seq < 900:
            if name == "g1" and seq == 300:  # the outbox dropped 301..320 and says so
                d.add_records([(wire.KIND_GAP, 300, T0 + 300 * 100, 0, (1, ((301, 20),)))])
                seq = 321
                continue
            if name == "g2" and seq == 450:
                d.add_records([
                    (wire.KIND_WINDOW, 450, T0 + 40000, 0, (0, 10000, 100, -5, 5, 0, 3, 10, 9990)),
                    (wire.KIND_CEP, 451, T0 + 45050, 0, ("overheat", 2, 5000, (1, 2, 3))),
                    (wire.KIND_ANOMALY, 452, T0 + 45100, 0, (1, wire.DETECTOR_EWMA, 4500, 99000, 20000)),
                    (wire.KIND_STATUS, 453, T0 + 45200, 0, (100, 5, 600, 20, 1, -12, 50000, 3))])
                seq = 454
                continue
            if name == "g0" and seq == 600:
                d.add_readings([(600, 4000, 0, wire.FLAG_UNSYNCED, 7)])  # before the clock was set
                d.add_readings([(601, (T0 + 60100) // 1000, 0, 0, 8)])  # seconds, not ms
                seq = 602
                continue
            n = min(30, 900 - seq)
            d.add_readings([(s, T0 + s * 100, s % 2, 0, 1000 * (s % 50) - 7000) for s in range(seq, seq + n)])
            seq += n
        devs.append(d)
    # 'late' device, not in the group: jumps ahead, then sends records behind its own watermark
    d = FakeDevice(port, "late", prefix=prefix, inflight=3, resend_s=1.0)
    for s0 in range(0, 300, 30):
        d.add_readings([(s, T0 + s * 100, 0, 0, s) for s in range(s0, s0 + 30)])
    d.add_readings([(300, T0 + HOUR + 70000, 0, 0, 1)])  # watermark T0+70000-1
    rng = random.Random(5)
    for s0 in range(301, 361, 10):  # windows [40s,50s) late-dropped, [50s,60s) and [60s,70s) amended
        d.add_readings([(s, T0 + 40000 + rng.randrange(30000), 0, 0, s) for s in range(s0, s0 + 10)])
    devs.append(d)
    topics = wire.Topics(prefix)
    devs[0].extra = [(topics.data("g0"), bytes((0xE5, wire.VERSION)) + b"\x01garbage"),
                     (topics.data("g0"), wire.encode_readings("g2", 1, [(5, T0, 0, 0, 1)]))]  # payload says g2
    return devs


def write_config(tmp, prefix, broker, db):
    """The gateway config for this run: the broker's TLS, credentials and devices file + the workload's."""
    return broker.gateway_toml(os.path.join(tmp, prefix + ".toml"), {
        "mqtt": {"prefix": prefix},
        "store": {"path": db, "synchronous": "NORMAL"},
        "checkpoint": {"interval_ms": 30, "ack_interval_ms": 10, "max_messages": 20},
        "metrics": {"port": 0},
        "watermark": {"out_of_orderness_ms": HOUR, "idle_timeout_ms": 100000000},
        "windows": {"size_ms": 10000, "allowed_lateness_ms": 15000},
    }, raw='[[windows.groups]]\nname = "hall"\ndevices = ["g0", "g1", "g2"]\nchannel = 0\n')


def start_gateway(conf, log):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return popen([sys.executable, "-m", "gateway.cli", "run", "--config", conf], env=env, stdout=log, stderr=log)


def run_workload(broker, tmp_path, prefix, kills):
    db = str(tmp_path / (prefix + ".db"))
    conf = write_config(str(tmp_path), prefix, broker, db)
    log = open(str(tmp_path / (prefix + ".log")), "ab")
    rng = random.Random(1234)
    proc = start_gateway(conf, log)
    devs = make_devices(broker, prefix)
    for d in devs:
        d.start()
    # Kill points are seeded shares of the workload acked, each at a random delay after it is
    # reached (0-150 ms: mid-checkpoint, mid-commit, during start-up), not wall-clock times: a
    # fast or a loaded machine must not finish the workload before the last kill.
    total = sum(len(d.outbox) for d in devs)
    kill_at = sorted(rng.uniform(0.05, 0.9) for _ in range(kills))
    killed = 0
    try:
        deadline = time.time() + 60
        next_kill = None
        while time.time() < deadline:
            if killed < kills:
                if next_kill is None and sum(d.acked_entries() for d in devs) >= kill_at[killed] * total:
                    next_kill = time.time() + rng.uniform(0.0, 0.15)
                if next_kill is not None and time.time() >= next_kill:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(10)
                    killed += 1
                    next_kill = None
                    time.sleep(rng.uniform(0.0, 0.3))
                    proc = start_gateway(conf, log)
            if all(d.pump() for d in devs) and killed == kills:  # a kill due at the very end still runs
                break
            time.sleep(0.003)
        assert all(d.done() for d in devs), "workload did not finish (killed %d times)" % killed
        assert killed == kills, "the workload ended before every kill"
        # barrier: far ahead in event time, closes every window of every device. The group's
        # devices first, then 'late': sent together, the broker may pass 'late' first and the
        # group windows would fire at another watermark (the `watermark` column) by arrival order.
        for group in (devs[:-1], devs[-1:]):
            for d in group:
                d.add_readings([(d.outbox[-1].last + 1, T0 + 2 * HOUR + 300000, 0, 0, 0)])
            assert pump_all(devs, 30)
    finally:
        for d in devs:
            d.stop()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return db


def dump(path):
    db = sqlite3.connect(path)
    out = {}
    for t in TABLES:
        cur = db.execute("SELECT * FROM %s" % t)
        names = [c[0] for c in cur.description]
        keep = [i for i, n in enumerate(names) if n not in VOLATILE.get(t, ())]
        rows = [tuple(r[i] for i in keep) for r in cur]
        if t == "quarantine":
            rows = [(r[0].split("/", 1)[1],) + r[1:] for r in rows]  # the topic without the run's prefix
        out[t] = sorted(rows, key=repr)
    db.close()
    return out


def test_kill9_at_random_points_gives_identical_tables(tmp_path):
    # one provisioned broker per run: the ACL is written for the run's topic prefix
    devs = GROUP_DEVS + ("late",)
    with Mosquitto(tmp_path / "mq-clean", prefix="clean", devices=devs) as b:
        clean = dump(run_workload(b, tmp_path, "clean", kills=0))
    with Mosquitto(tmp_path / "mq-crashy", prefix="crashy", devices=devs) as b:
        crashed = dump(run_workload(b, tmp_path, "crashy", kills=3))
    # the workload exercised every path
    assert len(clean["readings"]) == 3 * 900 - 20 - 2 - 4 + 360 + 1 - 1 + 4 - 20 + 20
    assert any(r[5] > 0 for r in clean["window_revisions"])  # late amendments
    assert clean["late"] and clean["gaps"] and clean["unsynced"] and clean["cep_events"]
    assert {r[4] for r in clean["quarantine"]} >= {"seconds_not_ms", "spoofed_device_id", "truncated"}
    assert any(r[0] == "group" for r in clean["window_results"])
    for t in TABLES:
        assert crashed[t] == clean[t], t
