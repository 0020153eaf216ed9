"""Replicated checkpoint of a partition (one site, several gateways on separate disks).

With `edgeflow-scaleout --checkpoint replicated` no gateway needs another's files: every
commit's state delta (the `writes` list Store.commit applies: (sql key, rows)) goes to
JetStream, and a new owner rebuilds the partition's SQLite file from there.

    stream EDGEFLOW_CKPT (replicas 3, limits retention, discard new, max_bytes bounded)
      <prefix>.ckpt.<p>.d   the deltas of partition p, in commit order (chunked if large)
      <prefix>.ckpt.<p>.s   snapshot markers: {"object", "seq", "ckpt_id"}
    object store edgeflow_ckpt   p<p>-<seq>: the partition DB as of delta seq

Commit (ReplicatedStore.commit, the service's store: it acks only after commit() returned):
the delta is stamped with a unique id (meta ckpt_id, in the same transaction), committed
locally and, at the same time, appended with Nats-Expected-Last-Subject-Sequence = the last
sequence this owner applied. JetStream refuses it when anyone else appended since: the
fence. A refused or unreplicated delta (NATS unreachable past publish_timeout_s), or a
failed local commit, raises StoreError: the pipeline stops and acks nothing. The stream is
the truth; a local file is only trusted while its ckpt_id is the stream's last.

Takeover (prepare()): trust the local file only if its ckpt_id equals the stream's last
delta; otherwise rebuild a fresh file from the latest snapshot + the deltas after it, then
publish a claim (no data; it folds the state journal) that fences any older owner still running.

Snapshots keep the stream bounded: after a commit, once the deltas since the last snapshot
exceed max(snapshot_min_bytes, the last snapshot's size), the DB is copied (SQLite backup,
queued in the database thread right after the commit: exactly the state of that delta),
uploaded in the background, its marker published (fenced like the deltas), and the deltas
before it purged. Not replicated (each owner redoes them): retention pruning, and the sink
outbox deletions (a rebuilt partition resends items: receivers dedup by key, docs/sinks.md).
"""
import asyncio
import json
import os
import random
import secrets
import sqlite3
import time
import zlib

import msgpack
import nats
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, ObjectStoreConfig, \
    RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError

from . import logs
from .store import Database, Store, StoreError, _transaction, create_schema, fold_journal

STREAM = "EDGEFLOW_CKPT"
BUCKET = "edgeflow_ckpt"
HDR = "Edgeflow-Ckpt"  # "<ckpt id> <chunk index> <chunks>"
_WRONG_LAST = 10071  # JetStream: wrong last sequence
_FMT_RAW, _FMT_ZLIB = 1, 2
_EXT_BIGINT = 1


# ---------------------------------------------------------------- exact encoding of a delta

def _big(o):
    if isinstance(o, int) and not -(1 << 63) <= o < (1 << 64):
        return msgpack.ExtType(_EXT_BIGINT, str(o).encode())
    if isinstance(o, (list, tuple)):
        return [_big(x) for x in o]
    return o


def _ext(code, data):
    if code == _EXT_BIGINT:
        return int(data.decode())
    raise ValueError("unknown ext type %d" % code)


def encode(writes, compress=True):
    """writes -> bytes. Exact: None, bool, int (any size), float (64-bit, NaN/inf too),
    str, bytes; rows come back as tuples."""
    body = [[k, rows] for k, rows in writes if rows]
    try:
        raw = msgpack.packb(body, use_bin_type=True)
    except OverflowError:  # an int beyond 64 bits: the slow path tags it
        raw = msgpack.packb(_big(body), use_bin_type=True)
    if compress:
        return bytes([_FMT_ZLIB]) + zlib.compress(raw, 1)
    return bytes([_FMT_RAW]) + raw


def decode(data):
    if not data:
        raise ValueError("empty delta")
    fmt, raw = data[0], data[1:]
    if fmt == _FMT_ZLIB:
        d = zlib.decompressobj()
        raw = d.decompress(raw, 1 << 30)
        if d.unconsumed_tail:
            raise ValueError("delta over 1 GiB")
        if not d.eof:
            raise ValueError("delta truncated")
    elif fmt != _FMT_RAW:
        raise ValueError("unknown delta format %d" % fmt)
    body = msgpack.unpackb(raw, use_list=False, raw=False, ext_hook=_ext, max_bin_len=1 << 30, max_str_len=1 << 30)
    return [(k, list(rows)) for k, rows in body]


# ---------------------------------------------------------------- JetStream side

def delta_subject(prefix, p):
    return "%s.ckpt.%d.d" % (prefix, p)


def snap_subject(prefix, p):
    return "%s.ckpt.%d.s" % (prefix, p)


class Fenced(Exception):
    """Someone else appended to the partition's checkpoint: this owner is stale."""


class Settings:
    def __init__(self, prefix="edgeflow", replicas=3, max_bytes=1 << 30, publish_timeout_s=30.0,
                 max_chunk=1 << 20, snapshot_min_bytes=8 << 20, snapshot_ratio=1.0, compress=True):
        self.prefix = prefix
        self.replicas = replicas
        self.max_bytes = max_bytes
        self.publish_timeout_s = publish_timeout_s
        self.max_chunk = max_chunk
        self.snapshot_min_bytes = snapshot_min_bytes
        # snapshot when the deltas since the last one exceed max(min, ratio x its size): the
        # stream holds at most about (1 + ratio) x the DB, and snapshots cost at most 1/ratio
        # of the delta bytes (amortized)
        self.snapshot_ratio = snapshot_ratio
        self.compress = compress


async def ensure(js, st):
    """The checkpoint stream and the snapshot bucket (created if missing)."""
    cfg = StreamConfig(name=STREAM, subjects=["%s.ckpt.>" % st.prefix], retention=RetentionPolicy.LIMITS,
                       storage=StorageType.FILE, num_replicas=st.replicas, max_bytes=st.max_bytes,
                       discard=DiscardPolicy.NEW, duplicate_window=120)
    try:
        await js.stream_info(STREAM)
    except NotFoundError:
        try:
            await js.add_stream(cfg)
        except nats.js.errors.BadRequestError:  # another gateway created it meanwhile
            await js.stream_info(STREAM)
    try:
        return await js.object_store(BUCKET)
    except BucketNotFoundError:
        return await js.create_object_store(BUCKET, ObjectStoreConfig(bucket=BUCKET, replicas=st.replicas,
                                                                      storage=StorageType.FILE,
                                                                      max_bytes=st.max_bytes))


async def _last(js, subject):
    try:
        return await js.get_last_msg(STREAM, subject)
    except NotFoundError:
        return None


def _hdr(m):
    h = (m.headers or {}).get(HDR, "")
    cid, k, n = h.split(" ")
    return cid, int(k), int(n)


class Replicator:
    """One partition's append side: ids, the fence, chunking, bounded retries, snapshots."""

    def __init__(self, js, obs, st, p, gid, last_seq, last_snap_seq, snap_obj=None, snap_size=0):
        self.js, self.obs, self.st, self.p = js, obs, st, p
        self.subject = delta_subject(st.prefix, p)
        self.snap_subject = snap_subject(st.prefix, p)
        self.token = "%s-%s" % (gid, secrets.token_hex(4))
        self.n = 0
        self.last = last_seq  # stream sequence of the last delta this owner applied (0: none)
        self.last_snap = last_snap_seq
        self.snap_obj = snap_obj
        self.snap_size = snap_size
        self.since_snap = 0
        self.published = self.bytes = self.retries = self.snapshots = self.snapshot_failures = 0
        self.snapshot_last_s = 0.0
        self._snap_task = None

    def next_id(self):
        self.n += 1
        return "%s-%d" % (self.token, self.n)

    async def publish(self, cid, writes):
        """Append one delta; Fenced or StoreError if not replicated. Encoded in a worker
        thread (zlib releases the GIL: it overlaps the event loop and the SQLite commit)."""
        data = await asyncio.get_running_loop().run_in_executor(None, encode, writes, self.st.compress)
        chunks = [data[i:i + self.st.max_chunk] for i in range(0, len(data), self.st.max_chunk)] or [b""]
        for k, c in enumerate(chunks):
            self.last = await self._append(self.subject, c, "%s.%d" % (cid, k), self.last,
                                           {HDR: "%s %d %d" % (cid, k, len(chunks))})
        self.published += 1
        self.bytes += len(data)
        self.since_snap += len(data)
        return len(data)

    async def _append(self, subject, payload, msg_id, expect, headers):
        """One fenced publish, retried with the same Nats-Msg-Id (the stream drops a resend
        that was stored already) until publish_timeout_s. Returns its stream sequence."""
        h = dict(headers)
        h["Nats-Msg-Id"] = msg_id
        h["Nats-Expected-Last-Subject-Sequence"] = str(expect)
        t0 = time.monotonic()
        delay = 0.05
        while True:
            try:
                ack = await self.js.publish(subject, payload, headers=h, timeout=5)
                return ack.seq
            except APIError as e:
                if e.err_code == _WRONG_LAST:
                    # ours already stored (a lost PubAck, then a resend)? else: fenced
                    m = await _last(self.js, subject)
                    if m is not None and (m.headers or {}).get("Nats-Msg-Id") == msg_id:
                        return m.seq
                    raise Fenced("partition %d: %s" % (self.p, e.description))
                err = e
            except (NatsTimeout, nats.errors.Error, OSError) as e:
                err = e
            self.retries += 1
            if time.monotonic() - t0 + delay > self.st.publish_timeout_s:
                raise StoreError("checkpoint of partition %d not replicated within %.0f s: %r"
                                 % (self.p, self.st.publish_timeout_s, err))
            logs.warning("ckpt_publish_retry", partition=self.p, error=repr(err), retry_s=round(delay, 2))
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, 2.0)

    # ------------------------------------------------------------ snapshots

    def want_snapshot(self):
        busy = self._snap_task is not None and not self._snap_task.done()
        return not busy and self.since_snap >= max(self.st.snapshot_min_bytes, self.st.snapshot_ratio * self.snap_size)

    def start_snapshot(self, db, path, ckpt_id):
        """Queue the DB copy in the database thread now (before any later commit: exactly
        the state of delta self.last), upload it in the background."""
        tmp = path + ".snap"
        copied = db.run(_backup, tmp)
        self.since_snap = 0
        self._snap_task = asyncio.ensure_future(self._snapshot(copied, tmp, self.last, ckpt_id))
        return self._snap_task

    async def _snapshot(self, copied, tmp, seq, ckpt_id):
        t0 = time.monotonic()
        try:
            size = await copied
            name = "p%03d-%d" % (self.p, seq)
            with open(tmp, "rb") as f:
                await self.obs.put(name, f)
            marker = json.dumps({"object": name, "seq": seq, "ckpt_id": ckpt_id, "size": size}).encode()
            self.last_snap = await self._append(self.snap_subject, marker, "snap.%s.%d" % (self.token, seq),
                                                self.last_snap, {})
            # deltas up to seq are in the snapshot: keep seq itself (the subject's last
            # sequence must stay for the fence), drop what is before it
            await self.js.purge_stream(STREAM, subject=self.subject, seq=seq)
            old, self.snap_obj, self.snap_size = self.snap_obj, name, size
            if old and old != name:
                try:
                    await self.obs.delete(old)
                except Exception as e:  # noqa: BLE001 - a leftover object: deleted by the next snapshot's owner
                    logs.warning("ckpt_snapshot_delete_failed", partition=self.p, object=old, error=repr(e))
            self.snapshots += 1
            self.snapshot_last_s = time.monotonic() - t0
            logs.info("ckpt_snapshot", partition=self.p, seq=seq, bytes=size, s=round(self.snapshot_last_s, 3))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the deltas stay: tried again after more commits
            self.snapshot_failures += 1
            logs.warning("ckpt_snapshot_failed", partition=self.p, error=repr(e))
        finally:
            try:
                os.remove(tmp)
            except OSError:
                pass

    async def close(self):
        """The pipeline stops: an upload in progress finishes in the background (the copy
        is already taken; cancelling it mid-way would leave its chunks in the bucket)."""
        t = self._snap_task
        if t is not None and not t.done():
            await asyncio.wait([t], timeout=5)


def _backup(conn, tmp):
    try:
        os.remove(tmp)
    except OSError:
        pass
    dst = sqlite3.connect(tmp)
    try:
        conn.backup(dst)
    finally:
        dst.close()
    return os.path.getsize(tmp)


class ReplicatedStore(Store):
    """Store whose commit() returns only once the delta is in JetStream (see the module doc)."""

    pipelined = False  # one delta in flight: each is appended fenced on the one before

    def __init__(self, path, synchronous, replicator):
        super().__init__(path, synchronous)
        self.rep = replicator

    async def commit(self, writes):
        """The local transaction and the append run at the same time; this returns (and the
        service acks) only when both succeeded. Either failing raises StoreError: nothing of
        it is acked, the pipeline stops. A local file that missed a delta the stream has,
        or has one the stream lacks, differs from the stream's last ckpt_id: never trusted."""
        cid = self.rep.next_id()
        writes = list(writes) + [("meta", [("ckpt_id", cid)])]
        local = asyncio.ensure_future(super().commit(writes))
        try:
            await self.rep.publish(cid, writes)
        except Fenced as e:
            await asyncio.gather(local, return_exceptions=True)
            raise StoreError("fenced: another owner appended to the checkpoint (%s); stopping, nothing acked" % e)
        except BaseException:
            await asyncio.gather(local, return_exceptions=True)
            raise
        n = await local
        if self.rep.want_snapshot():
            self.rep.start_snapshot(self.db, self.path, cid)
        return n

    async def close(self):
        await self.rep.close()
        await super().close()


# ---------------------------------------------------------------- takeover: trust or rebuild

def _local_id(path):
    if not os.path.exists(path):
        return None
    try:
        c = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
        try:
            return _meta_id(c)
        finally:
            c.close()
    except sqlite3.Error:
        return None


def _remove_db(path):
    for s in ("", "-wal", "-shm", "-journal"):
        try:
            os.remove(path + s)
        except OSError:
            pass


class Rebuild:
    """Figures of one takeover: how the file was obtained and what it cost."""

    def __init__(self):
        self.trusted = False
        self.snapshot_bytes = 0
        self.deltas = 0
        self.delta_bytes = 0
        self.seconds = 0.0
        self.db_bytes = 0

    def as_dict(self):
        return dict(trusted=self.trusted, snapshot_bytes=self.snapshot_bytes, deltas=self.deltas,
                    delta_bytes=self.delta_bytes, s=round(self.seconds, 3), db_bytes=self.db_bytes)


async def rebuild(js, obs, st, p, path, upto=None, attempts=3):
    """A fresh partition DB at path from the latest snapshot + the deltas after it, up to
    stream sequence `upto` (default: the last). Returns (Rebuild, last applied ckpt id).
    A stale owner may still store a snapshot and purge the deltas before it meanwhile
    (markers are fenced among themselves only): a rebuild during which the latest marker
    changed may have missed purged deltas, so it is done again from the new snapshot."""
    t0 = time.monotonic()
    for _ in range(attempts):
        info, got, used = await _rebuild_once(js, obs, st, p, path, upto)
        now = await _last(js, snap_subject(st.prefix, p))
        if (now.seq if now is not None else 0) == used:
            info.seconds = time.monotonic() - t0
            return info, got
        logs.warning("ckpt_rebuild_again", partition=p, reason="a new snapshot was stored meanwhile")
    raise StoreError("partition %d: snapshots kept changing during %d rebuilds" % (p, attempts))


async def _rebuild_once(js, obs, st, p, path, upto):
    info = Rebuild()
    tmp = path + ".rebuild"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _remove_db(tmp)
    start = 1
    want_id = None
    marker = await _last(js, snap_subject(st.prefix, p))
    if marker is not None:
        mk = json.loads(marker.data)
        with open(tmp, "wb") as f:
            await obs.get(mk["object"], writeinto=f)
        info.snapshot_bytes = os.path.getsize(tmp)
        start = int(mk["seq"]) + 1
        want_id = mk["ckpt_id"]
    # store.Database: the file is used from one thread, in order; a cancelled rebuild closes it
    # only after the statement in flight (never from another thread under it)
    db = await Database.connect(tmp, isolation_level=None)
    try:
        await db.run(_prepare_rebuild)
        got = await db.run(_meta_id)
        if want_id is not None and got != want_id:
            raise StoreError("snapshot of partition %d holds %r, its marker says %r" % (p, got, want_id))
        if upto is None:
            last = await _last(js, delta_subject(st.prefix, p))
            upto = last.seq if last is not None else 0
        if upto >= start:
            got = await _replay(js, st, p, db, start, upto, info, got)
        # the state journal's tail after the last fold: its tables current for readers of the
        # file (--rebuild-to, merge), as Store.open() leaves an owner's file
        await db.run(fold_journal)
    finally:
        await db.close()
    _remove_db(path)
    os.replace(tmp, path)
    info.db_bytes = os.path.getsize(path)
    return info, got, marker.seq if marker is not None else 0


def _prepare_rebuild(conn):
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")  # a half-built file is thrown away anyway
    create_schema(conn)  # what Store.open() makes: a rebuilt file equals the owner's


def _meta_id(conn):
    r = conn.execute("SELECT v FROM meta WHERE k = 'ckpt_id'").fetchone()
    return r[0] if r else None


def _apply(conn, deltas):
    for data in deltas:
        _transaction(conn, decode(data))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


async def _replay(js, st, p, db, start, upto, info, got):
    """Apply the complete deltas with start <= seq <= upto, in order. A delta whose chunks
    stop before its last (its publisher was fenced or died mid-way, and acked nothing) is
    skipped: the next publisher's state did not include it either."""
    cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
                         ack_policy=AckPolicy.NONE, inactive_threshold=60.0, mem_storage=True, num_replicas=1)
    sub = await js.pull_subscribe(delta_subject(st.prefix, p), stream=STREAM, config=cfg)
    cur, parts, batch = None, [], []
    tail = None  # the ckpt id of the delta ending at `upto`, if one does
    try:
        seq = start - 1
        while seq < upto:
            try:
                msgs = await sub.fetch(32, timeout=5)  # chunks are <= max_chunk: bounded memory
            except (NatsTimeout, asyncio.TimeoutError):  # nats-py raises the plain one when a pull ends early
                raise StoreError("partition %d: checkpoint replay stalled at sequence %d of %d" % (p, seq, upto))
            for m in msgs:
                seq = m.metadata.sequence.stream
                if seq > upto:
                    break
                cid, k, n = _hdr(m)
                if seq == upto and k == n - 1:
                    tail = cid
                if k == 0:
                    cur, parts = cid, []
                if cid != cur or k != len(parts):
                    cur, parts = None, []  # a chunk out of its delta: the rest of it is skipped
                    continue
                parts.append(m.data)
                info.delta_bytes += len(m.data)
                if k == n - 1:
                    batch.append(b"".join(parts))
                    info.deltas += 1
                    got, cur, parts = cid, None, []
            if batch:
                await db.run(_apply, batch)
                batch = []
    finally:
        try:
            await sub.unsubscribe()
        except Exception:  # noqa: BLE001 - the consumer expires by itself (inactive_threshold)
            pass
    if tail is not None and got != tail:  # its earlier chunks are missing: never build on a hole
        raise StoreError("partition %d: the last delta %s is incomplete in the stream" % (p, tail))
    return got


async def prepare(js, obs, st, p, path, gid):
    """Takeover: a partition file equal to the stream's state, then a claim that fences any
    older owner. Returns (Replicator, Rebuild). Fenced if another owner appended meanwhile."""
    t0 = time.monotonic()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    last = await _last(js, delta_subject(st.prefix, p))
    marker = await _last(js, snap_subject(st.prefix, p))
    last_seq = last.seq if last is not None else 0
    info = None
    if last is not None:
        cid, k, n = _hdr(last)
        if k == n - 1 and await asyncio.get_running_loop().run_in_executor(None, _local_id, path) == cid:
            info = Rebuild()
            info.trusted = True
    seed = False
    if info is None:
        if last is None and marker is None:
            # nothing replicated yet: a local file is the partition's state from before (a
            # site moving from shared files): kept, and stored as the first snapshot below
            info = Rebuild()
            info.trusted = seed = os.path.exists(path)
        else:
            info, _ = await rebuild(js, obs, st, p, path, upto=last_seq)
    snap_obj, snap_size = None, 0
    if marker is not None:
        mk = json.loads(marker.data)
        snap_obj, snap_size = mk["object"], int(mk.get("size", 0))
    rep = Replicator(js, obs, st, p, gid, last_seq, marker.seq if marker is not None else 0, snap_obj, snap_size)
    # the claim: a delta with no data, committed locally, then appended; fences the old owner.
    # It folds the state journal ([()]: what the table holds): the old owner's changes since
    # its last fold (it was killed or fenced before the next) are journal rows only, this
    # file folded them (the rebuild's last step, or Store.open), and a replica must fold them
    # here too: this owner's own folds carry only the keys it changed, then empty the journal.
    cid = rep.next_id()
    writes = [("state_fold", [()]), ("meta", [("ckpt_id", cid)])]
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, _commit_file, path, writes)
    await rep.publish(cid, writes)
    if seed:
        tmp = path + ".snap"
        await rep._snapshot(loop.run_in_executor(None, _backup_path, path, tmp), tmp, rep.last, cid)
        if not rep.snapshots:
            raise StoreError("partition %d: could not store its existing file as the first snapshot" % p)
        info.snapshot_bytes = rep.snap_size
    info.seconds = time.monotonic() - t0
    info.db_bytes = os.path.getsize(path)
    return rep, info


def _backup_path(path, tmp):
    src = sqlite3.connect(path)
    try:
        return _backup(src, tmp)
    finally:
        src.close()


# every table a commit writes (views and channels are made from the config at open)
STATE_TABLES = ("readings", "reading_spans", "unsynced", "device_windows", "cep_events", "anomalies",
                "device_status", "gaps", "window_results", "window_revisions", "late", "quarantine", "devices",
                "dedup", "dedup_devices", "device_identity", "device_watermarks", "open_windows", "meta",
                "sink_outbox")


def dump(path):
    """{table: sorted rows} of a partition file: two files with equal dumps hold the same state
    (read from a copy with the state journal folded: a file left by a killed gateway holds up
    to a fold's worth of state only in the journal)."""
    src = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    c = sqlite3.connect(":memory:", isolation_level=None)
    try:
        src.backup(c)
        fold_journal(c)
        return {t: sorted(c.execute("SELECT * FROM %s" % t).fetchall(), key=repr) for t in STATE_TABLES}
    finally:
        c.close()
        src.close()


def _commit_file(path, writes):
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        create_schema(conn)
        _transaction(conn, writes)
    finally:
        conn.close()
