"""The gateway's MQTT client codec and reader (gateway/mqttc.py) without a broker: every
split point of a packet stream, backpressure in the middle of a read, malformed input.
The same client against the real mosquitto: tests/test_gateway_mqtt.py, test_security.py."""
import collections
import random

from firmware import mqtt as M
from gateway.mqttc import Protocol, publish_packet, puback_of


class Owner:
    """What the protocol needs of its owner (the Ingest): a queue, its limit, a mid tag."""

    def __init__(self, maxsize=10 ** 6, hold=False):
        self.events = []
        self.queue = collections.deque()
        self.maxsize = maxsize  # the protocol pauses when the queue holds this many
        self.hold = hold  # leave messages in the queue (backpressure), else taken at once
        self.tag = 0
        self.errors = []
        self.lost = []

    def take(self):
        while self.queue:
            topic, payload, mid, qos, now = self.queue.popleft()
            self.events.append(("msg", bytes(topic), bytes(payload), mid, qos))

    def on_messages(self):
        if not self.hold:
            self.take()

    def on_connack(self, sp, rc):
        self.events.append(("connack", sp, rc))

    def on_suback(self, codes):
        self.events.append(("suback", codes))

    def on_protocol_error(self, detail):
        self.errors.append(detail)

    def on_lost(self, proto, exc):
        self.lost.append(exc)


class Transport:
    def __init__(self):
        self.out = bytearray()
        self.reading = True
        self.aborted = False

    def write(self, b):
        self.out += b

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def abort(self):
        self.aborted = True

    def close(self):
        pass


def _proto(owner):
    p = Protocol(owner)
    p.connection_made(Transport())
    return p


def _stream():
    """Packets as the broker sends them, with the events they must give."""
    pk, ev = [], []
    pk.append(b"\x20\x02\x01\x00")
    ev.append(("connack", 1, 0))
    pk.append(b"\x90\x05\x00\x01\x01\x01\x80")
    ev.append(("suback", b"\x01\x01\x80"))
    rnd = random.Random(5)
    for i, size in enumerate((0, 1, 100, 126, 127, 128, 16383, 16384, 70000, 2097152)):
        topic = ("edgeflow/d/dev%d/data" % i).encode()
        payload = bytes(rnd.getrandbits(8) for _ in range(min(size, 300))) * (size // 300 + 1)
        payload = payload[:size]
        qos = i % 2
        mid = (i * 7919) % 65535 + 1 if qos else 0
        pk.append(publish_packet(topic, payload, qos, i % 3 == 0, False, mid))
        ev.append(("msg", topic, payload, mid, qos))
    pk.append(b"\x40\x02\x12\x34")  # PUBACK of one of ours: no event
    pk.append(b"\xd0\x00")  # PINGRESP
    return pk, ev


def test_every_split_point_and_random_chunks_give_the_same_messages():
    pk, ev = _stream()
    small = b"".join(pk[:6]) + pk[-2] + pk[-1]  # every split point of the short packets
    small_ev = ev[:6]
    for cut in range(1, len(small)):
        o = Owner()
        p = _proto(o)
        p.data_received(small[:cut])
        p.data_received(small[cut:])
        assert o.events == small_ev and not o.errors, cut
        assert p.buf == b""
    data = b"".join(pk)
    rnd = random.Random(1)
    for _ in range(5):
        o = Owner()
        p = _proto(o)
        i = 0
        while i < len(data):
            n = rnd.choice((1, 2, 3, 7, 1000, 65536, 262144))
            p.data_received(data[i:i + n])
            i += n
        assert o.events == ev and not o.errors and p.buf == b""


def test_backpressure_stops_in_the_middle_of_a_read_and_loses_nothing():
    pk, ev = _stream()
    msgs = [e for e in ev if e[0] == "msg"]
    o = Owner(maxsize=3, hold=True)
    p = _proto(o)
    p.data_received(b"".join(pk))  # one read holds every packet
    o.take()
    got = [e for e in o.events if e[0] == "msg"]
    assert got == msgs[:3] and p.paused and not p.tr.reading  # the socket is no longer read
    p.data_received(b"")  # asyncio may still deliver what it had: kept, not parsed
    assert not o.queue
    o.maxsize, o.hold = 10 ** 6, False
    p.resume()
    assert [e for e in o.events if e[0] == "msg"] == msgs and p.tr.reading and p.buf == b""
    # pausing again on every message: still each exactly once, in order
    o = Owner(maxsize=1, hold=True)
    p = _proto(o)
    p.data_received(b"".join(pk))
    for _ in range(len(msgs)):
        assert len(o.queue) == 1 and p.paused
        o.take()
        p.resume()
    assert [e for e in o.events if e[0] == "msg"] == msgs and not o.queue


def test_malformed_packets_close_the_connection_with_the_reason():
    bad = [
        b"\x32\x04\x00\x09ab",  # topic longer than the packet
        b"\x32\x03\x00\x01a",  # QoS 1 without a packet id
        b"\x34\x05\x00\x01a\x00\x01",  # QoS 2 (subscribed at QoS 1)
        b"\x30\x00",  # empty PUBLISH
        b"\x20\x00",  # empty CONNACK
        b"\x30\xff\xff\xff\xff\x01",  # remaining length over 4 bytes
        b"\x30\xff\xff\xff\x7f",  # 256 MB announced
    ]
    for b in bad:
        o = Owner()
        p = _proto(o)
        p.data_received(b + b"\xd0\x00")
        assert o.errors and p.tr.aborted and not o.events, b
    # a good message before the bad one is delivered
    o = Owner()
    p = _proto(o)
    p.data_received(publish_packet(b"t", b"x", 1, False, False, 5) + bad[0])
    assert o.events == [("msg", b"t", b"x", 5, 1)] and o.errors


def test_packet_ids_skip_those_in_flight_and_run_out_boundedly():
    o = Owner()
    p = _proto(o)
    assert [p.publish("t", b"x") for _ in range(3)] == [1, 2, 3]
    p.data_received(b"\x40\x02\x00\x02")  # PUBACK 2
    assert p.is_published(2) and not p.is_published(1)
    p._pid = 65534
    assert p.publish("t", b"x") == 65535 and p.publish("t", b"x") == 2  # wraps, skips 1 and 3 in flight
    p.inflight = set(range(1, 65536))
    assert p.publish("t", b"x") is None and p.next_pid() is None  # all in flight: refused, not blocked
    assert p.publish("t", b"x", qos=0) == 0


def test_puback_batch():
    assert puback_of([(7, 1), (8, 0), (65535, 1)], 0) == M.puback_packet(7) + M.puback_packet(65535)
    assert puback_of([(8, 0)], 0) == b""


def test_ingest_uses_no_private_api_of_a_library():
    """The rule of the project: no library's private API. The MQTT ingest once subclassed
    paho's Client to override `_sock_recv` and read `MQTTMessage._topic`."""
    import ast
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("gateway/ingest.py", "gateway/mqttc.py"):
        tree = ast.parse(open(os.path.join(root, name)).read())
        third = set()  # names bound to third-party modules
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                for a in node.names:
                    mod = (node.module if isinstance(node, ast.ImportFrom) else a.name).split(".")[0]
                    if mod not in sys.stdlib_module_names and mod not in ("gateway", "shared", "firmware"):
                        third.add((a.asname or a.name).split(".")[0])
        bad = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    bad.append("%s:%d .%s" % (name, node.lineno, node.attr))
            if isinstance(node, ast.ClassDef):
                for b in node.bases:
                    while isinstance(b, ast.Attribute):
                        b = b.value
                    if isinstance(b, ast.Name) and b.id in third:
                        bad.append("%s:%d class %s subclasses a library class" % (name, node.lineno, node.name))
        assert not bad, bad


def test_puback_only_on_the_connection_that_delivered_the_message():
    """After a reconnect the broker resends unacked messages under their packet ids and may
    reuse an id once acked: a PUBACK for a message of the old connection must not go out."""
    import asyncio

    from gateway.config import Config
    from gateway.ingest import Ingest
    from gateway.metrics import Stats

    async def go():
        ing = Ingest(Config({"security": {"insecure": True}}), Stats())
        ing._loop = asyncio.get_running_loop()
        sent = []
        for conn in (1, 2):
            p = _proto(ing)
            ing.proto, ing._conn = p, conn
            p.data_received(publish_packet(b"edgeflow/d/a/data", b"x", 1, False, False, 7))
            sent.append(p.tr.out)
        old, new = ing.queue[0][2], ing.queue[1][2]
        ing.puback([(old, 1)])  # committed late, after the reconnect: not sent
        await asyncio.sleep(0)  # a step's writes go out at its end
        assert bytes(sent[1]) == b""
        ing.puback([(new, 1), (old, 1)])
        await asyncio.sleep(0)
        assert bytes(sent[1]) == b"\x40\x02\x00\x07" and bytes(sent[0]) == b""
    asyncio.run(go())


def test_refused_connack_closes_and_backs_off():
    import asyncio

    from gateway.config import Config
    from gateway.ingest import Ingest
    from gateway.metrics import Stats

    async def go():
        ing = Ingest(Config({"security": {"insecure": True}}), Stats())
        ing._loop = asyncio.get_running_loop()
        for n in (1, 2, 3):
            p = _proto(ing)
            ing.proto = p
            p.data_received(b"\x20\x02\x00\x05")  # CONNACK: not authorized
            assert p.tr.aborted and not ing.connected.is_set() and ing._refused == n
            assert ing.last_error == "CONNACK refused, code 5"
        p = _proto(ing)
        ing.proto = p
        p.data_received(b"\x20\x02\x00\x00")
        assert ing.connected.is_set() and ing._refused == 0
        await asyncio.sleep(0)  # a step's writes go out at its end
        assert bytes(p.tr.out).startswith(b"\x82")  # SUBSCRIBE, then the retained online state
    asyncio.run(go())


def test_no_connack_is_a_dead_connection_and_no_ping_goes_before_it():
    """A broker that accepts TCP, reads CONNECT and never answers: the client gives up after
    min(keepalive, 10) s (reconnecting with backoff) and sends no PINGREQ before a CONNACK."""
    import asyncio

    from gateway.config import Config
    from gateway.ingest import Ingest
    from gateway.metrics import Stats

    async def go():
        ing = Ingest(Config({"security": {"insecure": True}, "mqtt": {"keepalive": 30}}), Stats())
        ing._loop = asyncio.get_running_loop()
        p = _proto(ing)
        ing.proto = p
        p.write(ing._connect)
        t0 = p.last_tx
        for dt in (1, 5, 9.9):
            ing.check_connection(t0 + dt)
            assert not p.tr.aborted and p.ping_sent is None
        await asyncio.sleep(0)  # a step's writes go out at its end
        assert bytes(p.tr.out) == ing._connect  # no PINGREQ
        ing.check_connection(t0 + 10.1)
        assert p.tr.aborted and ing.last_error == "no CONNACK within 10 s"
        # connected: the keepalive rules apply, not the CONNACK timeout
        p = _proto(ing)
        ing.proto = p
        p.data_received(b"\x20\x02\x00\x00")
        t1 = p.last_tx
        ing.check_connection(t1 + 20)
        assert not p.tr.aborted and p.ping_sent is None
        ing.check_connection(t1 + 30)
        await asyncio.sleep(0)
        assert p.ping_sent is not None and bytes(p.tr.out).endswith(b"\xc0\x00")
    asyncio.run(go())


def test_connection_lost_before_the_connect_attempt_returns_is_retried():
    """The broker closes a connection just after accepting it (restarting, overloaded) and
    the loss is delivered before the connect attempt resumes: on Python 3.11 asyncio.wait_for
    adds loop iterations between connection_made and the attempt's return. The loss must
    count as a failed attempt and be retried, not leave a dead connection as the current one
    (nothing would reconnect it: the gateway stalls for good)."""
    import asyncio

    from gateway.config import Config
    from gateway.ingest import Ingest
    from gateway.metrics import Stats

    async def broker(reader, writer):  # CONNACK for every CONNECT, then reads until closed
        try:
            while True:
                head = await reader.readexactly(2)
                n, shift, c = 0, 0, head[1]
                while True:
                    n |= (c & 0x7F) << shift
                    if not c & 0x80:
                        break
                    shift += 7
                    c = (await reader.readexactly(1))[0]
                await reader.readexactly(n)
                if head[0] >> 4 == 1:
                    writer.write(b"\x20\x02\x00\x00")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    class Loop:
        """The running loop; its first connection is closed by the peer at once (fault injection)."""
        def __init__(self, loop):
            self.loop, self.dropped = loop, 0

        def __getattr__(self, name):
            return getattr(self.loop, name)

        async def create_connection(self, factory, *a, **kw):
            tr, proto = await self.loop.create_connection(factory, *a, **kw)
            if not self.dropped:
                self.dropped += 1
                tr.abort()
                await asyncio.sleep(0)  # the loss is delivered first
            return tr, proto

    async def go():
        server = await asyncio.start_server(broker, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ing = Ingest(Config({"security": {"insecure": True}, "mqtt": {"port": port}}), Stats())
        loop = Loop(asyncio.get_running_loop())
        ing._loop = loop
        try:
            await ing._connect_with_backoff()
            for _ in range(300):  # bounded: 3 s, the first retry comes after 0.05-0.1 s
                if ing.is_connected():
                    break
                await asyncio.sleep(0.01)
            assert loop.dropped == 1
            assert ing.is_connected() and ing.stats.connects == 1, (
                "not reconnected after a connection lost during the attempt: proto %r closed %s, reconnect %r" % (
                    ing.proto, ing.proto is not None and ing.proto.closed, ing._reconnect))
        finally:
            ing.closing = True
            if ing.proto is not None:
                ing.proto.disconnect()
            server.close()
            await server.wait_closed()
    asyncio.run(go())


def test_writes_of_one_loop_step_go_out_as_one_transport_write_in_order():
    import asyncio

    async def go():
        o = Owner()
        p = _proto(o)
        writes = []
        p.tr.write = writes.append
        p.tr.close = lambda: None
        assert p.publish("t", b"a") == 1 and p.publish("t", b"b", qos=0) == 0
        p.write(puback_of([(9, 1)], 0))
        assert writes == []  # not yet: at the end of this step
        await asyncio.sleep(0)
        assert writes == [publish_packet("t", b"a", 1, False, False, 1) + publish_packet("t", b"b", 0, False, False, 0)
                          + b"\x40\x02\x00\x09"]
        p.write(b"\xc0\x00")
        p.disconnect()  # flushes first: DISCONNECT is last
        assert writes[1:] == [b"\xc0\x00", b"\xe0\x00"]
    asyncio.run(go())


def _cutters():
    """The pure packet cutter and, if built, its compiled twin (gateway._c_mqttc, accel)."""
    import importlib

    from gateway import mqttc
    try:
        return [mqttc, importlib.import_module("gateway._c_mqttc")]
    except ImportError:
        return [mqttc]


_INFLIGHT = frozenset(range(0, 65536, 7)) | {0x1234}  # our publishes awaiting a PUBACK


def _cut_all(mod, buf, limit=10 ** 6):
    """cut() over all of buf as the protocol drives it: (steps, queued messages, error)."""
    q = collections.deque()
    steps = []
    off = 0
    inflight = set(_INFLIGHT)
    try:
        while True:
            off, kind, o, end = mod.cut(buf, off, q, limit, 7 << 16, 1.5, inflight)
            steps.append((off, kind, o, end))
            if kind < 0:
                break
        err = None
    except Exception as e:  # noqa: BLE001 - compared between the two builds
        err = (type(e).__name__, str(e))
    return steps, list(q), err, sorted(_INFLIGHT - inflight)  # + the ids PUBACKed


def _hostile_buffers():
    """Every remaining-length limit, every truncation point, lying topic lengths, garbage."""
    out = []
    for ln in (0, 1, 2, 3, 127, 128, 129, 16383, 16384, 2097151, 2097152, 16 * 1024 * 1024,
               16 * 1024 * 1024 + 1, 268435455):
        rl = M.varlen(ln)
        for first in (0x30, 0x32, 0x34, 0x20, 0x40, 0x90, 0xd0, 0x00, 0xf0):
            body = b"\x00\x03abc\x00\x09" + bytes(ln - 7) if ln <= 16384 and ln >= 7 else bytes(min(ln, 16384))
            out.append(bytes((first,)) + rl + body)  # whole, or cut short for the large ones
            out.append(bytes((first,)) + rl)  # header alone
    out += [b"\x30\x80\x80\x80\x80\x01", b"\x30\xff\xff\xff\xff", b"\x30\xff\xff\xff", b"\x30\x80\x00",
            b"\x30\x80\x80\x80\x00", b"\x32\x04\xff\xff\x00\x01", b"\x32\x05\x00\x02ab\x00", b"\x32\x06\x00\x02ab\x00\x00",
            b"\x30\x02\x00\x00", b"\x30\x02\x00\x01", b"\x36\x04\x00\x00\x00\x01", b"\x31\x03\x00\x00x"]
    pk, _ = _stream()
    stream = b"".join(pk[:6]) + pk[-2] + pk[-1]
    out += [stream[:k] for k in range(len(stream) + 1)]  # truncated at every byte
    rnd = random.Random(16)
    for _ in range(3000):
        b = bytearray(rnd.getrandbits(8) for _ in range(rnd.randrange(2, 40)))
        if rnd.random() < 0.7:  # mostly plausible PUBLISH headers, so the checks past the length are reached
            b[0] = rnd.choice((0x30, 0x31, 0x32, 0x33, 0x34, 0x40, 0x20, 0x90))
            b[1] = rnd.randrange(0, 40) if rnd.random() < 0.8 else b[1]
        out.append(bytes(b))
    return out


def test_the_compiled_cutter_equals_the_pure_one_on_hostile_input():
    """The broker's bytes are untrusted: both builds of cut() give the same packets, stops and
    errors on every hostile buffer; none reads past the buffer or accepts more than MAX_PACKET."""
    from gateway import mqttc
    mods = _cutters()
    bufs = _hostile_buffers()
    errors = 0
    for buf in bufs:
        results = [_cut_all(m, buf) for m in mods]
        assert all(r == results[0] for r in results[1:]), (buf[:40], results)
        steps, queued, err, acked = results[0]
        errors += err is not None
        for off, kind, o, end in steps:
            assert 0 <= off <= len(buf) and (kind < 0 or o <= end <= len(buf))
        for topic, payload, mid, qos, now in queued:
            assert qos in (0, 1) and mid >> 16 == 7 and len(topic) + len(payload) < len(buf)
    assert errors > 100
    # cut at every byte: the whole packets before the cut, then a stop at the cut one's start
    pk, ev = _stream()
    pk = pk[:6] + pk[-2:]
    stream = b"".join(pk)
    ends = [sum(map(len, pk[:i + 1])) for i in range(len(pk))]
    for k in range(len(stream) + 1):
        whole = [e for e in ends if e <= k]
        steps, queued, err, acked = _cut_all(mods[-1], stream[:k])
        assert acked == ([0x1234] if k >= ends[6] else [])  # the PUBACK of one of ours
        assert err is None and steps[-1] == ((whole or [0])[-1], mqttc.MORE, 0, 0), k
        assert [(bytes(t), bytes(p), mid & 0xFFFF, qos) for t, p, mid, qos, _ in queued] == \
            [e[1:] for e in ev[:min(len(whole), 6)] if e[0] == "msg"]  # the last two give no event
    # the limit of the queue: exactly `limit` messages, then FULL, the rest left in the buffer
    pk, ev = _stream()
    data = b"".join(pk)
    for m in mods:
        steps, queued, err, acked = _cut_all(m, data, limit=3)
        assert steps[-1][1] == m.FULL and len(queued) == 3 and err is None
        assert [(bytes(t), bytes(p), mid & 0xFFFF, qos) for t, p, mid, qos, _ in queued] == \
            [e[1:] for e in ev if e[0] == "msg"][:3]
    # too large announced: refused from the header alone, before any of its body is buffered
    for m in mods:
        assert _cut_all(m, b"\x30" + M.varlen(mqttc.MAX_PACKET + 1))[2] == (
            "ProtocolError", "packet of %d bytes" % (mqttc.MAX_PACKET + 1))
        assert _cut_all(m, b"\x30" + M.varlen(mqttc.MAX_PACKET))[0] == [(0, m.MORE, 0, 0)]


def test_puback_of_equals_the_firmware_encoder_at_every_limit():
    from gateway import mqttc
    mids = [(1 | 2 << 16, 1), (65535 | 2 << 16, 1), (7 | 2 << 16, 0), (9 | 3 << 16, 1), (65535, 1), (0xFFFF | 0xFFFF << 16, 1)]
    for m in _cutters():
        assert m.puback_of(mids, 2) == M.puback_packet(1) + M.puback_packet(65535)
        assert m.puback_of(mids, 0) == M.puback_packet(65535) and m.puback_of(mids, 0xFFFF) == M.puback_packet(65535)
        assert m.puback_of([], 2) == b"" == mqttc.puback_of(mids, 5)
