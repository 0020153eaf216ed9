"""The device App (simulated HAL) against a real mosquitto and a stand-in gateway.

StandInGateway is a small, reusable gateway double (paho + shared.wire): it dedups by
(device, boot, seq), honours gap records, records what it got, acks the contiguous prefix per
(device, boot) with credits, and announces its retained online/offline state.
"""
import asyncio
import threading
import time

import paho.mqtt.client as paho
import pytest

from shared import wire
from firmware.app import App
from firmware.hal_sim import SimHal

pytestmark = pytest.mark.broker


class StandInGateway:
    def __init__(self, broker, prefix="edgeflow", credits=1000, online=True, auto_ack=True):
        self.port = broker.port
        self.broker = broker
        self.keys = {}  # dev -> provisioned ack_key (the real gateway reads the devices file)
        self.topics = wire.Topics(prefix)
        self.credits = credits
        self.online = online
        self.auto_ack = auto_ack
        self.lock = threading.Lock()
        self.records = {}  # (dev, boot, seq) -> (kind, t, flags, body)
        self.gaps = {}  # (dev, boot) -> set of seqs accounted for by gap records
        self.dups = 0
        self.hellos = []
        self.acks_sent = 0
        self.backlog_between_acks = []  # backlog records received between two acks
        self._since_ack = 0
        self.next_seq = {}  # dev -> (boot, next_seq) from the latest hello
        self.nonce = {}  # dev -> nonce of the latest hello (acks echo it)
        self.rejected = 0
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="standin-gw")
        c.will_set(self.topics.gw_state, wire.encode_state(False, True), 1, True)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.reconnect_delay_set(0.1, 0.5)
        broker.paho(c)  # TLS + the gateway's credentials (the broker makes the user name its client id)
        self.client = c

    def start(self):
        self.client.connect("127.0.0.1", self.port, 30)
        self.client.loop_start()
        return self

    def stop(self):
        self.client.loop_stop()
        self.client.disconnect()

    def _on_connect(self, c, userdata, flags, rc, props=None):
        for t in (self.topics.sub_data, self.topics.sub_hello):
            c.subscribe(t, 1)
        c.publish(self.topics.gw_state, wire.encode_state(self.online, True), 1, True)

    def set_online(self, on):
        self.online = on
        self.client.publish(self.topics.gw_state, wire.encode_state(on, True), 1, True)

    def contiguous(self, dev, boot):
        """Highest seq h with every 0..h received or covered by a gap record, else -1."""
        h = -1
        g = self.gaps.get((dev, boot), ())
        while (dev, boot, h + 1) in self.records or (h + 1) in g:
            h += 1
        return h

    def ack(self, dev, boot, credits=None):
        h = self.contiguous(dev, boot)
        cr = self.credits if credits is None else credits
        flags = wire.ACK_HAS_TIME | (wire.ACK_NONE if h < 0 else 0)
        p = wire.encode_ack(dev, boot, max(h, 0), int(time.time() * 1000), cr, self.nonce.get(dev, 0),
                            self._key(dev), True, flags)
        self.client.publish(self.topics.ack(dev), p, 1)
        self.acks_sent += 1
        self.backlog_between_acks.append(self._since_ack)
        self._since_ack = 0

    def _key(self, dev):
        """The device's provisioned ack key (what the real gateway reads from its devices file)."""
        if dev not in self.keys:
            cfg = {} if self.broker.insecure else self.broker.device_secrets(dev)["config"]
            self.keys[dev] = bytes.fromhex(cfg.get("ack_key", ACK_KEY))
        return self.keys[dev]

    def grant(self, dev, credits):
        with self.lock:
            b = self.next_seq[dev][0]
            self.ack(dev, b, credits)

    def _on_message(self, c, userdata, msg):
        try:
            dev, leaf = self.topics.parse(msg.topic)
            with self.lock:
                if leaf == "hello":
                    h = wire.decode_hello(msg.payload)
                    self.hellos.append(h)
                    self.next_seq[dev] = (h["boot"], h["next_seq"])
                    self.nonce[dev] = h["nonce"]
                    if self.online:
                        self.ack(dev, h["boot"])
                elif leaf == "data":
                    mtype, d, boot, recs = wire.decode_data(msg.payload)
                    assert d == dev
                    for r in recs:
                        if mtype == wire.MSG_READINGS:
                            seq, t, ch, fl, v = r
                            val = (wire.KIND_READING, t, fl, (ch, v))
                        else:
                            kind, seq, t, fl, body = r
                            val = (kind, t, fl, body)
                            if kind == wire.KIND_GAP:
                                s = self.gaps.setdefault((dev, body[0]), set())
                                for first, n in body[1]:
                                    s.update(range(first, first + n))
                        key = (dev, boot, seq)
                        if key in self.records:
                            self.dups += 1
                        else:
                            self.records[key] = val
                        hb = self.next_seq.get(dev)
                        if hb and (boot < hb[0] or (boot == hb[0] and seq < hb[1])):
                            self._since_ack += 1
                    if self.auto_ack and self.online:
                        self.ack(dev, boot)
        except (wire.WireError, ValueError, AssertionError):
            self.rejected += 1

    def seqs(self, dev, boot):
        with self.lock:
            return sorted(k[2] for k in self.records if k[0] == dev and k[1] == boot)


ACK_KEY = "a1" * 32
CFG = {"device_id": "dev-a", "ack_key": ACK_KEY, "broker": {"host": "127.0.0.1", "port": 1883, "keepalive_s": 5, "timeout_ms": 2000},
       "sample_ms": 50, "status_every_s": 1, "watchdog_ms": 0,
       "outbox": {"batch_records": 8, "batch_ms": 200, "ack_persist_ms": 200},
       "uplink": {"backoff_base_ms": 50, "backoff_cap_ms": 400, "resend_ms": 2000},
       "clock": {"ntp_every_s": 0},
       "window": {"size_ms": 1000},
       "rules": [{"id": "warm", "type": "threshold", "channel": "temp", "enter": 20.0, "leave": 19.0, "severity": 2}]}


def cfg_for(broker, hal, **kw):
    """CFG with the device's provisioned credentials, TLS and ack key (CA put on hal's flash)."""
    import copy
    c = copy.deepcopy(CFG)
    sec = broker.device_config(c["device_id"], hal)
    for k, v in sec.items():
        c[k] = dict(c[k], **v) if isinstance(v, dict) and isinstance(c.get(k), dict) else v
    c["broker"]["port"] = broker.port
    c.update(kw)
    return c


async def until(pred, timeout=10.0, step=0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        await asyncio.sleep(step)
    return pred()


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_app_survives_broker_restart_and_reboots_every_record_once(broker, tmp_path):
    gw = StandInGateway(broker).start()
    hal = SimHal(seed=3, console=False)
    cfg = cfg_for(broker, hal)
    expected = {}  # boot -> seqs the device stored durably
    box = {}

    async def main():
        loop = asyncio.get_running_loop()
        # boot 1: run, broker restart mid-stream, graceful stop
        app = App(cfg, hal)
        task = asyncio.create_task(app.run())
        assert await until(lambda: app.uplink is not None and app.uplink.c["acks"] > 2)
        assert await until(lambda: app.clock.synced)  # gateway time beacon
        await loop.run_in_executor(None, broker.stop)
        await asyncio.sleep(0.8)  # samples keep going into the outbox
        assert app.c["samples"] > 0 and not app.uplink.session
        await loop.run_in_executor(None, broker.start)
        assert await until(lambda: app.uplink.c["reconnects"] >= 1 and app.uplink.session, 15)
        await asyncio.sleep(0.5)
        app.stop()
        await task
        expected[app.boot] = app.outbox.seq
        b1 = box["b1"] = app.boot  # fresh flash: a random first boot (docs/wire.md)
        # boot 2: simulated reboot, then a power cut (no flush, last will)
        hal.reboot()
        app2 = App(cfg, hal)
        task = asyncio.create_task(app2.run())
        assert await until(lambda: app2.uplink is not None and app2.uplink.c["acks"] > 1)
        await asyncio.sleep(0.5)
        app2.kill()
        await task
        assert app2.boot == b1 + 1
        expected[b1 + 1] = app2.outbox.seq - app2.outbox.pending()  # the RAM batch is lost
        # boot 3: comes back and drains everything
        hal.reboot()
        app3 = App(cfg, hal)
        task = asyncio.create_task(app3.run())
        assert await until(lambda: app3.uplink is not None and app3.uplink.session)
        assert await until(lambda: all(s[1] == b1 + 2 for s in app3.outbox.segs), 10), app3.counters()
        for sig in hal.signals.values():
            sig.missing = True  # sensor fault: no new readings, the outbox drains
        await asyncio.sleep(0.3)
        assert await until(lambda: app3.outbox.unacked() == 0, 10), app3.counters()
        expected[b1 + 2] = app3.outbox.seq
        app3.stop()
        await task
        # the pipeline's last windows, closed at the graceful stop, wait on flash for the next boot
        assert app3.outbox.unacked() == app3.outbox.seq - expected[b1 + 2]
        return app, app2, app3

    try:
        app, app2, app3 = run(main())
    finally:
        gw.stop()
    dev = "dev-a"
    for boot, n in expected.items():
        got = gw.seqs(dev, boot)
        assert got[:n] == list(range(n)), (boot, n, got[:n + 3])
        assert len(got) == len(set(got))
    # boot 1 and 3 ended gracefully: nothing beyond what they stored; everything acked
    b1 = box["b1"]
    assert len(gw.seqs(dev, b1)) == expected[b1]
    assert hal.boots == 2
    # event time: boot-1 records sent after the beacon carry epoch ms, never a wrong stamp
    now = int(time.time() * 1000)
    for (d, boot, seq), (kind, t, fl, body) in gw.records.items():
        if fl & wire.FLAG_UNSYNCED:
            assert 0 <= t < 600000, (boot, seq, t)
        else:
            assert now - 120000 < t <= now + 1000, (boot, seq, t)
    synced = [1 for (d, b, s), v in gw.records.items() if b == b1 and not v[2] & wire.FLAG_UNSYNCED]
    assert synced
    kinds = {v[0] for v in gw.records.values()}
    assert {wire.KIND_READING, wire.KIND_STATUS, wire.KIND_WINDOW, wire.KIND_CEP} <= kinds, kinds
    lines = hal.lines
    assert [ln for ln in lines if ln.startswith("CEP warm ")]
    assert "edgeflow boot device=dev-a boot=%d fw=0.1.0" % b1 in lines
    assert "edgeflow boot device=dev-a boot=%d fw=0.1.0" % (b1 + 2) in lines


def test_replay_is_held_while_gateway_offline_and_kept_within_credits(broker):
    gw = StandInGateway(broker, online=False, auto_ack=False).start()
    hal = SimHal(seed=5, console=False)
    cfg = cfg_for(broker, hal, status_every_s=0)
    dev = "dev-a"

    async def main():
        app = App(cfg, hal)
        hal.set_wifi(False)  # Wi-Fi outage: a backlog builds on flash
        task = asyncio.create_task(app.run())
        assert await until(lambda: app.outbox is not None and app.outbox.seq >= 40)
        assert app.uplink.c["wifi_lost"] >= 1 and app.uplink.c["connects"] == 0
        hal.set_wifi(True)
        assert await until(lambda: app.uplink.session and len(gw.hellos) >= 1)
        backlog_end = gw.hellos[-1]["next_seq"]
        assert gw.hellos[-1]["backlog"] >= 40
        await asyncio.sleep(0.6)
        # gateway offline: live records flow, backlog is held
        got = gw.seqs(dev, app.boot)
        assert got and min(got) >= backlog_end, (backlog_end, got[:5])
        # online: the hello is answered with 5 credits -> exactly 5 backlog records, oldest first
        gw.online = True
        gw.set_online(True)
        assert await until(lambda: len([s for s in gw.seqs(dev, app.boot) if s < backlog_end]) >= 5)
        await asyncio.sleep(0.4)
        old = [s for s in gw.seqs(dev, app.boot) if s < backlog_end]
        assert old == [0, 1, 2, 3, 4], old
        gw.grant(dev, 7)
        assert await until(lambda: len([s for s in gw.seqs(dev, app.boot) if s < backlog_end]) >= 12)
        await asyncio.sleep(0.4)
        assert [s for s in gw.seqs(dev, app.boot) if s < backlog_end] == list(range(12))
        # normal operation: everything ends up acked
        gw.auto_ack = True
        gw.credits = 1000
        gw.grant(dev, 1000)
        for sig in hal.signals.values():
            sig.missing = True
        await asyncio.sleep(0.3)
        assert await until(lambda: app.outbox.unacked() == 0, 15), app.counters()
        n = app.outbox.seq
        app.stop()
        await task
        return app, n

    gw.credits = 5
    try:
        app, n = run(main())
    finally:
        gw.stop()
    assert gw.seqs(dev, app.boot) == list(range(n))
    assert app.outbox.unacked() == app.outbox.seq - n  # windows closed at the stop stay stored


def test_wifi_outage_mid_session_and_ntp_time(broker):
    """NTP answers (simulated): readings taken before the first sync are converted at send time,
    so every record of this boot arrives with exact epoch time. A Wi-Fi outage mid-session
    loses nothing."""
    gw = StandInGateway(broker).start()
    hal = SimHal(seed=9, console=False, ntp_ok=True, epoch_ms=1767225600000)
    cfg = cfg_for(broker, hal, status_every_s=0, clock={"ntp_every_s": 3600, "use_beacon": False})
    dev = "dev-a"

    async def main():
        app = App(cfg, hal)
        task = asyncio.create_task(app.run())
        assert await until(lambda: app.uplink is not None and app.uplink.c["acks"] > 2)
        assert app.clock.source == "ntp"
        hal.set_wifi(False)
        n0 = app.outbox.seq
        assert await until(lambda: app.outbox.seq > n0 + 30)
        assert not app.uplink.session
        hal.set_wifi(True)
        assert await until(lambda: app.uplink.session and app.uplink.c["connects"] == 2)
        for sig in hal.signals.values():
            sig.missing = True
        await asyncio.sleep(0.3)
        assert await until(lambda: app.outbox.unacked() == 0, 10), app.counters()
        n = app.outbox.seq
        app.stop()
        await task
        return app, n

    try:
        app, n = run(main())
    finally:
        gw.stop()
    assert gw.seqs(dev, app.boot) == list(range(n))
    assert app.uplink.c["wifi_lost"] >= 1
    lo = 1767225600000
    last = {}
    for (d, boot, seq), (kind, t, fl, body) in sorted(gw.records.items()):
        assert not fl & wire.FLAG_UNSYNCED, (seq, t, fl)
        assert lo <= t < lo + 60000, (seq, t)
        if kind == wire.KIND_READING:
            assert t >= last.get(body[0], 0)
            last[body[0]] = t
