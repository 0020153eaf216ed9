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
import struct
import time

# the encoders are the firmware's (the same MQTT 3.1.1 codec, pure functions, CPython and MicroPython)
from firmware.mqtt import DISCONNECT_PACKET, PINGREQ_PACKET, publish_packet  # noqa: F401
from firmware.mqttc import connect_packet, subscribe_packet  # noqa: F401  (the firmware's connect-time code)

_H = struct.Struct(">H")
MAX_PACKET = 16 * 1024 * 1024  # larger than the broker lets through (brokerconf message_size_limit)


class ProtocolError(Exception):
    pass


def puback_packets(mids):
    """PUBACKs for QoS 1 messages [(mid, qos)], one bytes object."""
    pack = _H.pack
    return b"".join(b"\x40\x02" + pack(mid) for mid, qos in mids if qos == 1)


class Protocol(asyncio.Protocol):
    """One connection. `owner` gets: on_connack(session_present, rc), on_message(topic bytes,
    payload bytes, mid, qos, receipt monotonic) -> True to stop reading (pause), on_suback(codes),
    on_protocol_error(detail), on_lost(protocol, exc)."""

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
        self.buf = self.buf + data if self.buf else data
        if not self.paused:
            self._parse()

    # ---- reading
    def _parse(self):
        buf = self.buf
        n = len(buf)
        off = 0
        owner = self.owner
        on_message = owner.on_message
        now = time.monotonic()
        try:
            while off + 2 <= n:
                first = buf[off]
                # remaining length (1-4 bytes)
                o = off + 1
                c = buf[o]
                ln = c & 0x7F
                o += 1
                if c & 0x80:
                    shift = 7
                    while True:
                        if o >= n:
                            raise IndexError
                        c = buf[o]
                        o += 1
                        ln |= (c & 0x7F) << shift
                        if not c & 0x80:
                            break
                        shift += 7
                        if shift > 21:
                            raise ProtocolError("remaining length over 4 bytes")
                    if ln > MAX_PACKET:
                        raise ProtocolError("packet of %d bytes" % ln)
                end = o + ln
                if end > n:
                    break
                kind = first >> 4
                if ln < 2 and kind in (2, 3, 4, 9):
                    raise ProtocolError("packet type %d of %d bytes" % (kind, ln))
                if kind == 3:  # PUBLISH
                    qos = (first >> 1) & 3
                    tl = (buf[o] << 8) | buf[o + 1]
                    p = o + 2 + tl
                    topic = buf[o + 2:p]
                    if qos:
                        if qos > 1:
                            raise ProtocolError("QoS 2 PUBLISH (subscribed at QoS 1)")
                        if p + 2 > end:
                            raise ProtocolError("PUBLISH shorter than its topic")
                        mid = (buf[p] << 8) | buf[p + 1]
                        p += 2
                    else:
                        mid = 0
                    if p > end:
                        raise ProtocolError("PUBLISH shorter than its topic")
                    off = end
                    if on_message(topic, buf[p:end], mid, qos, now):
                        self.paused = True
                        break
                    continue
                off = end
                if kind == 4:  # PUBACK of ours
                    self.inflight.discard((buf[o] << 8) | buf[o + 1])
                elif kind == 13:  # PINGRESP
                    self.ping_sent = None
                elif kind == 2:  # CONNACK
                    owner.on_connack(buf[o] & 1, buf[o + 1])
                elif kind == 9:  # SUBACK
                    owner.on_suback(bytes(buf[o + 2:end]))
                # anything else (UNSUBACK, a stray PUBREL) is ignored
        except IndexError:  # a header cut in the middle: wait for more bytes
            pass
        except ProtocolError as e:
            self.buf = b""
            owner.on_protocol_error(str(e))
            if self.tr is not None:
                self.tr.abort()
            return
        self.buf = buf[off:] if off < n else b""
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
