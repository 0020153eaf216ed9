# A small asyncio MQTT 3.1.1 client for MicroPython that runs unchanged under CPython.
#
# QoS 0 and 1 (PUBACK tracking, bounded in-flight window, retransmit with DUP after a
# reconnect), last will, keepalive pings, subscribe, clean reconnect. Streams come from
# asyncio.open_connection (both runtimes; MicroPython's Stream has write/drain/readexactly)
# or an injected open_connection (the simulated HAL uses it to cut connections).
#
# The packet encoders/decoders at the top are pure functions (tested under both runtimes).
# Connect-time code (CONNECT / SUBSCRIBE, DNS, handshakes) is in firmware/mqttc.py, imported
# on demand and unloaded after on MicroPython (RAM).
# The client never reconnects on its own: the owner (firmware.uplink) watches `connected`
# and calls connect() again with its backoff.
import struct
import asyncio

from firmware.hal import ticks_ms, ticks_diff, sleep_ms, unload, close_stream

try:
    from micropython import const
except ImportError:  # CPython
    from firmware.cpyticks import const

# packet types: const with a leading underscore, so not stored on the board (RAM)
_PUBLISH = const(3)
_PUBACK = const(4)
_PINGRESP = const(13)
_MAX_PACKET = const(268435455)

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"


class MQTTError(Exception):
    pass


# ---------------------------------------------------------------- pure packet functions


def varlen(n):
    if n < 0 or n > _MAX_PACKET:
        raise MQTTError("bad length %d" % n)
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)



def _s(s):
    if isinstance(s, str):
        s = s.encode()
    if len(s) > 0xFFFF:
        raise MQTTError("string too long")
    return struct.pack(">H", len(s)) + s


def publish_header(topic, n, qos=0, retain=False, dup=False, pid=0):
    """A PUBLISH packet up to its payload of n bytes (the payload is written after it: no
    copy of it joined to the header, device RAM)."""
    if qos not in (0, 1):
        raise MQTTError("qos %r not supported" % qos)
    first = (_PUBLISH << 4) | (qos << 1) | (1 if retain else 0) | (0x08 if dup and qos else 0)
    body = _s(topic)
    if qos:
        if not 0 < pid <= 0xFFFF:
            raise MQTTError("bad packet id")
        body += struct.pack(">H", pid)
    return bytes((first,)) + varlen(len(body) + n) + body


def publish_packet(topic, payload, qos=0, retain=False, dup=False, pid=0):
    return publish_header(topic, len(payload), qos, retain, dup, pid) + payload



def puback_packet(pid):
    return struct.pack(">BBH", _PUBACK << 4, 2, pid)


def parse(first, body):
    """Decode one packet (fixed-header first byte + body) into a tuple:
    ('connack', session_present, rc) ('publish', topic, payload, qos, retain, dup, pid)
    ('puback', pid) ('suback', pid, codes) ('unsuback', pid) ('pingresp',) ('pingreq',)."""
    t = first >> 4
    if t == _PUBLISH:
        qos = (first >> 1) & 3
        if qos > 1:
            raise MQTTError("qos %r not supported" % qos)
        off = 2 + ((body[0] << 8) | body[1]) if len(body) >= 2 else 2  # after the topic
        if off + (2 if qos else 0) > len(body):
            raise MQTTError("truncated publish")
        topic = bytes(body[2:off]).decode()
        pid = 0
        if qos:
            pid = (body[off] << 8) | body[off + 1]
            off += 2
        return ("publish", topic, bytes(body[off:]), qos, bool(first & 1), bool(first & 8), pid)
    if t == _PUBACK:
        if len(body) != 2:
            raise MQTTError("bad puback")
        return ("puback", (body[0] << 8) | body[1])
    if t == _PINGRESP:
        return ("pingresp",)
    from firmware import mqttc  # the connect-time packets (firmware/mqttc.py)
    try:
        return mqttc.parse_rare(t, body)
    finally:
        unload("firmware.mqttc")


# ---------------------------------------------------------------- the client


class MQTTClient:
    def __init__(self, client_id, host, port=1883, keepalive=30, will=None, clean=True, user=None,
                 password=None, open_connection=None, on_message=None, max_inflight=16,
                 timeout_ms=5000, resolver="dns", retransmit=True):
        from firmware import mqttc  # set-up (firmware/mqttc.py): unloaded after (RAM)
        mqttc.init(self, client_id, host, port, keepalive, will, clean, user, password, open_connection,
                   on_message, max_inflight, timeout_ms, resolver, retransmit)
        unload("firmware.mqttc")

    def _next_pid(self):
        # one is free within len(inflight) + 1 tries: the in-flight window is bounded
        while True:
            pid = self._pid = self._pid % 0xFFFF + 1
            for p in self.inflight:
                if p[0] == pid:
                    break
            else:
                return pid

    async def connect(self):
        """Open the connection, CONNECT, wait for CONNACK, retransmit in-flight QoS 1 (DUP)
        (firmware/mqttc.py, unloaded again when the connect fails)."""
        from firmware import mqttc
        try:
            await mqttc.connect(self)
        except BaseException:
            unload("firmware.mqttc")
            raise

    async def subscribe(self, topic, qos=1):
        from firmware import mqttc
        try:
            return await mqttc.subscribe(self, topic, qos)
        finally:
            unload("firmware.mqttc")

    async def _read_packet(self, r):
        first = (await r.readexactly(1))[0]
        n = 0
        mult = 1
        for i in range(4):
            b = (await r.readexactly(1))[0]
            n += (b & 0x7F) * mult
            if not b & 0x80:
                break
            mult *= 128
        body = await r.readexactly(n) if n else b""
        return parse(first, body)

    async def _send(self, data, payload=None):
        """Write one packet (data, then payload if given); waits for the send lock and for the
        socket at most timeout_ms each (a full send buffer toward a dead broker never blocks
        forever). Never raises: a failed write drops the connection (last_error says why) and
        returns False, so a task may run it (the keepalive's ping)."""
        if not self.connected:
            return False
        w = self._w
        t = self.timeout_ms / 1000
        try:
            await asyncio.wait_for(self._lock.acquire(), t)
        except Exception:  # asyncio.TimeoutError
            self._drop(MQTTError("write timeout"))
            return False
        try:
            w.write(data)
            if payload is not None:
                w.write(payload)
            await asyncio.wait_for(w.drain(), t)
        except Exception as e:
            self._drop(MQTTError("write timeout") if isinstance(e, asyncio.TimeoutError) else e)
            return False
        finally:
            self._lock.release()
        self._last_tx = ticks_ms()
        return True

    async def publish(self, topic, payload, qos=0, retain=False):
        """QoS 1 waits (up to timeout_ms) for room in the in-flight window; returns the pid."""
        if qos:
            t0 = ticks_ms()
            while len(self.inflight) >= self.max_inflight:
                if not self.connected or ticks_diff(ticks_ms(), t0) > self.timeout_ms:
                    raise MQTTError("in-flight window full")
                await sleep_ms(5)
        if not self.connected:
            raise MQTTError("not connected")
        pid = self._next_pid() if qos else 0
        data, more = self.packet(topic, payload, qos, retain, pid)
        if qos:
            self.inflight.append([pid, data if more is None else None])
        if not await self._send(data, more):
            raise MQTTError("publish failed: %r" % (self.last_error,))
        return pid

    def packet(self, topic, payload, qos, retain, pid):
        """(packet, None) to keep for a retransmission, else (header, payload) written one
        after the other: QoS 0 and retransmit=False never join them (a payload copy less)."""
        if qos and self.retransmit:
            return publish_packet(topic, payload, qos, retain, False, pid), None
        return publish_header(topic, len(payload), qos, retain, False, pid), payload

    async def wait_inflight(self, timeout_ms=5000):
        """Wait until every QoS 1 publish got its _PUBACK. Returns True if so."""
        t0 = ticks_ms()
        while self.inflight:
            if ticks_diff(ticks_ms(), t0) > timeout_ms:
                return False
            await sleep_ms(5)
        return True

    async def _reader(self, r):
        try:
            while True:
                pkt = await self._read_packet(r)
                self._last_rx = ticks_ms()
                k = pkt[0]
                if k == "publish":
                    if self.on_message is not None:
                        try:
                            self.on_message(pkt[1], pkt[2], pkt[4])
                        except Exception as e:
                            self.last_error = e
                    if pkt[3]:
                        await self._send(puback_packet(pkt[6]))
                elif k == "puback":
                    for i in range(len(self.inflight)):
                        if self.inflight[i][0] == pkt[1]:
                            self.inflight.pop(i)
                            self.pubacks += 1
                            break
                elif k == "suback":
                    s = self._subacks.get(pkt[1])
                    if s is not None:
                        s[1] = pkt[2]
                        s[0].set()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._drop(e)

    async def _pinger(self):
        """Keepalive: PINGREQ after ka/2 without sending; the connection is dead after 1.5 x ka
        without anything received. The dead check never waits for the send lock (a publish
        stuck in drain() holds it), and the ping is skipped while the lock is held."""
        ka = self.keepalive * 1000
        try:
            while self.connected:
                await sleep_ms(min(1000, ka // 4 + 1))
                now = ticks_ms()
                if ticks_diff(now, self._last_rx) > ka + ka // 2:
                    self._drop(MQTTError("keepalive timeout"))
                    return
                if ticks_diff(now, self._last_tx) >= ka // 2 and not self._lock.locked():
                    self.pings += 1
                    asyncio.create_task(self._send(PINGREQ_PACKET))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._drop(e)

    def _drop(self, e=None):
        """Connection lost or closed: stop the tasks, close the socket. In-flight stays."""
        if e is not None:
            self.last_error = e
        was = self.connected
        self.connected = False
        cur = None
        try:
            cur = asyncio.current_task()
        except Exception:
            pass
        for t in self._tasks:
            if t is not cur:
                try:
                    t.cancel()
                except Exception:
                    pass
        self._tasks = []
        if self._w is not None:
            close_stream(self._w)
            self._w = None
        for s in self._subacks.values():
            s[0].set()
        return was

    async def disconnect(self):
        """Clean disconnect (the broker discards the will)."""
        if self.connected:
            try:
                await asyncio.wait_for(self._send(DISCONNECT_PACKET), 1)
            except Exception:  # asyncio.TimeoutError
                pass
        self._drop()

    close = _drop  # abrupt close (the broker publishes the will)
