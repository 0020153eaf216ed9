"""NATS JetStream sink: publish each outbox item with Nats-Msg-Id = its id; delete it only
after the stream's PubAck (the stream has stored it, on `replicas` servers).

The stream (created here when create_stream is on, and by the collector): subjects
<subject_prefix>.>, work-queue retention (a message is removed once the collector acked
it), discard NEW when max_bytes is reached (publishers get an error and keep the items in
their outbox: nothing a collector has not read is ever discarded by the stream), file
storage, duplicate window = duplicate_window_s.
"""
import asyncio

import nats
from nats.js import api
from nats.js.errors import BadRequestError

from .. import logs


def stream_config(name, subject_prefix, replicas=1, max_bytes=1 << 30, duplicate_window_s=600.0, retention="workqueue",
                  max_age_s=0.0):
    ret = api.RetentionPolicy.LIMITS if retention == "limits" else api.RetentionPolicy.WORK_QUEUE
    return api.StreamConfig(name=name, subjects=[subject_prefix + ".>"], retention=ret,
                            discard=api.DiscardPolicy.NEW, max_bytes=max_bytes, storage=api.StorageType.FILE,
                            num_replicas=replicas, duplicate_window=duplicate_window_s, max_age=max_age_s or None)


async def ensure_stream(js, cfg):
    """Create the stream if it does not exist; an existing one is kept as it is (logged)."""
    try:
        await js.stream_info(cfg.name)
        return False
    except nats.js.errors.NotFoundError:
        pass
    try:
        await js.add_stream(cfg)
        logs.info("jetstream_stream_created", stream=cfg.name, replicas=cfg.num_replicas, max_bytes=cfg.max_bytes,
                  duplicate_window_s=cfg.duplicate_window)
        return True
    except BadRequestError as e:
        if e.err_code != 10058:  # not "name already in use" (created meanwhile): retried by the caller
            raise
        logs.info("jetstream_stream_exists", stream=cfg.name)
        return False


def security_options(c):
    """nats.connect() keywords from a sink's or the collector's NATS settings: TLS with only
    tls_ca trusted and tls_server_name checked; user + password_file (first line) or a .creds
    file. Raises ValueError on an unreadable file."""
    kw = {}
    if c.get("credentials"):
        kw["user_credentials"] = c["credentials"]
    if c.get("tls_ca"):
        from types import SimpleNamespace

        from ..ingest import tls_context  # the gateway's own TLS set-up (a ConfigError is a ValueError)
        kw["tls"] = tls_context(SimpleNamespace(host=None, tls_server_name=c.get("tls_server_name"),
                                                tls_ca=c["tls_ca"], tls_cert="", tls_key=""))
        if c.get("tls_server_name"):
            kw["tls_hostname"] = c["tls_server_name"]
    if c.get("user"):
        kw["user"] = c["user"]
        if c.get("password_file"):
            try:
                with open(c["password_file"]) as f:
                    kw["password"] = f.readline().strip()
            except OSError as e:
                raise ValueError("password_file %s: %s" % (c["password_file"], e.strerror))
    return kw


async def connect(servers, name, credentials="", **security):
    """security: tls_ca, tls_server_name, user, password_file (see security_options)."""
    kw = security_options(dict(security, credentials=credentials))
    return await nats.connect(servers=servers, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                              connect_timeout=5, allow_reconnect=True, **kw)


NATS_SECURITY_KEYS = ("tls_ca", "tls_server_name", "user", "password_file")


async def close_quietly(nc):
    """Close a NATS connection, bounded (5 s), whatever state it is in."""
    try:
        await asyncio.wait_for(nc.close(), 5)
    except (Exception, asyncio.TimeoutError):  # noqa: BLE001 - closing anyway
        pass


class JetStreamSink:
    def __init__(self, cfg, site):
        self.cfg = cfg
        self.site = site
        self.nc = None
        self.js = None
        self.stream_ok = False
        self.duplicates = 0  # PubAcks saying "duplicate": a resend inside the window

    async def open(self):
        pass  # connects lazily in send(): a sink that is down must not stop the gateway's start

    async def _connect(self):
        c = self.cfg
        self.nc = await connect(c["servers"], "edgeflow-gateway-%s-%s" % (self.site, c["name"]), c["credentials"],
                                **{k: c[k] for k in NATS_SECURITY_KEYS})
        self.js = self.nc.jetstream(timeout=c["timeout_s"])
        logs.info("sink_connected", sink=c["name"], type="jetstream", servers=",".join(c["servers"]))

    async def send(self, items):
        c = self.cfg
        if self.nc is not None and self.nc.is_closed:  # gave up (closed by an error): start over
            self.nc = self.js = None
            self.stream_ok = False
        if self.nc is None:
            await asyncio.wait_for(self._connect(), c["timeout_s"])
        if not self.stream_ok and c["create_stream"]:
            await ensure_stream(self.js, stream_config(c["stream"], c["subject_prefix"], c["replicas"],
                                                       c["max_stream_bytes"], c["duplicate_window_s"], c["retention"],
                                                       c["max_age_s"]))
            self.stream_ok = True
        pre = "%s.%s." % (c["subject_prefix"], self.site)
        res = await asyncio.gather(*[
            self.js.publish(pre + i.table, i.body, timeout=c["timeout_s"], stream=c["stream"],
                            headers={"Nats-Msg-Id": i.msg_id}) for i in items], return_exceptions=True)
        done, err = [], ""
        for i, r in zip(items, res):
            if isinstance(r, BaseException):
                err = err or "%s: %s" % (type(r).__name__, r)
            else:
                done.append(i)
                if r.duplicate:
                    self.duplicates += 1
        return done, [], err

    async def close(self):
        if self.nc is not None:
            await close_quietly(self.nc)
            self.nc = None
