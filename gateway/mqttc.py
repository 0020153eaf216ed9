"""The gateway's MQTT 3.1.1 client: an asyncio Protocol (public asyncio API only).

Why not paho (docs/benchmarks.md, "MQTT client"): paho reads each packet header a byte
per system call; fixing that needed its private API (`_sock_recv`, `_sock`,
`MQTTMessage._topic`). Here every chunk asyncio reads (up to 256 KiB) is cut into packets
in one pass, PUBACKs of a commit go out in one write, and backpressure is the
transport's own pause_reading().

What the gateway needs and nothing more: CONNECT (persistent session, last will,
user/password, keepalive), SUBSCRIBE at QoS 1, incoming PUBLISH at QoS 0/1 acknowledged
only when the caller says so (manual PUBACK), outgoing PUBLISH at QoS 0/1 with PUBACK
tracking, PINGREQ. No QoS 2 (the gateway subscribes at QoS 1, so the broker never sends
it; a QoS 2 PUBLISH would be a protocol error and closes the connection).
"""
import asyncio
import time

# the encoders are the firmware's (the same MQTT 3.1.1 codec, pure functions, CPython and MicroPython)
from firmware.mqtt import DISCONNECT_PACKET, PINGREQ_PACKET, publish_packet  # noqa: F401
from firmware.mqttc import connect_packet, subscribe_packet  # noqa: F401  (the firmware's connect-time code)

MAX_PACKET = 16 * 1024 * 1024  # larger than the broker lets through (brokerconf message_size_limit)


class ProtocolError(Exception):
    pass


def puback_of(mids, conn):
    """PUBACKs for the QoS 1 messages of [(mid | conn << 16, qos)] that came on connection
    `conn`, one bytes object (C when compiled: one per message of a commit)."""
    out = bytearray(4 * len(mids))
    k = 0
    for m, qos in mids:
        if qos == 1 and m >> 16 == conn:
            out[k] = 0x40
            out[k + 1] = 2
            out[k + 2] = (m >> 8) & 0xFF
            out[k + 3] = m & 0xFF
            k += 4
    return bytes(out[:k])


FULL = -2  # cut(): the queue holds its limit
MORE = -1  # cut(): the next packet is not all there yet


def cut(buf, off, queue, limit, tag, now, inflight):
    """Cuts the MQTT packets of `buf` (bytes) from `off` (C when compiled: mqttc.pxd).

    Each PUBLISH goes into `queue` as (topic, payload, mid | tag, qos, now), until the queue
    holds `limit` (then returns with kind FULL); a PUBACK takes its packet id out of the set
    `inflight` (the broker's PUBACK of our acks, one per device and commit). Returns (off,
    kind, o, end): kind MORE when
    the packet at `off` is incomplete, FULL, or the type of a control packet (its body is
    buf[o:end], `off` is past it) for the caller. Raises ProtocolError on a malformed packet
    (untrusted input: no read past the packet, no length over MAX_PACKET)."""
    d = buf
    n = len(buf)
    while off + 2 <= n:
        first = d[off]
        o = off + 1
        c = d[o]
        ln = c & 0x7F
        o += 1
        shift = 7
        while c & 0x80:  # remaining length: 1-4 bytes
            if shift > 21:
                raise ProtocolError("remaining length over 4 bytes")
            if o >= n:
                return off, MORE, 0, 0
            c = d[o]
            o += 1
            ln |= (c & 0x7F) << shift
            shift += 7
        if ln > MAX_PACKET:
            raise ProtocolError("packet of %d bytes" % ln)
        end = o + ln
        if end > n:
            return off, MORE, 0, 0
        kind = first >> 4
        if ln < 2 and (kind == 2 or kind == 3 or kind == 4 or kind == 9):
            raise ProtocolError("packet type %d of %d bytes" % (kind, ln))
        if kind != 3:
            if kind == 4:
                inflight.discard((d[o] << 8) | d[o + 1])
                off = end
                continue
            return end, kind, o, end
        qos = (first >> 1) & 3
        p = o + 2 + ((d[o] << 8) | d[o + 1])
        if qos:
            if qos > 1:
                raise ProtocolError("QoS 2 PUBLISH (subscribed at QoS 1)")
            if p + 2 > end:
                raise ProtocolError("PUBLISH shorter than its topic")
            mid = (d[p] << 8) | d[p + 1]
            queue.append((buf[o + 2:p], buf[p + 2:end], mid | tag, qos, now))
        else:
            if p > end:
                raise ProtocolError("PUBLISH shorter than its topic")
            queue.append((buf[o + 2:p], buf[p:end], tag, qos, now))
        off = end
        if len(queue) >= limit:
            return off, FULL, 0, 0
    return off, MORE, 0, 0


class Protocol(asyncio.Protocol):
    """One connection. Incoming PUBLISHes go into owner.queue (a deque) as (topic bytes,
    payload bytes, mid | owner.tag, qos, receipt monotonic); reading pauses when it holds
    owner.maxsize. The owner gets: on_messages() after messages were queued, on_connack(
    session_present, rc), on_suback(codes), on_protocol_error(detail), on_lost(protocol, exc)."""

    def __init__(self, owner):
        self.owner = owner
        self.tr = None
        self.buf = b""
        self.paused = False  # reading paused by the owner (backpressure)
        self.inflight = set()  # our QoS 1 publishes not yet PUBACKed
        self._pid = 0
        self.last_tx = time.monotonic()
        self.ping_sent = None
        self.closed = False
        self._wq = None  # writes of this event-loop step, sent together at its end
        self._loop = None

    # ---- asyncio.Protocol
    def connection_made(self, tr):
        self.tr = tr
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # driven by hand (tests): writes go out at once
            self._loop = None

    def connection_lost(self, exc):
        self.closed = True
        self.tr = None
        self.owner.on_lost(self, exc)

    def data_received(self, data):
        if type(data) is not bytes:  # cut() reads bytes
            data = bytes(data)
        self.buf = self.buf + data if self.buf else data
        if not self.paused:
            self._parse()

    # ---- reading
    def _parse(self):
        buf = self.buf
        owner = self.owner
        q = owner.queue
        queued = len(q)
        off = 0
        try:
            while True:
                off, kind, o, end = cut(buf, off, q, owner.maxsize, owner.tag, time.monotonic(), self.inflight)
                if kind < 0:
                    if kind == FULL:
                        self.paused = True
                    break
                if kind == 13:  # PINGRESP
                    self.ping_sent = None
                elif kind == 2 or kind == 9:
                    if len(q) != queued:  # what came before first
                        queued = len(q)
                        owner.on_messages()
                    if kind == 2:  # CONNACK
                        owner.on_connack(buf[o] & 1, buf[o + 1])
                    else:  # SUBACK
                        owner.on_suback(bytes(buf[o + 2:end]))
                # anything else (UNSUBACK, a stray PUBREL) is ignored
        except ProtocolError as e:
            self.buf = b""
            if len(q) != queued:  # the good messages before the bad packet
                owner.on_messages()
            owner.on_protocol_error(str(e))
            if self.tr is not None:
                self.tr.abort()
            return
        self.buf = buf[off:] if off < len(buf) else b""
        if len(q) != queued:
            owner.on_messages()
        if self.paused and self.tr is not None:
            self.tr.pause_reading()

    def pause(self):
        if not self.paused:
            self.paused = True
            if self.tr is not None:
                self.tr.pause_reading()

    def resume(self):
        """Go on reading: first what is buffered, then the socket (unless that pauses again)."""
        if not self.paused or self.tr is None:
            return
        self.paused = False
        if self.buf:
            self._parse()
        if not self.paused and self.tr is not None:
            self.tr.resume_reading()

    # ---- writing
    def write(self, data):
        """Writes of one event-loop step go out as one transport write at its end: a commit's
        PUBACKs and its acks (one per device) take one send() instead of one each."""
        if self.tr is None or not data:
            return
        self.last_tx = time.monotonic()
        if self._wq is not None:
            self._wq.append(data)
        elif self._loop is not None:
            self._wq = [data]
            self._loop.call_soon(self.flush)
        else:
            self.tr.write(data)

    def flush(self):
        wq, self._wq = self._wq, None
        if wq and self.tr is not None:
            self.tr.write(wq[0] if len(wq) == 1 else b"".join(wq))

    def next_pid(self):
        """A packet id not in flight, or None when all 65,535 are."""
        if len(self.inflight) >= 65535:
            return None
        pid = self._pid
        while True:
            pid = pid % 0xFFFF + 1
            if pid not in self.inflight:
                self._pid = pid
                return pid

    def publish(self, topic, payload, qos=1, retain=False):
        """Returns the packet id (QoS 1; is_published(pid) tells when acknowledged), 0 for QoS 0,
        None if not sent (not connected, or every packet id in flight)."""
        if self.tr is None:
            return None
        pid = 0
        if qos:
            pid = self.next_pid()
            if pid is None:
                return None
            self.inflight.add(pid)
        self.write(publish_packet(topic, payload, 1 if qos else 0, retain, False, pid))
        return pid

    def is_published(self, pid):
        return pid not in self.inflight

    def ping(self):
        self.write(PINGREQ_PACKET)
        self.ping_sent = time.monotonic()

    def disconnect(self):
        self.flush()
        if self.tr is not None:
            self.tr.write(DISCONNECT_PACKET)
            self.tr.close()
