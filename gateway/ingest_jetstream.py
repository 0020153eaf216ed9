"""Ingest from a NATS JetStream cluster that speaks MQTT (one site, several gateways).

Devices publish MQTT to any NATS node; the servers map each device subject to its partition
(gateway/partitions.py) and the stream EDGEFLOW (replicas 3, work-queue retention) keeps it
until a gateway acks it. One gateway process owns some partitions (gateway/scaleout.py) and
runs one service pipeline (gateway/service.py Gateway) per owned partition, each with its
own SQLite checkpoint. PartitionIngest is the ingest interface that pipeline uses (the same
one gateway/ingest.py gives it on mosquitto):

    queue of (topic bytes, payload, mid, qos, receipt time.monotonic()), wake, maxsize, paused, closing, connected,
    start(), stop(offline), pause(), resume(), maybe_resume(), puback(mids), publish(...)

- mid is the JetStream message; puback() acks it, and the service calls puback() only after
  the SQLite commit holding its effects (the role the deferred MQTT PUBACK plays on mosquitto).
- Backpressure: a pull consumer, fetches bounded by the free room in the queue; nothing is
  fetched while the queue is full, so the pressure stays in JetStream (stream max_bytes).
- Output (device acks, credits, the gateway state) goes back through NATS's MQTT side
  (MqttOut): acks are QoS 1 on the device's ack topic; the gateway state is retained with an
  offline last will.
- Security: the [mqtt] settings of the gateway config serve both sides: TLS with the fleet CA
  pinned and tls_server_name checked, user name and password (tools/natsauth.py gives that
  user only its stream, its lease bucket, acks and the gateway state).
"""
import asyncio
import collections
import random
import threading
import time

import nats
import paho.mqtt.client as mqtt
from nats.errors import ConnectionClosedError, NoServersError, TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, \
    StreamConfig
from nats.js.errors import APIError, NotFoundError
from paho.mqtt.enums import CallbackAPIVersion

from shared import wire

from . import logs
from .ingest import tls_context
from .partitions import partition_filter, stream_subjects, subject_topic

STREAM = "EDGEFLOW"


def consumer_name(p):
    return "part-%03d" % p


class MqttOut:
    """Publisher for acks and the gateway state through NATS's MQTT listeners.

    paho runs its own network thread (publish() is thread-safe); on a lost connection it
    moves to the next host of the list, like the firmware's host list."""

    def __init__(self, hosts, client_id, prefix="edgeflow", keepalive=10, security=None):
        self.hosts = list(hosts)  # [(host, port)]
        self.i = 0
        self.topics = wire.Topics(prefix)
        self.closing = False
        self.connected = threading.Event()
        c = self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        c.max_inflight_messages_set(0)
        c.max_queued_messages_set(10000)  # bounded: acks are cumulative, a lost one is resent later
        c.will_set(self.topics.gw_state, wire.encode_state(False, gateway=True), qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        c.on_message = self._on_message
        c.reconnect_delay_set(0.1, 2)
        if security is not None:
            if security.user:
                c.username_pw_set(security.user, security.password)
            if security.tls is not None:
                c.tls_set_context(security.tls)
        self.keepalive = keepalive

    def start(self):
        h, p = self.hosts[self.i]
        self.client.connect_async(h, p, keepalive=self.keepalive)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            logs.error("mqtt_out_refused", reason=str(reason_code))
            return
        client.subscribe(self.topics.gw_state, qos=1)
        self.announce()
        self.connected.set()
        logs.info("mqtt_out_connected", host="%s:%d" % self.hosts[self.i])

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        if not self.closing:
            logs.warning("mqtt_out_disconnected", reason=str(reason_code), next="%s:%d" % self._next_host())

    def _on_connect_fail(self, client, userdata):
        # a dead node refuses the TCP connect: no on_disconnect then, so move on here too
        if not self.closing:
            self._next_host()

    def _next_host(self):
        """The next host of the list; paho's own reconnect (backoff 0.1..2 s) then uses it."""
        self.i = (self.i + 1) % len(self.hosts)
        h, p = self.hosts[self.i]
        try:
            self.client.connect_async(h, p, keepalive=self.keepalive)
        except (OSError, ValueError):
            pass
        return h, p

    def _on_message(self, client, userdata, msg):
        # another gateway's last will said 'offline' while this one is up: the site is up
        if not self.closing and msg.topic == self.topics.gw_state:
            try:
                online = wire.decode_state(msg.payload)
            except wire.WireError:
                online = True
            if not online:
                self.announce()

    def announce(self):
        self.client.publish(self.topics.gw_state, wire.encode_state(True, gateway=True), qos=1, retain=True)

    def publish(self, topic, payload, qos=1, retain=False):
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def stop(self, offline=False):
        """offline: publish the retained offline state (the last gateway of a site leaving)."""
        self.closing = True
        c = self.client
        if offline and c.is_connected():
            info = c.publish(self.topics.gw_state, wire.encode_state(False, gateway=True), qos=1, retain=True)
            try:
                info.wait_for_publish(2)
            except (RuntimeError, ValueError):
                pass
        c.disconnect()
        c.loop_stop()


async def until_ready(op, what, deadline_s=120.0, first_s=0.25, cap_s=4.0):
    """Run op() until it succeeds. A freshly started (or just healed) JetStream cluster answers
    its API with timeouts or 'no leader' errors for a while: retried with backoff and full
    jitter, logged, up to deadline_s; anything else, or the deadline, raises."""
    t0 = time.monotonic()
    delay = first_s
    while True:
        try:
            return await op()
        except (NatsTimeout, APIError) as e:
            if isinstance(e, NotFoundError) or time.monotonic() - t0 + delay > deadline_s:
                raise
            logs.warning("jetstream_not_ready", what=what, error=repr(e), retry_s=round(delay, 2))
        await asyncio.sleep(random.uniform(0, delay))
        delay = min(cap_s, delay * 2)


class Security:
    """TLS context (CA pinned, name checked) and credentials for NATS and its MQTT side, from a
    gateway config's [mqtt] section; tls None / user "" = that part off (insecure set-ups)."""

    def __init__(self, cfg):
        from .config import ConfigError
        m = cfg.mqtt
        if m.tls_ca and not m.tls_server_name:
            # the nodes are reached by several addresses (--nats, --mqtt): one name to check
            raise ConfigError("mqtt.tls_server_name: the name in the NATS nodes' certificate (with mqtt.tls_ca)")
        self.tls = tls_context(m) if m.tls_ca else None
        self.server_name = m.tls_server_name or None
        self.user = m.username
        self.password = cfg.mqtt_password() if m.username else None

    def nats_options(self):
        kw = {}
        if self.tls is not None:
            kw["tls"] = self.tls
            if self.server_name:
                kw["tls_hostname"] = self.server_name
        if self.user:
            kw["user"], kw["password"] = self.user, self.password
        return kw


class Link:
    """One gateway process's connections: NATS (JetStream) and the MQTT publisher."""

    def __init__(self, nats_urls, mqtt_hosts, client_id, prefix="edgeflow", replicas=3, max_bytes=256 << 20,
                 ack_wait_s=30.0, security=None):
        self.security = security
        self.urls = list(nats_urls)
        self.prefix = prefix
        self.replicas = replicas
        self.max_bytes = max_bytes
        self.ack_wait_s = ack_wait_s
        self.nc = None
        self.js = None
        self.name = client_id
        self.out = MqttOut(mqtt_hosts, client_id, prefix, security=security)

    async def start(self):
        kw = self.security.nats_options() if self.security is not None else {}
        self.nc = await nats.connect(self.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                     connect_timeout=2, allow_reconnect=True, name=self.name,
                                     error_cb=self._error, disconnected_cb=self._disc, reconnected_cb=self._reconn, **kw)
        self.js = self.nc.jetstream(timeout=5)
        await until_ready(self.ensure_stream, "stream")
        self.out.start()
        return self

    async def _error(self, e):
        logs.warning("nats_error", error=repr(e))

    async def _disc(self):
        logs.warning("nats_disconnected")

    async def _reconn(self):
        logs.info("nats_reconnected", url=str(self.nc.connected_url.netloc) if self.nc.connected_url else "")

    async def ensure_stream(self):
        """Create or find the stream. NotFoundError is answered here; a cluster still electing
        its leaders answers with timeouts or 503s, which until_ready() retries."""
        cfg = StreamConfig(name=STREAM, subjects=stream_subjects(self.prefix), retention=RetentionPolicy.WORK_QUEUE,
                           storage=StorageType.FILE, num_replicas=self.replicas, max_bytes=self.max_bytes,
                           discard=DiscardPolicy.NEW)
        try:
            await self.js.stream_info(STREAM)
        except NotFoundError:
            try:
                await self.js.add_stream(cfg)
            except nats.js.errors.BadRequestError:  # created by another gateway meanwhile
                await self.js.stream_info(STREAM)

    async def reset_consumer(self, p):
        """Fresh durable consumer for partition p: every message still in the stream (work
        queue: not acked by anyone) is delivered at once. The old owner's unacked deliveries
        would otherwise wait for ack_wait; acked ones are gone, so nothing committed is re-read
        except what the old owner committed but had not acked yet (dedup: counted duplicates)."""
        name = consumer_name(p)
        try:
            await self.js.delete_consumer(STREAM, name)
        except NotFoundError:
            pass
        cc = ConsumerConfig(durable_name=name, filter_subject=partition_filter(self.prefix, p),
                            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                            ack_wait=self.ack_wait_s, max_ack_pending=20000, max_waiting=16)
        await self.js.add_consumer(STREAM, cc)

    async def close(self, offline=False):
        self.out.stop(offline)
        if self.nc is not None and not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:  # noqa: BLE001 - closing anyway
                await self.nc.close()


class PartitionIngest:
    """The service's ingest for one partition (see the module doc)."""

    def __init__(self, link, partition, cfg, stats, fetch_max=256):
        self.link = link
        self.p = partition
        self.cfg = cfg.mqtt
        self.stats = stats
        self.queue = collections.deque()
        self.maxsize = cfg.mqtt.queue_size
        self.fetch_max = fetch_max
        self.wake = asyncio.Event()
        self.connected = asyncio.Event()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self.paused = False
        self.closing = False
        self._task = None
        self._acks = set()
        self._sub = None
        self.acked = 0

    async def start(self):
        self._sub = await self.link.js.pull_subscribe(partition_filter(self.link.prefix, self.p),
                                                      durable=consumer_name(self.p), stream=STREAM)
        self.stats.connects += 1
        self.connected.set()
        self._task = asyncio.ensure_future(self._fetch_loop())

    async def _fetch_loop(self):
        q = self.queue
        delay = 0.1
        while not self.closing:
            if self.paused:
                await self._resumed.wait()
                continue
            room = min(self.fetch_max, self.maxsize - len(q))
            if room <= 0:
                self.pause()
                continue
            try:
                msgs = await self._sub.fetch(room, timeout=1.0)
            except (NatsTimeout, asyncio.TimeoutError):  # nats-py raises the plain one when a pull ends early
                continue
            except asyncio.CancelledError:
                raise
            except (ConnectionClosedError, NoServersError, nats.errors.Error, OSError) as e:
                # a NATS node died: the client reconnects to another; fetch again after a pause
                self.stats.disconnects += 1
                logs.warning("jetstream_fetch_failed", partition=self.p, error=repr(e))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            rx = time.monotonic()  # receipt time (the service measures ingest-to-commit latency)
            for m in msgs:
                q.append((subject_topic(m.subject), m.data, m, 1, rx))
            if msgs:
                if len(q) > self.stats.queue_max:
                    self.stats.queue_max = len(q)
                self.wake.set()

    def pause(self):
        if not self.paused:
            self.paused = True
            self.stats.paused += 1
            self._resumed.clear()

    def resume(self):
        if self.paused:
            self.paused = False
            self._resumed.set()

    def maybe_resume(self):
        if self.paused and len(self.queue) <= self.maxsize // 2:
            self.resume()

    def puback(self, mids):
        """Called after the commit: ack those JetStream messages (in the background)."""
        msgs = [m for m, _qos in mids]
        if msgs:
            t = asyncio.ensure_future(self._ack(msgs))
            self._acks.add(t)
            t.add_done_callback(self._acks.discard)

    async def _ack(self, msgs):
        for m in msgs:
            try:
                await m.ack()
                self.acked += 1
            except Exception as e:  # noqa: BLE001 - an unacked message is redelivered: dedup counts it
                logs.warning("jetstream_ack_failed", partition=self.p, error=repr(e))
                return

    def publish(self, topic, payload, qos=1, retain=False):
        self.link.out.publish(topic, payload, qos, retain)

    async def stop(self, offline=True):
        """Stop fetching and flush the acks of what was committed (offline state: Link's job)."""
        self.closing = True
        self._resumed.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._acks:
            await asyncio.gather(*list(self._acks), return_exceptions=True)
        try:
            await self.link.nc.flush(timeout=2)
        except Exception:  # noqa: BLE001 - unflushed acks mean redelivery, which dedup absorbs
            pass
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001
                pass
