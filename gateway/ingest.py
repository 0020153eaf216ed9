"""MQTT ingest: the gateway's own asyncio MQTT client (mqttc.py) feeding a bounded queue.

No thread: the connection is an asyncio Protocol; every chunk read (up to 256 KiB) is cut
into packets in one pass (mqttc.cut, compiled when built: accel), a message costs one tuple
and one deque append, the processing loop is woken once per read. When the queue holds
`queue_size` messages the transport stops reading: TCP fills, and the broker holds the
rest (backpressure). QoS 1 messages are acknowledged manually, only after the checkpoint
holding their effects has committed (one write for a commit's PUBACKs).

paho-mqtt was the client until its byte-per-syscall header reads had to be bypassed with
its private API; docs/benchmarks.md ("MQTT client") has the measurements of the choice.

Security: TLS with the fleet CA pinned (mqtt.tls_ca) and the broker's name checked
(mqtt.tls_server_name, default the host), user name and password (file or env). Without
them the gateway refuses to start unless [security] insecure = true.
"""
import asyncio
import collections
import random
import ssl
import time

from shared import wire

from . import logs
from .accel import mqttc
from .mqttc import connect_packet, subscribe_packet


class _NamedContext(ssl.SSLContext):
    """Checks the broker's certificate against a fixed name even when a client connects by
    address: the MQTT sink's paho passes its host as server_hostname; the ingest passes
    server_name itself."""
    server_name = None

    def wrap_socket(self, sock, *a, **kw):
        kw["server_hostname"] = self.server_name
        return super().wrap_socket(sock, *a, **kw)


def tls_context(m):
    """SSLContext for [mqtt]: only the configured CA is trusted, the name is checked."""
    from .config import ConfigError
    ctx = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.server_name = m.tls_server_name or m.host
    try:
        ctx.load_verify_locations(cafile=m.tls_ca)
        if m.tls_cert:
            ctx.load_cert_chain(m.tls_cert, m.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("mqtt.tls_ca/tls_cert/tls_key: %s" % e)
    return ctx


class Ingest:
    def __init__(self, cfg, stats, on_connected=None):
        cfg.check_secure()
        self.cfg = cfg.mqtt
        self.stats = stats
        self.topics = wire.Topics(self.cfg.prefix)
        self.queue = collections.deque()  # (topic bytes, payload, mid, qos, receipt time.monotonic())
        self.maxsize = self.cfg.queue_size
        self.wake = asyncio.Event()
        self.connected = asyncio.Event()
        self.on_connected = on_connected
        self.paused = False
        self.closing = False
        self.tls_failures = 0  # broker certificate refused (wrong CA or name)
        self.last_error = None
        self.publish_failures = 0  # not sent: not connected, or 65,535 publishes unacknowledged
        self.proto = None  # the current connection (mqttc.Protocol), None between connections
        self._conn = 0  # connection number, in the high bits of every queued mid (see puback)
        self._refused = 0  # CONNACKs refused in a row (bad credentials): the reconnect backs off
        self._misc = None
        self._reconnect = None
        self._loop = None
        self._ssl = tls_context(self.cfg) if self.cfg.tls_ca else None
        self._password = cfg.mqtt_password() if self.cfg.username else None
        self._connect = connect_packet(
            self.cfg.client_id, self.cfg.keepalive, False,
            (self.topics.gw_state, wire.encode_state(False, gateway=True), 1, True),
            self.cfg.username or None, self._password)

    # ------------------------------------------------------------ lifecycle

    async def start(self):
        self._loop = asyncio.get_running_loop()
        self._misc = self._loop.create_task(self._misc_loop())
        await self._connect_with_backoff()

    async def _open(self):
        """One connection attempt: TCP (+TLS) and CONNECT; the CONNACK arrives in on_connack."""
        proto = mqttc.Protocol(self)  # compiled packet cutter if built (accel)
        ctx = self._ssl
        await asyncio.wait_for(self._loop.create_connection(
            lambda: proto, self.cfg.host, self.cfg.port, ssl=ctx,
            server_hostname=ctx.server_name if ctx is not None else None), 10.0)
        if proto.closed:  # lost before we got here (wait_for's extra loop turns): on_lost ignored it
            raise ConnectionResetError("connection closed by the broker during the connect")
        self.proto = proto
        self._conn = (self._conn + 1) & 0xFFFF
        if self.paused:
            proto.pause()
        proto.write(self._connect)

    async def _connect_with_backoff(self):
        delay = 0.1
        while not self.closing:
            try:
                await self._open()
                return
            except ssl.SSLCertVerificationError as e:  # wrong CA or name: say so, keep retrying
                self.tls_failures += 1
                self.last_error = str(e)
                logs.error("mqtt_tls_refused", host=self.cfg.host, port=self.cfg.port, error=str(e))
            except (OSError, asyncio.TimeoutError) as e:
                logs.warning("mqtt_connect_failed", host=self.cfg.host, port=self.cfg.port, error=str(e) or repr(e),
                             retry_s=round(delay, 2))
            # full jitter, like the devices
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self.cfg.reconnect_max_s)

    async def stop(self, offline=True):
        """Publish the retained offline state (a clean disconnect sends no will) and disconnect."""
        self.closing = True
        if self._reconnect:
            self._reconnect.cancel()
        p = self.proto
        if p is not None and self.connected.is_set():
            self.resume()  # to read the PUBACK of the offline state; unacked input is redelivered later
            if offline:
                pid = p.publish(self.topics.gw_state, wire.encode_state(False, gateway=True), 1, True)
                for _ in range(100):  # bounded wait for the PUBACK
                    if pid is None or p.is_published(pid) or p.closed:
                        break
                    await asyncio.sleep(0.01)
        if p is not None:
            p.disconnect()
            for _ in range(50):
                if p.closed:
                    break
                await asyncio.sleep(0.01)
        if self._misc:
            self._misc.cancel()

    def is_connected(self):
        return self.proto is not None and self.connected.is_set()

    async def _misc_loop(self):
        while True:
            await asyncio.sleep(1.0)
            self.check_connection(time.monotonic())

    def check_connection(self, now):
        """Called each second. No CONNACK within min(keepalive, 10) s of the CONNECT (a broker
        that accepts TCP and then hangs) means a dead connection: before, nothing but the
        keepalive would notice, after 2 x keepalive, and it would send PINGREQ before CONNACK.
        Then keepalive: PINGREQ after keepalive seconds without sending; no PINGRESP within
        keepalive (while reading) means a dead connection."""
        ka = self.cfg.keepalive
        p = self.proto
        if p is None or p.closed or p.tr is None:
            return
        if not self.connected.is_set():
            if now - p.last_tx > min(ka, 10):
                self.last_error = "no CONNACK within %d s" % min(ka, 10)
                logs.warning("mqtt_connack_timeout", seconds=min(ka, 10))
                p.tr.abort()
            return
        if p.ping_sent is not None:
            if now - p.ping_sent > ka and not p.paused:
                logs.warning("mqtt_ping_timeout", seconds=ka)
                p.tr.abort()
        elif now - p.last_tx >= ka:
            p.ping()

    # ------------------------------------------------------------ connection events (mqttc.Protocol)

    def on_connack(self, session_present, rc):
        p = self.proto
        if rc != 0:
            self.last_error = "CONNACK refused, code %d" % rc
            self._refused += 1
            logs.error("mqtt_refused", reason=self.last_error)
            p.tr.abort()  # reconnects with backoff
            return
        self.stats.connects += 1
        self._refused = 0
        t = self.topics
        p.write(subscribe_packet(p.next_pid(), [(t.sub_data, 1), (t.sub_hello, 1), (t.sub_state, 1)]))
        p.publish(t.gw_state, wire.encode_state(True, gateway=True), 1, True)
        logs.info("mqtt_connected", host=self.cfg.host, port=self.cfg.port, session_present=bool(session_present))
        self.connected.set()
        if self.on_connected:
            self.on_connected()

    def on_suback(self, codes):
        if b"\x80" in codes:
            logs.error("mqtt_subscribe_refused", codes=list(codes))

    def on_protocol_error(self, detail):
        self.last_error = detail
        logs.error("mqtt_protocol_error", detail=detail)

    def on_lost(self, proto, exc):
        if proto is not self.proto:
            return  # a connection that never became the current one
        self.proto = None
        was = self.connected.is_set()
        self.connected.clear()
        if was:
            self.stats.disconnects += 1
        if self.closing:
            return
        logs.warning("mqtt_disconnected", reason=str(exc) if exc else "closed by the broker")
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = self._loop.create_task(self._reconnect_loop())

    async def _reconnect_loop(self):
        delay = min(0.1 * 2 ** min(self._refused, 16), self.cfg.reconnect_max_s)
        await asyncio.sleep(delay * (0.5 + random.random() / 2))
        await self._connect_with_backoff()

    @property
    def tag(self):
        """Or-ed into every queued mid: the connection number (see puback)."""
        return self._conn << 16

    def on_messages(self):
        """The protocol queued messages (once per read, not per message); when the queue holds
        maxsize it has stopped reading."""
        q = self.queue
        self.wake.set()
        if len(q) >= self.maxsize:
            if len(q) > self.stats.queue_max:
                self.stats.queue_max = len(q)
            if not self.paused:
                self._paused()

    # ------------------------------------------------------------ backpressure

    def _paused(self):
        self.paused = True
        self.stats.paused += 1
        self.stats.paused_since = time.monotonic()

    def pause(self):
        if not self.paused:
            self._paused()
        if self.proto is not None:
            self.proto.pause()

    def resume(self):
        if not self.paused:
            return
        self.paused = False
        if self.stats.paused_since is not None:
            self.stats.paused_seconds += time.monotonic() - self.stats.paused_since
            self.stats.paused_since = None
        if self.proto is not None:
            self.proto.resume()  # may fill the queue (and pause) again at once

    def maybe_resume(self):
        if self.paused and len(self.queue) <= self.maxsize // 2:
            self.resume()

    # ------------------------------------------------------------ output

    def puback(self, mids):
        """PUBACK only on the connection that delivered the message: after a reconnect the
        broker resends what was unacked under the same packet ids and may reuse an id once
        acked, so a late PUBACK on the new connection could ack a different, uncommitted
        message. The resent copy is deduplicated and acked in its turn."""
        if self.proto is not None:
            self.proto.write(mqttc.puback_of(mids, self._conn))

    def publish(self, topic, payload, qos=1, retain=False):
        """Acks and the state: not queued while disconnected (acks are cumulative and the device
        says hello again when the gateway's retained state turns online)."""
        p = self.proto
        if p is None or not self.connected.is_set() or p.publish(topic, payload, qos, retain) is None:
            self.publish_failures += 1
