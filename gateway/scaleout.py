"""One site, several gateways: a gateway process that owns partitions by lease.

    edgeflow-scaleout --id gw1 -c gateway.toml --dir /var/lib/edgeflow --metrics-port 9108 \\
        --nats nats://10.0.0.1:4222,nats://10.0.0.2:4222 --mqtt 10.0.0.1:8883,10.0.0.2:8883 --partitions 8

Security as for one gateway: [mqtt] tls_ca / tls_server_name / username / password_file and
[devices] file are required (or [security] insecure = true); they serve both the NATS
connection (JetStream) and the MQTT output (tools/natsauth.py makes the servers' users).
Metrics: this process's endpoint (--metrics-port, default [metrics] port) has per-partition
metrics (ScaleoutCollector); the partition pipelines serve none of their own.

Ownership: a JetStream key-value bucket (replicas 3) with a TTL of one lease period holds
`p.<n>` = owning gateway id and `gw.<id>` = membership. Every lease/3 a gateway renews its
keys (compare-and-set on the revision), counts the live gateways, and takes free partitions
(create-if-absent) up to its fair share ceil(P / gateways), or gives back one above it
(final checkpoint, then delete the key). A killed gateway's keys expire after the TTL and
the others take its partitions.

State of a partition: its own SQLite file <dir>/part-<n>.db (dedup, watermarks, open
windows, devices, results), i.e. the service's whole checkpoint. The new owner opens it
and restores, then recreates the partition's consumer so everything not acked is
delivered at once. Fencing: the owner holds flock() on <dir>/part-<n>.lock while the
pipeline runs; a paused old owner that still holds it blocks the new one (which gives
the lease back and retries), so two pipelines never write one partition. flock and the
file need storage every gateway of the site can open: one host (gateway processes per
core) or a shared filesystem with working locks.

Gateways on separate disks (--checkpoint replicated, gateway/ckpt.py): every commit's delta
is appended to JetStream before its acks, fenced by the stream's expected last sequence;
a new owner rebuilds the partition file from the latest snapshot + the deltas after it
(its own local copy only if that equals the stream), so no file is shared.
"""
import argparse
import asyncio
import fcntl
import os
import signal
import sys
import time

from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError, NoKeysError

from . import ckpt, logs
from .config import Config, ConfigError
from .ingest_jetstream import STREAM, Link, PartitionIngest, Security, consumer_name, until_ready
from .partitions import fair_share
from .service import Gateway

BUCKET = "edgeflow_leases"


class _Part:
    __slots__ = ("p", "gw", "task", "fd", "rev", "renewed", "since", "pending", "ack_pending", "rep")

    def __init__(self, p, gw, task, fd, rev, now):
        self.p, self.gw, self.task, self.fd, self.rev, self.renewed, self.since = p, gw, task, fd, rev, now, now
        self.pending = self.ack_pending = None  # the partition consumer's backlog (refreshed each tick)
        self.rep = None  # replicated checkpoint: its Replicator


class ScaleoutCollector:
    """Per-partition metrics of one scale-out gateway process ([metrics] port): what it owns,
    lease takeovers, and per owned partition committed records, duplicates, the stream
    backlog of its consumer (lag in messages) and its watermark lag."""

    def __init__(self, owner):
        self.o = owner

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        o, p = self.o, "edgeflow_scaleout_"
        parts = dict(o.parts)
        yield GaugeMetricFamily(p + "partitions_owned", "partitions this gateway runs", value=len(parts))
        yield GaugeMetricFamily(p + "gateways_alive", "gateways of the site (lease bucket members)", value=o.alive)
        yield CounterMetricFamily(p + "partitions_taken", "partitions started here (leases taken)", value=o.taken)
        yield CounterMetricFamily(p + "lease_takeovers", "partitions started here from an existing checkpoint (another owner's, or this one's after a lost lease)",
                                  value=o.takeovers)
        yield CounterMetricFamily(p + "partitions_released", "partitions given back (rebalance, stop)",
                                  value=o.released)
        yield CounterMetricFamily(p + "leases_lost", "partitions stopped: lease lost or not renewed in time",
                                  value=o.lost)
        yield CounterMetricFamily(p + "partitions_fenced", "takes refused: the old owner still held the file lock",
                                  value=o.fenced)
        yield CounterMetricFamily(p + "leases_reclaimed", "leases that expired on the server and were taken back "
                                  "within this gateway's own lease period (the pipeline kept running)",
                                  value=o.reclaimed)
        yield GaugeMetricFamily(p + "last_takeover_start_seconds", "lock + consumer + pipeline start of the last "
                                "partition taken (replicated checkpoint: the rebuild included)", value=o.last_start_s)
        if o.ckpt is not None:
            rb = o.last_rebuild
            yield GaugeMetricFamily(p + "last_rebuild_seconds", "replicated checkpoint: trust check or rebuild of "
                                    "the last partition taken, claim included", value=rb.seconds if rb else 0)
            yield GaugeMetricFamily(p + "last_rebuild_db_bytes", "replicated checkpoint: size of the partition file "
                                    "it produced", value=rb.db_bytes if rb else 0)
            yield CounterMetricFamily(p + "rebuilds", "partitions rebuilt from JetStream (local file not trusted)",
                                      value=o.rebuilds)
        fam = {
            "owned": GaugeMetricFamily(p + "partition_owned", "1 per partition this gateway runs", labels=["partition"]),
            "committed": CounterMetricFamily(p + "partition_committed_records", "new records committed (readings "
                                             "and others, after dedup) since this gateway took the partition",
                                             labels=["partition"]),
            "dups": CounterMetricFamily(p + "partition_duplicates", "records dropped as duplicates",
                                        labels=["partition"]),
            "msgs": CounterMetricFamily(p + "partition_messages", "JetStream messages processed",
                                        labels=["partition"]),
            "pending": GaugeMetricFamily(p + "partition_stream_pending", "messages in the stream not yet delivered "
                                         "to the partition's consumer (lag)", labels=["partition"]),
            "ackp": GaugeMetricFamily(p + "partition_ack_pending", "delivered, not yet acked (not committed)",
                                      labels=["partition"]),
            "queue": GaugeMetricFamily(p + "partition_queue_depth", "messages fetched, waiting for the pipeline",
                                       labels=["partition"]),
            "wm": GaugeMetricFamily(p + "partition_watermark_lag_seconds", "now - the partition's watermark",
                                    labels=["partition"]),
            "age": GaugeMetricFamily(p + "partition_last_commit_age_seconds", "seconds since its last commit",
                                     labels=["partition"]),
            "cdel": CounterMetricFamily(p + "partition_ckpt_deltas", "replicated checkpoint: deltas appended",
                                        labels=["partition"]),
            "cbytes": CounterMetricFamily(p + "partition_ckpt_bytes", "replicated checkpoint: delta bytes appended",
                                          labels=["partition"]),
            "csnap": CounterMetricFamily(p + "partition_ckpt_snapshots", "replicated checkpoint: snapshots stored",
                                         labels=["partition"]),
        }
        now_ms, mono = time.time() * 1000, time.monotonic()
        for n, h in sorted(parts.items()):
            lab, s = ["%d" % n], h.gw.stats
            fam["owned"].add_metric(lab, 1)
            fam["committed"].add_metric(lab, s.readings + s.records)
            fam["dups"].add_metric(lab, s.duplicates)
            fam["msgs"].add_metric(lab, s.messages)
            fam["queue"].add_metric(lab, h.gw.queue_depth())
            if h.pending is not None:
                fam["pending"].add_metric(lab, h.pending)
                fam["ackp"].add_metric(lab, h.ack_pending)
            wm = h.gw.watermarks.global_wm
            if wm is not None:
                fam["wm"].add_metric(lab, (now_ms - wm) / 1000.0)
            if s.last_commit_mono is not None:
                fam["age"].add_metric(lab, mono - s.last_commit_mono)
            if h.rep is not None:
                fam["cdel"].add_metric(lab, h.rep.published)
                fam["cbytes"].add_metric(lab, h.rep.bytes)
                fam["csnap"].add_metric(lab, h.rep.snapshots)
        yield from fam.values()


def serve_metrics(owner, host, port):
    """The process's metrics endpoint (None when port is 0)."""
    if not port:
        return None
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ScaleoutCollector(owner))
    ProcessCollector(registry=reg)
    owner.metrics_registry = reg
    out = start_http_server(port, addr=host, registry=reg)
    return out[0] if isinstance(out, tuple) else out


class Owner:
    def __init__(self, config_path, gid, nats_urls, mqtt_hosts, partitions, data_dir, lease_s=3.0, replicas=3,
                 overrides=None, checkpoint=None):
        """checkpoint: None = the partition files are shared (flock fences); a ckpt.Settings =
        replicated through JetStream (data_dir is this gateway's own)."""
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self.base = Config.load(config_path, self.overrides)  # fail early on a bad file
        # TLS + credentials towards NATS ([mqtt] tls_ca, username, password) and a devices
        # file, as for one gateway on mosquitto; or [security] insecure = true
        self.base.check_secure()
        self.gid = gid
        self.P = partitions
        self.dir = os.path.abspath(data_dir)
        self.lease_s = lease_s
        self.replicas = replicas
        self.link = Link(nats_urls, mqtt_hosts, "edgeflow-gw-%s" % gid, self.base.mqtt.prefix, replicas,
                         ack_wait_s=30.0, security=Security(self.base))
        self.kv = None
        self.parts = {}
        self.alive = 1
        self.taken = 0
        self.released = 0
        self.lost = 0
        self.fenced = 0
        self.takeovers = 0
        self.reclaimed = 0
        self.last_start_s = 0.0
        self.ckpt = checkpoint
        if checkpoint is not None:
            checkpoint.prefix = self.base.mqtt.prefix.replace("/", ".")
            checkpoint.replicas = replicas
        self.obs = None
        self.rebuilds = 0
        self.last_rebuild = None
        self._taking = None  # [partition, lease revision] while a take is in progress
        self.metrics_registry = None
        self.metrics_server = None
        self._stop = None
        # rotate the scan start so that gateways starting together want different partitions
        self._order = sorted(range(partitions), key=lambda p: (p - sum(gid.encode())) % partitions)

    # ------------------------------------------------------------ lifecycle

    def stop(self):
        if self._stop is not None:
            self._stop.set()

    async def run(self):
        self._stop = asyncio.Event()
        os.makedirs(self.dir, exist_ok=True)
        m = self.base.metrics
        try:
            self.metrics_server = serve_metrics(self, m.host, m.port)
        except OSError as e:
            raise ConfigError("metrics endpoint %s:%d: %s (several gateways on one host: --metrics-port)"
                              % (m.host, m.port, e.strerror))
        await self.link.start()
        self.kv = await until_ready(self._bucket, "lease bucket")
        if self.ckpt is not None:
            self.obs = await until_ready(lambda: ckpt.ensure(self.link.js, self.ckpt), "checkpoint stream")
        logs.info("scaleout_started", id=self.gid, partitions=self.P, lease_s=self.lease_s, dir=self.dir)
        lag_task = asyncio.ensure_future(self._lag_loop())
        # join first, take partitions one tick later: gateways starting together then see
        # each other and split the partitions at once instead of moving them afterwards
        try:
            await self.kv.put("gw." + self.gid, b"0")
            await asyncio.wait_for(self._stop.wait(), self.lease_s / 3)
        except asyncio.TimeoutError:
            pass
        except Exception as e:  # noqa: BLE001 - the first tick retries
            logs.warning("lease_tick_failed", error=repr(e))
        try:
            while not self._stop.is_set():
                try:
                    await self._tick()
                except Exception as e:  # noqa: BLE001 - a NATS hiccup: keep what we own until its lease runs out
                    logs.warning("lease_tick_failed", error=repr(e))
                    await self._expire_unrenewed()
                try:
                    await asyncio.wait_for(self._stop.wait(), self.lease_s / 3)
                except asyncio.TimeoutError:
                    pass
        finally:
            lag_task.cancel()
            await asyncio.gather(lag_task, return_exceptions=True)
            for p in sorted(self.parts):
                await self._drop(p, release=True)
            try:
                await self.kv.delete("gw." + self.gid)
                last = not await self._members()
            except Exception:  # noqa: BLE001
                last = False
            await self.link.close(offline=last)
            if self.metrics_server is not None:
                self.metrics_server.shutdown()
            logs.info("scaleout_stopped", id=self.gid, taken=self.taken, released=self.released, lost=self.lost)

    async def _bucket(self):
        js = self.link.js
        try:
            return await js.key_value(BUCKET)
        except BucketNotFoundError:
            return await js.create_key_value(KeyValueConfig(bucket=BUCKET, history=1, ttl=self.lease_s,
                                                            replicas=self.replicas, storage=StorageType.FILE))

    async def _members(self):
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            return []
        return [k for k in keys if k.startswith("gw.")]

    # ------------------------------------------------------------ leases

    async def _tick(self):
        kv = self.kv
        await kv.put("gw." + self.gid, b"%d" % len(self.parts))
        now = time.monotonic()
        for p, h in list(self.parts.items()):
            if h.task.done():  # the pipeline stopped (e.g. a failed commit): give the partition back
                logs.error("partition_pipeline_ended", partition=p,
                           error=repr(h.task.exception()) if not h.task.cancelled() else "cancelled")
                await self._drop(p, release=True)
                continue
            try:
                h.rev = await kv.update(_key(p), self.gid.encode(), last=h.rev)
                h.renewed = now
            except KeyWrongLastSequenceError:
                # the key expired on the server (its TTL runs from the server's store, this
                # side's clock from the reply: a slow reply makes it expire "early"), and
                # maybe another gateway created it and, fenced by our lock, deleted it again.
                # Still within our own lease period and nobody holds the key: take it back,
                # the pipeline never stopped (the lock is the fence: no one else ran it; with
                # the replicated checkpoint the stream is: if another ran it meanwhile, our
                # next append is refused and the pipeline stops there).
                if now - h.renewed <= self.lease_s:
                    try:
                        h.rev = await kv.create(_key(p), self.gid.encode())
                        h.renewed = now
                        self.reclaimed += 1
                        logs.warning("lease_reclaimed", partition=p)
                        continue
                    except KeyWrongLastSequenceError:
                        pass
                # expired and taken by another gateway while this one stalled
                logs.error("lease_lost", partition=p)
                self.lost += 1
                await self._drop(p, release=False)
        await self._expire_unrenewed()
        self.alive = max(1, len(await self._members()))
        target = fair_share(self.P, self.alive)
        if len(self.parts) > target:
            await self._drop(max(self.parts), release=True)
            return
        for p in self._order:
            if len(self.parts) >= target or self._stop.is_set():
                break
            if p in self.parts:
                continue
            try:
                rev = await kv.create(_key(p), self.gid.encode())
            except KeyWrongLastSequenceError:
                continue  # owned by another gateway
            await self._take(p, rev)

    async def _lag_loop(self):
        """The owned partitions' consumer backlog, for the metrics: its own loop with short
        timeouts, so that a slow JetStream (leaders electing) never delays lease renewals."""
        while not self._stop.is_set():
            for n, h in list(self.parts.items()):
                try:
                    ci = await asyncio.wait_for(self.link.js.consumer_info(STREAM, consumer_name(n)), 1.0)
                except Exception:  # noqa: BLE001 - a metric; tried again next round
                    continue
                h.pending, h.ack_pending = ci.num_pending, ci.num_ack_pending
            try:
                await asyncio.wait_for(self._stop.wait(), self.lease_s)
            except asyncio.TimeoutError:
                pass

    async def _expire_unrenewed(self):
        """A lease not renewed for a whole period may belong to someone else by now: stop."""
        now = time.monotonic()
        for p, h in list(self.parts.items()):
            if now - h.renewed > self.lease_s:
                logs.error("lease_expired_locally", partition=p, since_renew_s=round(now - h.renewed, 2))
                self.lost += 1
                await self._drop(p, release=False)

    async def _take(self, p, rev):
        t0 = time.monotonic()
        fd = os.open(os.path.join(self.dir, "part-%03d.lock" % p), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # the old owner still runs it: give the lease back (only our
            self.fenced += 1  # revision: the old owner may have taken it back meanwhile)
            logs.warning("partition_fenced", partition=p)
            try:
                await self.kv.delete(_key(p), last=rev)
            except KeyWrongLastSequenceError:
                pass
            return
        rep = None
        try:
            over = dict(self.overrides)
            over["store.path"] = path = os.path.join(self.dir, "part-%03d.db" % p)
            handover = os.path.exists(path)  # another owner's checkpoint: a takeover
            over["metrics.port"] = 0
            cfg = Config.load(self.config_path, over)
            store = None
            if self.ckpt is not None:
                # trust the local file or rebuild it from JetStream, then claim (fences the old owner)
                try:
                    rep, info = await self._while_renewing(
                        ckpt.prepare(self.link.js, self.obs, self.ckpt, p, path, self.gid), p, rev)
                except ckpt.Fenced as e:
                    os.close(fd)
                    self.fenced += 1
                    logs.warning("partition_fenced", partition=p, error=str(e))
                    try:
                        await self.kv.delete(_key(p), last=self._taking_rev(rev))
                    except KeyWrongLastSequenceError:
                        pass
                    return
                handover = not info.trusted or handover
                self.rebuilds += not info.trusted
                self.last_rebuild = info
                logs.info("partition_checkpoint", partition=p, **info.as_dict())
                store = ckpt.ReplicatedStore(path, cfg.store.synchronous, rep)
            await self.link.reset_consumer(p)
            link = self.link
            gw = Gateway(cfg, ingest_factory=lambda c, s, p=p: PartitionIngest(link, p, c, s), store=store)
            task = asyncio.ensure_future(gw.run())
            started = asyncio.ensure_future(gw.started.wait())
            await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            if task.done():
                task.result()  # raises: the partition is released below
        except Exception as e:  # noqa: BLE001
            logs.error("partition_start_failed", partition=p, error=repr(e))
            self._taking = None
            os.close(fd)
            if rep is not None:
                await rep.close()
            await self.kv.delete(_key(p))
            return
        rev = self._taking_rev(rev)
        self.parts[p] = _Part(p, gw, task, fd, rev, time.monotonic())
        self.parts[p].rep = rep
        self.taken += 1
        self.takeovers += handover
        self.last_start_s = time.monotonic() - t0
        self.link.out.announce()  # devices of this partition may have seen a will say offline
        logs.info("partition_taken", partition=p, id=self.gid, start_ms=round((time.monotonic() - t0) * 1000),
                  owned=sorted(self.parts))

    def _taking_rev(self, rev):
        t, self._taking = self._taking, None
        return t[1] if t is not None else rev

    async def _while_renewing(self, coro, p, rev):
        """Await coro (a rebuild can take longer than a lease) while renewing every lease
        this gateway holds, the one being taken included, every lease/3."""
        self._taking = [p, rev]
        task = asyncio.ensure_future(coro)
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=self.lease_s / 3)
                if done:
                    return task.result()
                await self._renew_during_take()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _renew_during_take(self):
        """Renewals only; losses are handled by the next tick."""
        kv, now = self.kv, time.monotonic()
        try:
            await kv.put("gw." + self.gid, b"%d" % len(self.parts))
            for h in list(self.parts.values()):
                try:
                    h.rev = await kv.update(_key(h.p), self.gid.encode(), last=h.rev)
                    h.renewed = now
                except KeyWrongLastSequenceError:
                    pass
            t = self._taking
            if t is not None:
                t[1] = await kv.update(_key(t[0]), self.gid.encode(), last=t[1])
        except Exception as e:  # noqa: BLE001 - a NATS hiccup: the next renewal or tick tries again
            logs.warning("lease_renew_failed", error=repr(e))

    async def _drop(self, p, release):
        h = self.parts.pop(p, None)
        if h is None:
            return
        h.gw.stop()
        try:
            await asyncio.wait_for(asyncio.shield(h.task), 30)
        except Exception as e:  # noqa: BLE001 - logged; the lock goes below either way
            logs.error("partition_stop_failed", partition=p, error=repr(e))
        os.close(h.fd)
        if release:
            try:
                await self.kv.delete(_key(p))
            except Exception:  # noqa: BLE001 - the TTL frees it anyway
                pass
            self.released += 1
        logs.info("partition_released" if release else "partition_dropped", partition=p, id=self.gid,
                  owned=sorted(self.parts))


def _key(p):
    return "p.%03d" % p


async def rebuild_all(config_path, nats_urls, partitions, out_dir, overrides=None):
    """Every partition's file rebuilt from the replicated checkpoint into out_dir
    (part-<p>.db; e.g. for gateway/merge.py, or to check a gateway's files against the
    stream). Returns {partition: ckpt.Rebuild}."""
    import nats
    cfg = Config.load(config_path, dict(overrides or {}))
    cfg.check_secure()
    st = ckpt.Settings(prefix=cfg.mqtt.prefix.replace("/", "."))
    nc = await nats.connect(list(nats_urls), connect_timeout=5, **Security(cfg).nats_options())
    try:
        js = nc.jetstream(timeout=10)
        obs = await until_ready(lambda: ckpt.ensure(js, st), "checkpoint stream")
        out = {}
        for p in range(partitions):
            out[p], _ = await ckpt.rebuild(js, obs, st, p, os.path.join(out_dir, "part-%03d.db" % p))
        return out
    finally:
        await nc.close()


def _hosts(spec):
    out = []
    for part in spec.split(","):
        h, _, port = part.strip().rpartition(":")
        out.append((h or "127.0.0.1", int(port)))
    return out


def build_parser():
    ap = argparse.ArgumentParser(prog="edgeflow-scaleout", description=__doc__.split("\n\n")[0])
    ap.add_argument("--id", required=True, help="this gateway's id (unique on the site)")
    ap.add_argument("-c", "--config", help="gateway TOML (windows, watermark, checkpoint...; store.path is per partition)")
    ap.add_argument("--nats", required=True, help="comma-separated NATS URLs of the cluster")
    ap.add_argument("--mqtt", required=True, help="comma-separated host:port of the cluster's MQTT listeners")
    ap.add_argument("--partitions", type=int, required=True, help="P: must equal the servers' mapping")
    ap.add_argument("--dir", required=True, help="directory of the partitions' SQLite files (shared by the site's "
                    "gateways; with --checkpoint replicated this gateway's own)")
    ap.add_argument("--lease-s", type=float, default=3.0, help="lease TTL; takeover takes about this plus a tick")
    ap.add_argument("--replicas", type=int, default=3, help="stream and bucket replicas")
    ap.add_argument("--checkpoint", choices=("shared", "replicated"), default="shared",
                    help="shared: partition files on storage every gateway opens (flock fences); replicated: "
                    "each commit's delta in JetStream, a new owner rebuilds from it (gateways on separate disks)")
    ap.add_argument("--ckpt-max-bytes", type=int, default=1 << 30,
                    help="replicated: bound of the checkpoint stream (full: commits wait, then the pipeline stops)")
    ap.add_argument("--snapshot-min-bytes", type=int, default=8 << 20,
                    help="replicated: snapshot a partition once its deltas since the last snapshot exceed "
                    "max(this, the last snapshot's size); older deltas are then purged")
    ap.add_argument("--ckpt-publish-timeout-s", type=float, default=30.0,
                    help="replicated: how long a commit's acks wait for JetStream before the pipeline stops")
    ap.add_argument("--rebuild-to", metavar="DIR", default=None,
                    help="replicated: rebuild every partition's file from JetStream into DIR, then exit "
                    "(no lease taken; e.g. for edgeflow-merge)")
    ap.add_argument("--metrics-port", type=int, default=None,
                    help="this process's metrics port (default [metrics] port; 0 = none)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.rebuild_to:
        try:
            got = asyncio.run(rebuild_all(args.config, args.nats.split(","), args.partitions, args.rebuild_to))
        except (ConfigError, ValueError) as e:
            print("edgeflow-scaleout: %s" % e, file=sys.stderr)
            return 2
        for p, info in sorted(got.items()):
            print("partition %d: %s" % (p, info.as_dict()))
        return 0
    try:
        over = {} if args.metrics_port is None else {"metrics.port": args.metrics_port}
        st = None
        if args.checkpoint == "replicated":
            st = ckpt.Settings(max_bytes=args.ckpt_max_bytes, publish_timeout_s=args.ckpt_publish_timeout_s,
                               snapshot_min_bytes=args.snapshot_min_bytes)
        owner = Owner(args.config, args.id, args.nats.split(","), _hosts(args.mqtt), args.partitions, args.dir,
                      args.lease_s, args.replicas, overrides=over, checkpoint=st)
    except (ConfigError, ValueError) as e:
        print("edgeflow-scaleout: %s" % e, file=sys.stderr)
        return 2
    logs.setup(owner.base.log.level, owner.base.log.format)

    async def go():
        loop = asyncio.get_running_loop()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, owner.stop)
        await owner.run()

    try:
        asyncio.run(go())
    except ConfigError as e:
        print("edgeflow-scaleout: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
