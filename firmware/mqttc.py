# The MQTT client's connect-time code (firmware/mqtt.py): CONNECT / SUBSCRIBE packets, DNS,
# the connect and subscribe handshakes, the client's set-up, the rare packet types, and split()
# for tests and tools. MQTTClient imports it on demand and unloads it after (RAM: the steady
# send path stays in firmware/mqtt.py).
import struct
import asyncio

from firmware.hal import ticks_ms, close_stream
from firmware.mqtt import MQTTError, _s, varlen, parse


def decode_varlen(buf, off=0):
    """(value, offset after) from buf at off; raises MQTTError if truncated or too long."""
    n = 0
    mult = 1
    for i in range(4):
        if off >= len(buf):
            raise MQTTError("truncated length")
        b = buf[off]
        off += 1
        n += (b & 0x7F) * mult
        if not b & 0x80:
            return n, off
        mult *= 128
    raise MQTTError("length over 4 bytes")


def connect_packet(client_id, keepalive=30, clean=True, will=None, user=None, password=None):
    """will: (topic, payload, qos, retain) or None."""
    flags = 0x02 if clean else 0
    payload = _s(client_id)
    if will is not None:
        topic, msg, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += _s(topic) + _s(msg)
    if user is not None:
        flags |= 0x80
        payload += _s(user)
        if password is not None:
            flags |= 0x40
            payload += _s(password)
    body = b"\x00\x04MQTT\x04" + bytes((flags,)) + struct.pack(">H", keepalive) + payload  # protocol name, level 4
    return b"\x10" + varlen(len(body)) + body  # CONNECT


def set_dup(packet):
    """The same PUBLISH with the DUP flag set (retransmission)."""
    return bytes((packet[0] | 0x08,)) + packet[1:]


def subscribe_packet(pid, topics):
    """topics: list of (topic, qos)."""
    body = struct.pack(">H", pid)
    for t, q in topics:
        body += _s(t) + bytes((q,))
    return b"\x82" + varlen(len(body)) + body  # SUBSCRIBE


def split(buf):
    """Parse a byte stream into packets (for tests and tools)."""
    out = []
    off = 0
    while off < len(buf):
        first = buf[off]
        n, o = decode_varlen(buf, off + 1)
        if o + n > len(buf):
            raise MQTTError("truncated packet")
        out.append(parse(first, buf[o:o + n]))
        off = o + n
    return out


def resolve(host, port):
    """IP address of host (a literal is returned as is; DNS once per call). None if unknown.
    Blocking on MicroPython: the client calls it once and caches the answer."""
    parts = host.split(".")
    if len(parts) == 4:
        lit = True
        for p in parts:
            if not p.isdigit():
                lit = False
        if lit:
            return host
    try:
        import socket
        return socket.getaddrinfo(host, port)[0][-1][0]
    except Exception:  # no DNS (or no socket module): let open_connection try the name
        return None


async def connect(cl):
    """Open the connection, CONNECT, wait for CONNACK, retransmit in-flight QoS 1 (DUP)."""
    if cl.connected:
        return
    t = cl.timeout_ms / 1000
    res = resolve if cl.resolver == "dns" else cl.resolver
    if cl.addr is None and res is not None:
        cl.addr = res(cl.host, cl.port)
    try:
        r, w = await asyncio.wait_for(cl.open_connection(cl.addr or cl.host, cl.port), t)
    except BaseException:
        cl.addr = None  # refresh the DNS answer next time
        raise
    try:
        w.write(connect_packet(cl.client_id, cl.keepalive, cl.clean, cl.will, cl.user, cl.password))
        await asyncio.wait_for(w.drain(), t)
        pkt = await asyncio.wait_for(cl._read_packet(r), t)
    except BaseException:
        close_stream(w)
        cl.addr = None
        raise
    if pkt[0] != "connack" or pkt[2] != 0:
        close_stream(w)
        raise MQTTError("connect refused: %r" % (pkt,))
    cl._w = w
    cl.connected = True
    cl.connects += 1
    cl._last_rx = cl._last_tx = ticks_ms()
    cl._tasks = [asyncio.create_task(cl._reader(r)), asyncio.create_task(cl._pinger())]
    for p in list(cl.inflight):
        if p[1] is None:
            continue  # retransmit=False: the owner resends
        p[1] = set_dup(p[1])
        cl.retransmits += 1
        if not await cl._send(p[1]):  # it dropped the connection
            raise MQTTError("retransmit failed: %r" % (cl.last_error,))


async def subscribe(cl, topic, qos=1):
    pid = cl._next_pid()
    ev = asyncio.Event()
    cl._subacks[pid] = [ev, None]
    try:
        if not await cl._send(subscribe_packet(pid, [(topic, qos)])):
            raise MQTTError("subscribe failed: %r" % (cl.last_error,))
        await asyncio.wait_for(ev.wait(), cl.timeout_ms / 1000)
        codes = cl._subacks[pid][1]
    finally:
        cl._subacks.pop(pid, None)
    if codes is None or codes[0] == 0x80:
        raise MQTTError("subscribe refused: %s" % topic)
    return codes[0]


def init(c, client_id, host, port, keepalive, will, clean, user, password, open_connection, on_message,
         max_inflight, timeout_ms, resolver, retransmit):
    """MQTTClient.__init__ (firmware/mqtt.py)."""
    c.client_id = client_id
    c.host = host
    c.port = port
    c.keepalive = keepalive
    c.will = will
    c.clean = clean
    c.user = user
    c.password = password
    c.open_connection = open_connection or asyncio.open_connection
    c.on_message = on_message
    c.max_inflight = max_inflight
    c.timeout_ms = timeout_ms
    c.resolver = resolver
    # False: in-flight QoS 1 publishes keep only their packet id (flow control), not the
    # packet, and are not resent after a reconnect (the owner replays them: the uplink's
    # outbox does): up to max_inflight packets less in RAM
    c.retransmit = retransmit
    c.addr = None  # the broker's address, resolved once (again after a failed connect)
    c.connected = False
    c.inflight = []  # [pid, packet or None] awaiting PUBACK, oldest first (bounded)
    c._pid = 0
    c._w = None
    c._lock = asyncio.Lock()
    c._tasks = []
    c._subacks = {}
    c._last_rx = 0
    c._last_tx = 0
    c.last_error = None
    # counters
    c.connects = 0
    c.pubacks = 0
    c.retransmits = 0
    c.pings = 0


def parse_rare(t, body):
    """mqtt.parse for CONNACK, SUBACK, UNSUBACK, PINGREQ and unknown types."""
    if t == 2:  # CONNACK
        if len(body) != 2:
            raise MQTTError("bad connack")
        return ("connack", body[0] & 1, body[1])
    if t == 9:  # SUBACK
        if len(body) < 3:
            raise MQTTError("bad suback length")
        return ("suback", (body[0] << 8) | body[1], tuple(body[2:]))
    if t == 11:  # UNSUBACK
        return ("unsuback", (body[0] << 8) | body[1])
    if t == 12:  # PINGREQ
        return ("pingreq",)
    raise MQTTError("unexpected packet type %d" % t)
