"""MQTT ingest: paho-mqtt driven from the asyncio loop, feeding a bounded queue.

No paho thread: the socket is registered with the event loop (paho's socket
callbacks + loop_read / loop_write / loop_misc), so a message costs one deque
append, not a thread hand-off. When the queue holds `queue_size` messages the
loop stops reading the socket: TCP fills, and the broker holds the rest
(backpressure). QoS 1 messages are acknowledged manually (`manual_ack=True`)
and only after the checkpoint holding their effects has committed.

With buffered reads the socket is read 64 KiB at a time into a buffer paho
consumes (paho itself reads each packet header a byte per system call).

Security: TLS with the fleet CA pinned (mqtt.tls_ca) and the broker's name checked
(mqtt.tls_server_name, default the host), user name and password (file or env). Without
them the gateway refuses to start unless [security] insecure = true.
"""
import asyncio
import collections
import random
import ssl
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from shared import wire

from . import logs


class _BufferedClient(mqtt.Client):
    """paho Client whose socket reads go through a userspace buffer."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._rbuf = b""
        self._rpos = 0

    def _sock_recv(self, bufsize):
        avail = len(self._rbuf) - self._rpos
        if avail == 0:
            if self._sock is None:
                raise ConnectionError("socket closed")
            try:
                data = self._sock.recv(65536)  # BlockingIOError propagates: paho treats it as 'again'
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as e:  # TLS: no whole record yet
                raise BlockingIOError() from e
            if not data:
                return b""
            if isinstance(self._sock, ssl.SSLSocket):
                data = self._more_records(data)
            self._rbuf = data
            self._rpos = 0
            avail = len(data)
        n = bufsize if bufsize < avail else avail
        p = self._rpos
        self._rpos = p + n
        return self._rbuf[p:p + n]

    def _more_records(self, data):
        """TLS returns one record per recv (mosquitto writes one per packet): gather what
        has arrived, up to 64 KiB, so a read handles a batch of messages, as without TLS."""
        parts, n = [data], len(data)
        while n < 65536:
            try:
                more = self._sock.recv(65536 - n)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                break
            if not more:
                break  # EOF: the next recv reports it
            parts.append(more)
            n += len(more)
        return b"".join(parts) if len(parts) > 1 else data

    def buffered(self):
        return len(self._rbuf) - self._rpos

    def reset_buffer(self):
        self._rbuf = b""
        self._rpos = 0


class _NamedContext(ssl.SSLContext):
    """Checks the broker's certificate against a fixed name even when paho connects by address
    (paho passes its host as server_hostname)."""
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
        self._sock = None
        self._misc = None
        self._reconnect = None
        self._loop = None
        cls = _BufferedClient if self.cfg.buffered_reads else mqtt.Client
        c = self.client = cls(CallbackAPIVersion.VERSION2, client_id=self.cfg.client_id, clean_session=False,
                              manual_ack=True)
        # 0 = no client-side limit: paho scans every queued message per PUBACK otherwise
        c.max_inflight_messages_set(0)
        c.max_queued_messages_set(0)
        c.will_set(self.topics.gw_state, wire.encode_state(False, gateway=True), qos=1, retain=True)
        if self.cfg.username:
            c.username_pw_set(self.cfg.username, cfg.mqtt_password())
        if self.cfg.tls_ca:
            c.tls_set_context(tls_context(self.cfg))
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write

    # ------------------------------------------------------------ lifecycle

    async def start(self):
        self._loop = asyncio.get_running_loop()
        self._misc = self._loop.create_task(self._misc_loop())
        await self._connect_with_backoff()

    async def _connect_with_backoff(self):
        delay = 0.1
        while not self.closing:
            try:
                self.client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
                return
            except ssl.SSLCertVerificationError as e:  # wrong CA or name: say so, keep retrying
                self.tls_failures += 1
                self.last_error = str(e)
                logs.error("mqtt_tls_refused", host=self.cfg.host, port=self.cfg.port, error=str(e))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, self.cfg.reconnect_max_s)
            except OSError as e:
                logs.warning("mqtt_connect_failed", host=self.cfg.host, port=self.cfg.port, error=str(e),
                             retry_s=round(delay, 2))
                # full jitter, like the devices
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, self.cfg.reconnect_max_s)

    async def stop(self, offline=True):
        """Publish the retained offline state (a clean disconnect sends no will) and disconnect."""
        self.closing = True
        if self._reconnect:
            self._reconnect.cancel()
        c = self.client
        if c.is_connected():
            self.resume()  # to read the PUBACK of the offline state; unacked input is redelivered later
            if offline:
                info = c.publish(self.topics.gw_state, wire.encode_state(False, gateway=True), qos=1, retain=True)
                for _ in range(100):  # bounded wait for the PUBACK
                    if info.is_published() or not c.is_connected():
                        break
                    await asyncio.sleep(0.01)
            c.disconnect()
            for _ in range(50):
                if self._sock is None:
                    break
                await asyncio.sleep(0.01)
        if self._misc:
            self._misc.cancel()

    async def _misc_loop(self):
        while True:
            await asyncio.sleep(1.0)
            if self.client.socket() is not None:
                self.client.loop_misc()

    # ------------------------------------------------------------ paho callbacks

    def _on_socket_open(self, client, userdata, sock):
        self._sock = sock
        if not self.paused:
            self._loop.add_reader(sock, self._read)

    def _on_socket_close(self, client, userdata, sock):
        try:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        except Exception:
            pass
        self._sock = None
        if isinstance(self.client, _BufferedClient):
            self.client.reset_buffer()

    def _on_register_write(self, client, userdata, sock):
        self._loop.add_writer(sock, client.loop_write)

    def _on_unregister_write(self, client, userdata, sock):
        self._loop.remove_writer(sock)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            logs.error("mqtt_refused", reason=str(reason_code))
            return
        self.stats.connects += 1
        t = self.topics
        client.subscribe([(t.sub_data, 1), (t.sub_hello, 1), (t.sub_state, 1)])
        client.publish(t.gw_state, wire.encode_state(True, gateway=True), qos=1, retain=True)
        logs.info("mqtt_connected", host=self.cfg.host, port=self.cfg.port, session_present=flags.session_present)
        self.connected.set()
        if self.on_connected:
            self.on_connected()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        self.stats.disconnects += 1
        if self.closing:
            return
        logs.warning("mqtt_disconnected", reason=str(reason_code))
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = self._loop.create_task(self._reconnect_loop())

    async def _reconnect_loop(self):
        delay = 0.1
        while not self.closing and not self.client.is_connected():
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            try:
                self.client.reconnect()
                return
            except OSError as e:
                if isinstance(e, ssl.SSLCertVerificationError):  # e.g. the broker's certificate changed
                    self.tls_failures += 1
                    self.last_error = str(e)
                logs.warning("mqtt_reconnect_failed", error=str(e))
                delay = min(delay * 2, self.cfg.reconnect_max_s)

    def _on_message(self, client, userdata, msg):
        q = self.queue
        q.append((msg._topic, msg.payload, msg.mid, msg.qos, msg.timestamp))
        if len(q) >= self.maxsize:
            if len(q) > self.stats.queue_max:
                self.stats.queue_max = len(q)
            if not self.paused:
                self.pause()
        self.wake.set()

    # ------------------------------------------------------------ reading and backpressure

    def _read(self):
        c = self.client
        c.loop_read()
        # bytes left in our buffer (or decrypted in the TLS layer) never make the socket
        # readable again: keep going
        if not self.paused and self._sock is not None and self._unread():
            self._loop.call_soon(self._read_more)

    def _read_more(self):
        if not self.paused and self._sock is not None and self._unread():
            self._read()

    def _unread(self):
        c = self.client
        if isinstance(c, _BufferedClient) and c.buffered():
            return True
        pending = getattr(self._sock, "pending", None)  # ssl.SSLSocket
        return pending is not None and pending() > 0

    def pause(self):
        self.paused = True
        self.stats.paused += 1
        self.stats.paused_since = time.monotonic()
        if self._sock is not None:
            self._loop.remove_reader(self._sock)

    def resume(self):
        if not self.paused:
            return
        self.paused = False
        if self.stats.paused_since is not None:
            self.stats.paused_seconds += time.monotonic() - self.stats.paused_since
            self.stats.paused_since = None
        if self._sock is not None:
            self._loop.add_reader(self._sock, self._read)
            if self._unread():
                self._loop.call_soon(self._read_more)

    def maybe_resume(self):
        if self.paused and len(self.queue) <= self.maxsize // 2:
            self.resume()

    # ------------------------------------------------------------ output

    def puback(self, mids):
        ack = self.client.ack
        for mid, qos in mids:
            if qos == 1:
                ack(mid, 1)

    def publish(self, topic, payload, qos=1, retain=False):
        self.client.publish(topic, payload, qos=qos, retain=retain)
