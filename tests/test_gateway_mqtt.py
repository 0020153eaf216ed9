"""Gateway against a real mosquitto (`broker` fixture): acks, credits, presence, backpressure, metrics, CLI."""
import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.service import Gateway
from shared import wire
from tests.conftest import ROOT, free_port
from tests.test_gateway_fakes import T0, FakeDevice, pump_all, readings
from tools.proc import popen

pytestmark = pytest.mark.broker
TOP = wire.Topics()


class GwThread:
    """An in-process gateway on its own asyncio loop in a thread."""

    def __init__(self, cfg):
        self.gw = Gateway(cfg)
        self.error = None
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            asyncio.run(self.gw.run())
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def __enter__(self):
        self.t.start()
        deadline = time.time() + 10
        while time.time() < deadline:
            ing = self.gw.ingest
            if ing is not None and ing.connected.is_set():
                time.sleep(0.1)  # subscriptions granted
                return self.gw
            if self.error:
                raise self.error
            time.sleep(0.01)
        raise RuntimeError("gateway did not connect")

    def __exit__(self, *exc):
        self.gw.stop()
        self.t.join(10)
        assert not self.t.is_alive()
        if self.error and not exc[0]:
            raise self.error


def cfg(broker, tmp_path, **sections):
    c = broker.gateway_config()  # TLS, credentials, devices file
    c.update({"store": {"path": str(tmp_path / "gw.db"), "synchronous": "NORMAL"}, "metrics": {"port": 0},
         "checkpoint": {"interval_ms": 50, "ack_interval_ms": 20},
         "windows": {"size_ms": 1000, "allowed_lateness_ms": 0},
         "watermark": {"out_of_orderness_ms": 0}})
    for k, v in sections.items():
        c.setdefault(k, {}).update(v)
    return c


def retained(broker, topic, timeout=3.0):
    got = []
    ev = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe-%d" % time.monotonic_ns())
    broker.paho(c, broker.service("test-observer", "read"))
    c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, 1)
    c.on_message = lambda c, u, m: (got.append(m.payload), ev.set())
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    ev.wait(timeout)
    c.disconnect()
    c.loop_stop()
    return got[0] if got else None


def test_end_to_end_acks_after_commit_and_presence(broker, tmp_path):
    with GwThread(cfg(broker, tmp_path)) as gw:
        assert wire.decode_state(retained(broker, TOP.gw_state), gateway=True) is True
        d = FakeDevice(broker, "n1")
        for i in range(0, 500, 50):
            d.add_readings(readings(i, 50, T0))
        d.start()
        try:
            assert pump_all([d], 15)
        finally:
            d.stop()
        assert d.acked == {1: 499}
        assert all(a[5] & wire.ACK_HAS_TIME for a in d.acks)
        assert gw.stats.readings == 500
    assert wire.decode_state(retained(broker, TOP.gw_state), gateway=True) is False  # clean stop
    import sqlite3
    db = sqlite3.connect(str(tmp_path / "gw.db"))
    assert db.execute("SELECT count(*) FROM readings").fetchone() == (500,)
    assert db.execute("SELECT count(*) FROM window_results WHERE scope = 'device'").fetchone()[0] == 49


def test_reconnect_storm_admission_over_mqtt(broker, tmp_path):
    c = cfg(broker, tmp_path, admission={"max_replayers": 1, "credit_chunk": 60, "replay_rate": 5000.0,
                                         "replay_burst": 200})
    with GwThread(c) as gw:
        devs = []
        for k in range(3):
            d = FakeDevice(broker, "r%d" % k, inflight=4)
            for i in range(0, 300, 30):
                d.add_readings(readings(i, 30, T0))
            d.sent_upto = len(d.outbox)  # all of it is backlog from a previous session
            devs.append(d)
        for d in devs:
            d.start()
        try:
            assert pump_all(devs, 30)
        finally:
            for d in devs:
                d.stop()
        assert gw.admission.credits_granted >= 900
        assert gw.admission.admitted == 3
        held = [d for d in devs if any(not a[4] for a in d.acks)]
        assert held, "with one replay slot some device must have been told to hold"
        assert gw.stats.backlog == 900 and gw.stats.hellos >= 3


def test_device_last_will_marks_it_offline(broker, tmp_path):
    with GwThread(cfg(broker, tmp_path)) as gw:
        d = FakeDevice(broker, "w1")
        d.add_readings(readings(0, 10, T0))
        d.start()
        assert pump_all([d], 10)
        assert gw.watermarks.devs["w1"].active
        d.client._sock.shutdown(socket.SHUT_RDWR)  # dies without DISCONNECT: the broker sends the will
        deadline = time.time() + 10
        while time.time() < deadline and gw.watermarks.devs["w1"].active:
            time.sleep(0.05)
        d.client.loop_stop()
        assert not gw.watermarks.devs["w1"].active and gw.stats.offline_wills >= 1


def test_backpressure_bounded_queue(broker, tmp_path):
    c = cfg(broker, tmp_path, mqtt={"queue_size": 20})
    with GwThread(c):
        pass  # registers the persistent session
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="burst")
    broker.add_devices(["b1"])
    broker.paho(pub, "b1")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    infos = [pub.publish(TOP.data("b1"), wire.encode_readings("b1", 1, readings(i, 10, T0)), qos=1)
             for i in range(0, 6000, 10)]
    for i in infos:
        i.wait_for_publish(10)
    pub.disconnect()
    pub.loop_stop()
    with GwThread(c) as gw:
        deadline = time.time() + 20
        while time.time() < deadline and gw.stats.readings < 6000:
            time.sleep(0.01)
        assert gw.stats.readings == 6000
        assert gw.stats.paused > 0
        # the loop can overshoot by the packets of one read call, never by more
        assert 20 <= gw.stats.queue_max <= 20 + 64


def test_metrics_endpoint(broker, tmp_path):
    port = free_port()
    with GwThread(cfg(broker, tmp_path, metrics={"port": port})):
        d = FakeDevice(broker, "m1")
        d.add_readings(readings(0, 20, T0))
        d.start()
        assert pump_all([d], 10)
        d.stop()
        text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5).read().decode()
    for name in ("edgeflow_gateway_readings_total 20.0", "edgeflow_gateway_queue_depth",
                 "edgeflow_gateway_checkpoint_seconds_count", "edgeflow_gateway_device_watermark_lag_ms{device=\"m1\"}",
                 "edgeflow_gateway_credits_granted_total", "edgeflow_gateway_duplicates_total"):
        assert name in text, name


def test_cli_run_status_export(broker, tmp_path):
    db = str(tmp_path / "cli.db")
    env = dict(os.environ, PYTHONPATH=ROOT)
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt]\nport = 'x'\n")
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "--config", str(bad)], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "mqtt.port must be int" in r.stderr
    conf = broker.gateway_toml(str(tmp_path / "gw.toml"))
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "--broker", "127.0.0.1:%d" % broker.port],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "refusing to run without mqtt.tls_ca" in r.stderr  # secure by default
    p = popen([sys.executable, "-m", "gateway.cli", "run", "--config", conf,
               "--db", db, "--metrics-port", "0", "--log-format", "json"], env=env,
               stderr=subprocess.PIPE, text=True)
    try:
        d = FakeDevice(broker, "c1")
        d.add_records([(wire.KIND_CEP, 0, T0, 0, ("overheat", 3, 1000, (1,)))])
        d.add_readings(readings(1, 30, T0))
        d.start()
        assert pump_all([d], 20)
        d.stop()
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert "gateway_started" in events and "gateway_stopped" in events
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "status", "--db", db, "--json"], env=env,
                         capture_output=True, text=True, timeout=30)
    st = json.loads(out.stdout)
    assert st["devices"][0]["device"] == "c1" and st["devices"][0]["received"] == 31
    assert st["recent_alerts"][0]["what"] == "overheat"
    txt = subprocess.run([sys.executable, "-m", "gateway.cli", "status", "--db", db], env=env,
                         capture_output=True, text=True, timeout=30).stdout
    assert "c1" in txt and "recent alerts" in txt
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "export", "readings", "--db", db, "--format", "json"],
                         env=env, capture_output=True, text=True, timeout=30)
    rows = json.loads(out.stdout)
    assert len(rows) == 30 and rows[0]["device"] == "c1"
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "export", "cep_events", "--db", db], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.splitlines()[0].startswith("device,boot,seq,t")


def story(gw, devs, t0=None, caplog=None):
    """What a failed wait explains itself with: the gateway's connection, counters and MQTT log
    (connect failures with their errors), each device's state and recent events."""
    s, ing = gw.stats, gw.ingest
    head = "after %.1f s: " % (time.monotonic() - t0) if t0 is not None else ""
    mqtt_log = ""
    if caplog is not None:
        recs = [r for r in caplog.records if r.getMessage().startswith("mqtt_")]
        mqtt_log = "; gateway mqtt log (%d): %s" % (len(recs), ["%.2f %s %s" % (
            r.created % 100, r.getMessage(), getattr(r, "fields", "")) for r in recs[-20:]])
    return "%sgateway connects %d disconnects %d readings %d duplicates %d hellos %d wills %d acks_sent %d " \
        "publish_failures %d connected %s last_error %r credits_granted %d%s; %s" % (
            head, s.connects, s.disconnects, s.readings, s.duplicates, s.hellos, s.offline_wills, s.acks_sent,
            ing.publish_failures, ing.is_connected(), ing.last_error, gw.admission.credits_granted, mqtt_log,
            "; ".join(d.describe() for d in devs))


def broker_state(broker):
    """Is our mosquitto still the one running (another process can take its port while it is down)?"""
    with open(broker.log_path, errors="replace") as f:
        tail = [line.strip() for line in f.readlines()[-8:]]
    return "mosquitto exit code %s, its log ends %s" % (broker.proc.poll() if broker.proc else "stopped", tail)


def test_broker_restart_reconnects_and_loses_nothing(broker, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edgeflow.gateway")
    with GwThread(cfg(broker, tmp_path)) as gw:
        d = FakeDevice(broker, "k1", resend_s=0.5)
        for i in range(0, 200, 20):
            d.add_readings(readings(i, 20, T0))
        d.start()
        assert pump_all([d], 10, until=lambda: d.acked.get(1, -1) >= 99), story(gw, [d], None, caplog)
        t_stop = time.monotonic()
        broker.stop(hold_port=True)  # no other process on the machine can take the port meanwhile
        time.sleep(0.3)
        broker.start()
        t0 = time.monotonic()
        try:
            assert pump_all([d], 30), "everything acked after the restart (broker down %.1f s, %s): %s" % (
                t0 - t_stop, broker_state(broker), story(gw, [d], t0, caplog))
        finally:
            d.stop()
        assert gw.stats.connects >= 2
        assert gw.stats.readings == 200  # redeliveries and resends were duplicates


def test_broker_restart_on_a_taken_port_fails_clearly(broker):
    """While a restarted broker is down, another process (another test run on the machine) can
    take its port: mosquitto then exits (address in use) but the port answers. start() must say
    so, not return and leave the gateway connecting to a stranger for the rest of the test."""
    broker.stop()
    other = socket.socket()
    try:
        other.bind(("127.0.0.1", broker.port))
        other.listen(8)
        with pytest.raises(RuntimeError, match="mosquitto exited.*[Aa]ddress already in use"):
            broker.start()
    finally:
        other.close()
    broker.start()  # the port is free again: the broker is back
    assert broker.proc.poll() is None
    broker.stop(hold_port=True)  # what the restart tests do
    with socket.socket() as other, pytest.raises(OSError):
        other.bind(("127.0.0.1", broker.port))
    broker.start()
    assert broker.proc.poll() is None and broker._hold is None
