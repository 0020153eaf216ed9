"""Protocol-level fake devices for the gateway tests (paho + shared.wire), and checks of them.

A FakeDevice keeps an outbox of encoded messages, sends live records freely and
backlog only within the credits the gateway grants, trims on acks, resends
unacked messages when the gateway comes back online (and after a quiet
timeout), and says hello on every connect and every gateway online state.
"""
import collections
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from shared import auth, wire

T0 = 1767225600000  # 2026-01-01T00:00:00Z


class Entry:
    __slots__ = ("boot", "first", "last", "payload", "n")

    def __init__(self, boot, first, last, payload, n):
        self.boot, self.first, self.last, self.payload, self.n = boot, first, last, payload, n


class FakeDevice:
    def __init__(self, port, dev, prefix="edgeflow", boot=1, inflight=16, resend_s=1.5, fw="fake-1"):
        """port: a tools.broker.Mosquitto (the device is provisioned there and connects with
        TLS and its own credentials) or a plain port number (an insecure broker)."""
        self.dev, self.boot, self.prefix = dev, boot, prefix
        self.topics = wire.Topics(prefix)
        broker = port if hasattr(port, "paho") else None
        self.port = broker.port if broker else port
        self.inflight = inflight
        self.resend_s = resend_s
        self.fw = fw
        self.outbox = []  # Entry, in send order
        self.acked = {}  # boot -> highest contiguous seq acked
        self.next_idx = 0  # first entry never sent
        self.sent_upto = 0  # entries [0, sent_upto) were sent at least once
        self.cursor = 0  # next entry to (re)send
        self.live_from = 0  # entries at or after this index are live (set at hello)
        self.allowance = 0
        self.replay = True
        self.gw_online = False
        self.acks = []  # decoded acks, for assertions
        self.lock = threading.RLock()
        self.last_progress = time.time()
        self.hellos = 0
        self.extra = []  # raw (topic, payload) to publish once, fire and forget
        self.t0 = time.monotonic()
        self.events = collections.deque(maxlen=100)  # (s since creation, what): what a failed test prints
        c = self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fake-" + dev, clean_session=True)
        c.will_set(self.topics.state(dev), wire.encode_state(False), qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = lambda c, u, f, rc, p: self._event("disconnected rc=%s" % rc)
        c.on_message = self._on_message
        self.key = None  # the device's ack_key (auth.Hmac): signs hellos, checks acks
        self.bad_acks = 0
        if broker is not None and not broker.insecure:
            broker.add_devices([dev])
            broker.paho(c, dev)
            self.key = auth.Hmac(bytes.fromhex(broker.device_secrets(dev)["config"]["ack_key"]))

    # ------------------------------------------------------------ workload

    def add_readings(self, readings, boot=None):
        """readings: (seq, t, channel, flags, value) ascending."""
        b = self.boot if boot is None else boot
        self.outbox.append(Entry(b, readings[0][0], readings[-1][0], wire.encode_readings(self.dev, b, readings),
                                 len(readings)))

    def add_records(self, records, boot=None):
        b = self.boot if boot is None else boot
        self.outbox.append(Entry(b, records[0][1], records[-1][1], wire.encode_records(self.dev, b, records),
                                 len(records)))

    # ------------------------------------------------------------ mqtt

    def start(self):
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()

    def _event(self, what):
        self.events.append((round(time.monotonic() - self.t0, 2), what))

    def describe(self):
        """The device's state and recent events, for a failure message."""
        with self.lock:
            return ("%s: acked %s, first unacked entry %d of %d, cursor %d, live_from %d, sent_upto %d, "
                    "allowance %d, replay %s, gw_online %s, hellos %d, bad_acks %d, paho connected %s; "
                    "events %s" % (self.dev, self.acked, self._first_unacked(), len(self.outbox), self.cursor,
                                   self.live_from, self.sent_upto, self.allowance, self.replay, self.gw_online,
                                   self.hellos, self.bad_acks, self.client.is_connected(), list(self.events)))

    def _on_connect(self, client, userdata, flags, rc, props):
        self._event("connected rc=%s" % rc)
        client.subscribe([(self.topics.ack(self.dev), 1), (self.topics.gw_state, 1)])
        client.publish(self.topics.state(self.dev), wire.encode_state(True), qos=1, retain=True)

    def _hello(self):
        with self.lock:
            first_unacked = self._first_unacked()
            self.cursor = first_unacked
            self.live_from = self.sent_upto
            backlog = sum(e.n for e in self.outbox[first_unacked:self.sent_upto])
            nxt = self.outbox[self.sent_upto].first if self.sent_upto < len(self.outbox) else (
                self.outbox[-1].last + 1 if self.outbox else 0)
            if first_unacked < len(self.outbox):
                ob, os_ = self.outbox[first_unacked].boot, self.outbox[first_unacked].first
            else:
                ob, os_ = self.boot, nxt
            self.allowance = 0
            self.hellos += 1
            self._event("hello backlog=%d from entry %d" % (backlog, first_unacked))
        self.client.publish(self.topics.hello(self.dev), wire.encode_hello(
            self.dev, self.boot, nxt, 0, backlog, ob, os_, 0xFA4E, self.hellos, self.fw, self.key), qos=1)

    def _first_unacked(self):
        i = 0
        while i < len(self.outbox) and self.outbox[i].last <= self.acked.get(self.outbox[i].boot, -1):
            i += 1
        return i

    def _on_message(self, client, userdata, msg):
        if msg.topic == self.topics.gw_state:
            online = wire.decode_state(msg.payload, gateway=True)
            was = self.gw_online
            self.gw_online = online
            self._event("gw %s" % ("online" if online else "offline"))
            if online and not was:
                self._hello()
            return
        boot, seq, t, credits, replay, flags, _nonce = wire.decode_ack(msg.payload)
        if self.key is not None and not wire.ack_mac_ok(msg.payload, self.dev.encode(), self.key):
            self.bad_acks += 1  # as the firmware does: a forged ack is ignored
            return
        with self.lock:
            self.acks.append((boot, seq, t, credits, replay, flags))
            self._event("ack %d/%d credits=%d replay=%d flags=%d" % (boot, seq, credits, replay, flags))
            if not flags & wire.ACK_NONE and seq > self.acked.get(boot, -1):
                self.acked[boot] = seq
                self.last_progress = time.time()
            self.replay = replay
            self.allowance = self.allowance + credits if replay else 0

    # ------------------------------------------------------------ sending

    def pump(self):
        """Send what the protocol allows now; returns True when everything is acked."""
        with self.lock:
            if not self.gw_online:
                return False
            for topic, payload in self.extra:
                self.client.publish(topic, payload, qos=1)
            self.extra = []
            fa = self._first_unacked()
            if fa == len(self.outbox):
                return True
            if time.time() - self.last_progress > self.resend_s:
                self._event("resend from entry %d" % fa)
                self.cursor = fa  # acks stalled: resend what is unacked
                self.last_progress = time.time()
            self.cursor = max(self.cursor, fa)
            while self.cursor < len(self.outbox) and self.cursor - fa < self.inflight:
                e = self.outbox[self.cursor]
                if self.cursor < self.live_from:  # backlog: only within credits
                    if not self.replay or self.allowance < e.n:
                        break
                    self.allowance -= e.n
                self.client.publish(self.topics.data(self.dev), e.payload, qos=1)
                self.cursor += 1
                self.sent_upto = max(self.sent_upto, self.cursor)
            return False

    def acked_entries(self):
        """How many outbox entries are acked (the workload's progress)."""
        with self.lock:
            return self._first_unacked()

    def done(self):
        with self.lock:
            return self._first_unacked() == len(self.outbox)


def pump_all(devs, timeout, until=None):
    """Pump devices until all are done (or `until()`); bounded by timeout seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [d.pump() for d in devs]
        if (until() if until else all(done)):
            return True
        time.sleep(0.005)
    return False


def readings(start_seq, n, t0, step_ms=100, channel=0, base_value=20000):
    return [(start_seq + i, t0 + (start_seq + i) * step_ms, channel, 0, base_value + (start_seq + i) % 97)
            for i in range(n)]


def test_fake_device_encodes_valid_messages():
    d = FakeDevice(1, "n1")
    d.add_readings(readings(0, 50, T0))
    mtype, dev, boot, recs = wire.decode_data(d.outbox[0].payload)
    assert (mtype, dev, boot, len(recs)) == (wire.MSG_READINGS, "n1", 1, 50)
    assert d.outbox[0].first == 0 and d.outbox[0].last == 49
