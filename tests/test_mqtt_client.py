"""firmware/mqtt.py (the device's asyncio MQTT client) under CPython against a real mosquitto."""
import asyncio

import pytest

from firmware.mqtt import MQTTClient, MQTTError

pytestmark = pytest.mark.broker


@pytest.fixture
def broker(open_broker):
    """Protocol mechanics (free topics and client ids): the anonymous broker. This client's
    TLS and credentials against the secure broker: tests/test_security.py."""
    return open_broker


def run(coro, timeout=40):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Inbox:
    def __init__(self):
        self.msgs = []

    def __call__(self, topic, payload, retain):
        self.msgs.append((topic, payload, retain))

    async def wait(self, n, timeout=10):
        for _ in range(int(timeout * 100)):
            if len(self.msgs) >= n:
                return True
            await asyncio.sleep(0.01)
        return False


def test_publish_subscribe_qos0_qos1_retained(broker):
    async def main():
        inbox = Inbox()
        sub = MQTTClient("sub1", "127.0.0.1", broker.port, keepalive=10, on_message=inbox)
        await sub.connect()
        assert await sub.subscribe("t/#", 1) == 1
        pub = MQTTClient("pub1", "127.0.0.1", broker.port, keepalive=10)
        await pub.connect()
        await pub.publish("t/a", b"zero", 0)
        for i in range(50):
            await pub.publish("t/b", b"%d" % i, 1)
        await pub.publish("t/r", b"kept", 1, retain=True)
        assert await pub.wait_inflight(5)
        assert pub.pubacks == 51
        assert await inbox.wait(52)
        assert [m[1] for m in inbox.msgs if m[0] == "t/b"] == [b"%d" % i for i in range(50)]
        # a new subscriber gets the retained message with the retain flag
        inbox2 = Inbox()
        sub2 = MQTTClient("sub2", "127.0.0.1", broker.port, on_message=inbox2)
        await sub2.connect()
        await sub2.subscribe("t/r", 1)
        assert await inbox2.wait(1)
        assert inbox2.msgs[0] == ("t/r", b"kept", True)
        for c in (sub, sub2, pub):
            await c.disconnect()
        assert not pub.connected
    run(main())


def test_last_will_on_abrupt_close_not_on_disconnect(broker):
    async def main():
        inbox = Inbox()
        sub = MQTTClient("w-sub", "127.0.0.1", broker.port, on_message=inbox)
        await sub.connect()
        await sub.subscribe("w/#", 1)
        a = MQTTClient("w-a", "127.0.0.1", broker.port, will=("w/a", b"gone", 1, False))
        await a.connect()
        await a.disconnect()
        b = MQTTClient("w-b", "127.0.0.1", broker.port, will=("w/b", b"gone", 1, False))
        await b.connect()
        b.close()  # no DISCONNECT: the broker publishes the will
        assert await inbox.wait(1)
        await asyncio.sleep(0.3)
        assert inbox.msgs == [("w/b", b"gone", False)]
        await sub.disconnect()
    run(main())


def test_keepalive_pings_keep_the_connection(broker):
    async def main():
        c = MQTTClient("ka", "127.0.0.1", broker.port, keepalive=1)
        await c.connect()
        await asyncio.sleep(2.6)
        assert c.connected and c.pings >= 2
        await c.disconnect()
    run(main())


def test_connect_refused_when_broker_down(broker):
    async def main():
        broker.stop()
        c = MQTTClient("down", "127.0.0.1", broker.port, timeout_ms=1000)
        with pytest.raises(OSError):
            await c.connect()
        assert not c.connected
        with pytest.raises(MQTTError):
            await c.publish("x", b"", 0)
    run(main())


def test_broker_restart_mid_stream_loses_nothing(broker):
    """A QoS 1 stream survives a broker crash/restart: the publishes the broker never
    acknowledged are retransmitted with DUP after the reconnect and reach the subscriber.
    (The broker here cannot persist sessions, so the subscriber resubscribes first.)"""
    import signal
    N = 300
    CUT = 100

    async def reconnect(c, sub=False):
        for _ in range(150):
            try:
                await c.connect()
                if sub:
                    await c.subscribe("s/#", 1)
                return
            except (OSError, MQTTError, asyncio.TimeoutError):
                await asyncio.sleep(0.1)
        raise AssertionError("no reconnect")

    async def main():
        loop = asyncio.get_running_loop()
        inbox = Inbox()
        sub = MQTTClient("rs-sub", "127.0.0.1", broker.port, on_message=inbox, timeout_ms=2000)
        await reconnect(sub, True)
        pub = MQTTClient("rs-pub", "127.0.0.1", broker.port, max_inflight=20, timeout_ms=2000)
        await pub.connect()
        for i in range(CUT):
            await pub.publish("s/n", b"%d" % i, 1)
        assert await pub.wait_inflight(5) and await inbox.wait(CUT)
        # freeze the broker: these publishes are written but never acknowledged
        broker.proc.send_signal(signal.SIGSTOP)
        for i in range(CUT, CUT + 10):
            await pub.publish("s/n", b"%d" % i, 1)
        assert len(pub.inflight) == 10
        broker.proc.kill()
        await loop.run_in_executor(None, broker.proc.wait)
        broker.stop(hold_port=True)  # already dead: keeps its port from other processes until start()
        # the subscriber must be back before the publisher: a new broker drops what nobody
        # subscribes to (under load the subscriber's reader saw the dead socket late)
        for _ in range(500):
            if not sub.connected:
                break
            await asyncio.sleep(0.01)
        assert not sub.connected
        # from the loop's (main) thread: mosquitto's parent-death signal is tied to the thread
        # that forks it, and a pool thread exits when the loop closes (killing the broker)
        broker.start()
        await reconnect(sub, True)
        i = CUT + 10
        while i < N:
            if not sub.connected:
                await reconnect(sub, True)
            if not pub.connected:
                await reconnect(pub)
            try:
                await pub.publish("s/n", b"%d" % i, 1)
                i += 1
            except MQTTError:
                await asyncio.sleep(0.05)
        assert await pub.wait_inflight(5)
        assert pub.retransmits >= 10 and pub.connects == 2
        assert await inbox.wait(N, 10)
        got = [int(m[1]) for m in inbox.msgs]
        assert set(got) == set(range(N)), sorted(set(range(N)) - set(got))[:20]
        await pub.disconnect()
        await sub.disconnect()
    run(main(), 60)


def test_dead_broker_detected_while_a_publish_is_blocked_then_reconnects(broker):
    """mosquitto frozen with SIGSTOP (host gone without closing TCP) while a publish is stuck
    in drain() on a full send buffer: the keepalive check does not wait behind the send lock,
    the client drops the connection within 1.5 x keepalive (+ one check interval) and connects
    again once the broker runs (issue 11.5)."""
    import os
    import signal
    import time

    ka = 2

    async def main():
        c = MQTTClient("frozen1", "127.0.0.1", broker.port, keepalive=ka, timeout_ms=60000)
        await c.connect()
        pid = broker.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            blob = b"x" * 65536

            async def flood():
                for i in range(2000):  # bounded: the socket buffers fill long before
                    await c.publish("frozen/t", blob, 0)

            t_stop = time.monotonic()
            pub = asyncio.create_task(flood())
            # the publish blocks (buffer full) while the broker is frozen
            while not c._lock.locked() and not pub.done():
                await asyncio.sleep(0.01)
            assert not pub.done(), "publishes never blocked"
            while c.connected and time.monotonic() - t_stop < 10 * ka:
                await asyncio.sleep(0.05)
            took = time.monotonic() - t_stop
            assert not c.connected, "dead connection not detected in %.1f s" % took
            assert took <= 1.5 * ka + 1.5, took  # 1.5 x keepalive + the pinger's check interval
            with pytest.raises(Exception):
                await asyncio.wait_for(pub, 5)  # the blocked publish ends too, with an error
            assert "keepalive" in str(c.last_error)
        finally:
            os.kill(pid, signal.SIGCONT)
        await c.connect()  # the broker runs again: a fresh session
        assert c.connected
        await c.publish("frozen/t", b"again", 1)
        assert await c.wait_inflight(5)
        await c.disconnect()

    run(main(), timeout=60)


class _Writer:
    def __init__(self):
        self.out = bytearray()

    def write(self, b):
        self.out.extend(b)

    async def drain(self):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("retransmit", [True, False])
def test_inflight_keeps_packets_only_for_retransmission(retransmit):
    """retransmit=False (the uplink: its outbox replays what was not acked) keeps only the
    packet ids of in-flight QoS 1 publishes, not their bytes (up to max_inflight packets of
    RAM on the board), and resends nothing after a reconnect; the default keeps and resends
    them with DUP."""
    writers = []

    async def opener(host, port):
        r = asyncio.StreamReader()
        r.feed_data(b"\x20\x02\x00\x00")  # CONNACK, accepted
        w = _Writer()
        writers.append(w)
        return r, w

    async def main():
        c = MQTTClient("c", "127.0.0.1", 1883, open_connection=opener, resolver=None, max_inflight=4,
                       retransmit=retransmit)
        await c.connect()
        for i in range(3):
            await c.publish("t", b"payload-%d" % i * 20, 1)  # never acknowledged
        assert [p[0] for p in c.inflight] == [1, 2, 3]
        kept = [p[1] for p in c.inflight]
        c.close()
        await c.connect()
        c.close()
        return c, kept

    c, kept = run(main(), 10)
    if retransmit:
        assert all(len(p) > 180 for p in kept) and c.retransmits == 3
        out = writers[1].out  # CONNECT, then the three publishes again
        assert out.count(b"payload-0") == 20 and out[2 + out[1]] == 0x3A  # PUBLISH, DUP, QoS 1
    else:
        assert kept == [None, None, None] and c.retransmits == 0
        assert b"payload" not in writers[1].out


def test_uplink_client_leaves_resends_to_the_outbox():
    from firmware.app import App
    from firmware.hal_sim import SimHal
    app = App({"device_id": "n1", "broker": {"host": "127.0.0.1"}, "insecure": True}, SimHal())
    app._boot()
    assert app.uplink.client.retransmit is False


class _ResetWriter:
    """A stream writer whose connection was reset: every drain() fails."""

    def __init__(self):
        self.closed = False

    def write(self, data):
        pass

    async def drain(self):
        raise OSError(104, "ECONNRESET")

    def close(self):
        self.closed = True


def test_failed_write_drops_the_connection_and_never_raises():
    # the keepalive's ping runs MQTTClient._send as a task of its own: a failed write must drop
    # the connection and return False (an exception there would be an unretrieved task error);
    # publish then raises MQTTError
    async def main():
        c = MQTTClient("id", "127.0.0.1", 1, timeout_ms=500)
        c.connected, c._w = True, _ResetWriter()
        w = c._w
        assert await c._send(b"\xc0\x00") is False
        assert not c.connected and w.closed and isinstance(c.last_error, OSError)
        assert await c._send(b"\xc0\x00") is False  # not connected: nothing written
        c.connected, c._w = True, _ResetWriter()
        with pytest.raises(MQTTError):
            await c.publish("t", b"x", 1)
        assert not c.connected and not c._lock.locked()
    run(main())


def test_next_pid_skips_ids_in_flight_and_wraps():
    c = MQTTClient("id", "127.0.0.1", 1)
    c._pid = 65534
    c.inflight = [[65535, None], [1, None]]
    assert c._next_pid() == 2 and c._next_pid() == 3
