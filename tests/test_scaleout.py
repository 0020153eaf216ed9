"""One site, several gateways (issue 15): partitions, the group-window merge, and the
JetStream ingest with failover on a real 3-node NATS cluster that speaks MQTT."""
import asyncio
import collections
import os
import random
import sqlite3
import time

import pytest

from gateway import merge as gmerge
from gateway.config import Config
from gateway.partitions import fnv1a32, nats_mappings, partition_of, subject_topic
from gateway.service import Gateway
from shared import wire
from tools.bench_compare import MemIngest  # the service's ingest interface over a list

T0 = int(time.time() * 1000) - 3600 * 1000  # an hour ago: valid event times, windows all fired by the end


def test_fnv1a_known_vectors_and_partition_spread():
    # FNV-1a 32-bit reference values (the function NATS's {{partition}} mapping uses)
    assert fnv1a32(b"") == 0x811C9DC5
    assert fnv1a32(b"a") == 0xE40C292C
    assert fnv1a32(b"foobar") == 0xBF9CF968
    counts = collections.Counter(partition_of("dev-%04d" % i, 8) for i in range(4000))
    assert set(counts) == set(range(8)) and min(counts.values()) > 400
    m = nats_mappings("edgeflow", 8)
    assert m["edgeflow.d.*.data"] == "edgeflow.p.{{partition(8,1)}}.{{wildcard(1)}}.data"
    assert "edgeflow.d.*.ack" not in m  # acks go back to the devices unmapped
    assert subject_topic("edgeflow.p.3.dev-1.data") == b"edgeflow/d/dev-1/data"
    assert subject_topic("weird") == b"weird"
    with pytest.raises(ValueError):
        nats_mappings("edgeflow", 0)


def _fleet_messages(n_dev, per_dev, rng, window_ms, disorder_ms):
    """Per device: a hello, then reading batches (channel 0 and 1), times a little out of
    order within a batch; devices interleaved like a broker would deliver them."""
    topics = wire.Topics("edgeflow")
    per = {}
    for i in range(n_dev):
        dev = "dev-%04d" % i
        msgs = [(topics.hello(dev), wire.encode_hello(dev, 1, 0, T0, 0, 1, 0, 7, 1, "t-1"))]
        seq = 0
        t = T0 + rng.randrange(0, 500)
        while seq < per_dev:
            batch = []
            for _ in range(min(16, per_dev - seq)):
                t += rng.randrange(200, 400)
                tt = max(T0, t - rng.randrange(0, disorder_ms + 1))
                batch.append((seq, tt, seq % 2, 0, rng.randrange(-4000, 9000)))
                seq += 1
            msgs.append((topics.data(dev), wire.encode_readings(dev, 1, batch)))
        per[dev] = msgs
    out = []
    cursors = {d: 0 for d in per}
    while cursors:
        d = rng.choice(sorted(cursors))
        out.append(per[d][cursors[d]])
        cursors[d] += 1
        if cursors[d] == len(per[d]):
            del cursors[d]
    return out


def _run_pipeline(msgs, db, sections):
    async def go():
        cfg = Config(dict(sections, store={"path": db, "synchronous": "NORMAL"}, metrics={"port": 0},
                          security={"insecure": True}))
        gw = Gateway(cfg, ingest_factory=lambda c, s: MemIngest(msgs, c, s))
        task = asyncio.ensure_future(gw.run())
        deadline = time.monotonic() + 60
        while gw.stats.messages < len(msgs) and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.02)
        gw.stop()
        await task
        assert gw.stats.messages == len(msgs)
    asyncio.run(go())


def _group_windows(db):
    """(key, ch, start) -> (n, sum, min, max, mean, std, fired) of the latest state."""
    c = sqlite3.connect(db)
    out = {}
    for key, ch, start, n, s, mn, mx, mean, std in c.execute(
            "SELECT key, channel, start, count, sum, min, max, mean, std FROM window_results WHERE scope='group'"):
        out[(key, ch, start)] = (n, s, mn, mx, round(mean, 6), round(std, 6), True)
    for key, ch, start, n, s, mn, mx in c.execute(
            "SELECT key, channel, start, count, sum, min, max FROM open_windows WHERE scope='group'"):
        if (key, ch, start) not in out:
            out[(key, ch, start)] = (n, s, mn, mx, None, None, False)
    wm = c.execute("SELECT v FROM meta WHERE k='global_watermark'").fetchone()
    c.close()
    return out, wm[0] if wm else None


@pytest.mark.parametrize("disorder_ms", [0, 1500])
def test_group_merge_across_partitions_equals_single_gateway(tmp_path, disorder_ms):
    """The same input through one gateway and through P partition pipelines + the merge
    stage gives the same group windows (aggregates, fired or open) and watermark."""
    rng = random.Random(7 + disorder_ms)
    window_ms, P = 5000, 4
    msgs = _fleet_messages(12, 240, rng, window_ms, disorder_ms)
    sections = {"windows": {"size_ms": window_ms, "allowed_lateness_ms": 20000,
                            "groups": [{"name": "all", "devices": ["*"], "channel": 0},
                                       {"name": "some", "devices": ["dev-0001", "dev-0002", "dev-0007"],
                                        "channel": 1}]},
                "watermark": {"out_of_orderness_ms": 2000, "idle_timeout_ms": 3600000}}
    single = str(tmp_path / "single.db")
    _run_pipeline(msgs, single, sections)
    parts = []
    for p in range(P):
        mine = [m for m in msgs if partition_of(wire.Topics("edgeflow").parse(m[0])[0], P) == p]
        assert mine, "every partition gets devices"
        parts.append(str(tmp_path / ("part-%03d.db" % p)))
        _run_pipeline(mine, parts[-1], sections)
    site = str(tmp_path / "site.db")
    info = gmerge.merge(parts, site, window_ms)
    got, wm_site = _group_windows(site)
    want, wm_single = _group_windows(single)
    assert info["group_fired"] > 10 and info["group_open"] >= 1
    assert wm_site == wm_single
    assert got == want
    # per device everything is the union of the partitions
    c1, c2 = sqlite3.connect(single), sqlite3.connect(site)
    q = "SELECT device, boot, seq, t, channel, value FROM readings ORDER BY device, seq"
    assert c1.execute(q).fetchall() == c2.execute(q).fetchall()
    q = ("SELECT key, channel, start, count, sum, min, max, revision FROM window_results WHERE scope='device' "
         "ORDER BY key, channel, start")
    assert c1.execute(q).fetchall() == c2.execute(q).fetchall()


@pytest.mark.slow
def test_cluster_gateway_and_node_kill_exactly_once(tmp_path):
    """3 NATS nodes (MQTT), 2 gateways, 8 partitions, the fleet simulator (firmware App) over
    MQTT: kill -9 a gateway (its partitions move), restart it (they rebalance), kill -9 the NATS
    node some devices and the gateways' MQTT output use (both move to the others), restart it; ground truth: 0 lost, 0 duplicated, device windows and
    the merged group windows equal to what the delivered readings give."""
    from tools.scaleout_site import scenario
    lines = []
    rep, fig = asyncio.run(scenario(str(tmp_path / "site"), devices=6, duration=20.0, gateways=2, partitions=8,
                                    log=lines.append, node_down_s=60))
    text = "\n".join(lines)
    assert rep.ok, text
    assert rep.counts["delivered"] > 500 and rep.counts.get("held", 0) == 0, text
    assert fig["takeover_s"] is not None, text
    assert fig["merge"]["group_fired"] > 0, text
    assert fig["misplaced"] == 0, text  # the servers' partition mapping == partition_of()
    tried, moved, on_n2 = fig["failed_over"]
    # firmware broker.hosts: the dead node's devices run sessions on the other nodes
    assert on_n2 >= 1 and tried == moved == on_n2, text
    assert fig["outputs_moved"][0] == fig["outputs_moved"][1] == 2, text  # the gateways' acks too
    # per-partition metrics from both gateways' endpoints: every partition owned once, the
    # killed g0's partitions were taken over by g1 from g0's checkpoints, nothing left behind
    m = fig["metrics"]
    owned = [k[1] for g in m for k in m[g] if k[0] == "edgeflow_scaleout_partition_owned"]
    assert sorted(owned, key=int) == [str(p) for p in range(8)], text
    assert m["g1"][("edgeflow_scaleout_lease_takeovers_total", None)] >= 4, text
    for g in m:
        assert sum(v for k, v in m[g].items() if k[0] == "edgeflow_scaleout_partition_stream_pending") == 0, text
        assert m[g][("edgeflow_scaleout_partitions_owned", None)] == 4, text


def test_stalled_owner_is_fenced_then_loses_its_lease(tmp_path):
    """A gateway that stalls past its lease (a long GC pause, a frozen VM) keeps its
    partitions' files locked: the gateway that takes the expired lease cannot open them
    (fenced, gives the lease back); when the stalled one wakes, its renewal fails (the
    revision moved), it stops its pipelines, and only then can the other take one."""
    from gateway.scaleout import Owner
    from tools.fleet import gateway_toml

    async def go(c, gw):
        conf = str(tmp_path / "gw.toml")
        with open(conf, "w") as f:
            f.write(gateway_toml(1, "unused.db", groups=False, extra=gw))
        mq = [("127.0.0.1", c.mqtt_ports[0])]
        a = Owner(conf, "a", c.urls, mq, 2, str(tmp_path / "parts"), lease_s=1.5, replicas=1)
        b = Owner(conf, "b", c.urls, mq, 2, str(tmp_path / "parts"), lease_s=1.5, replicas=1)
        gate = asyncio.Event()
        gate.set()
        a_tick = a._tick

        async def gated_tick():
            await gate.wait()
            await a_tick()
        a._tick = gated_tick
        ta = asyncio.ensure_future(a.run())
        tb = None
        try:
            await _until(lambda: len(a.parts) == 2, 20)
            gate.clear()  # a stalls: no renewals, its pipelines keep running and hold the locks
            tb = asyncio.ensure_future(b.run())
            await _until(lambda: b.fenced >= 2, 20)
            assert not b.parts and len(a.parts) == 2
            gate.set()  # a wakes: its renewals fail, it stops them; then they are shared out
            await _until(lambda: a.lost == 2, 20)
            await _until(lambda: len(a.parts) + len(b.parts) == 2 and b.parts, 30)
            assert not set(a.parts) & set(b.parts)
            # the metrics say so too: b took over from a's checkpoint files, a lost 2 leases
            from gateway.scaleout import ScaleoutCollector
            got = {smp.name: smp.value for fam in ScaleoutCollector(b).collect() for smp in fam.samples
                   if not smp.labels}
            assert got["edgeflow_scaleout_partitions_owned"] == len(b.parts) >= 1
            assert got["edgeflow_scaleout_lease_takeovers_total"] >= 1
            assert got["edgeflow_scaleout_partitions_fenced_total"] >= 2
            assert {smp.name: smp.value for fam in ScaleoutCollector(a).collect() for smp in fam.samples
                    if not smp.labels}["edgeflow_scaleout_leases_lost_total"] == 2
        finally:
            a.stop()
            b.stop()
            await asyncio.gather(ta, *([tb] if tb else []), return_exceptions=True)

    _on_secure_node(tmp_path, 2, go)


async def _until_async(get, cond, timeout):
    deadline = time.monotonic() + timeout
    while not cond(await get()):
        assert time.monotonic() < deadline, "condition not reached in %s s" % timeout
        await asyncio.sleep(0.1)


def _on_secure_node(tmp_path, partitions, go):
    """asyncio.run(go(cluster, gw)) on one secured NATS node (MQTT, partition mapping);
    gw: the gateway config sections (TLS, credentials, devices file)."""
    from tools.natscluster import NatsCluster
    from tools.scaleout_site import secure_fleet
    _fleet, sec, gw = secure_fleet(str(tmp_path), partitions)
    c = NatsCluster(str(tmp_path / "nats"), 1, mqtt=True, mappings=nats_mappings("edgeflow", partitions),
                    security=sec).start()
    try:
        c.wait_ready()
        asyncio.run(go(c, gw))
    finally:
        c.stop()


async def _until(cond, timeout):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in %s s" % timeout
        await asyncio.sleep(0.05)


def test_jetstream_not_ready_at_start_is_retried_not_fatal():
    """A cluster just started answers its API with timeouts / 503 for a while: the gateway
    waits for it (seen in CI: a scale-out gateway died at start with `nats: timeout`)."""
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

    from gateway.ingest_jetstream import until_ready

    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise NatsTimeout()
        if len(calls) == 2:
            raise ServiceUnavailableError()
        return "ok"

    assert asyncio.run(until_ready(flaky, "stream", first_s=0.01)) == "ok" and len(calls) == 3

    async def missing():
        raise NotFoundError()

    with pytest.raises(NotFoundError):  # an answer, not a cluster still electing: never retried
        asyncio.run(until_ready(missing, "stream", first_s=0.01))

    async def never():
        raise NatsTimeout()

    t0 = time.monotonic()
    with pytest.raises(NatsTimeout):  # bounded: the deadline ends it
        asyncio.run(until_ready(never, "stream", deadline_s=0.3, first_s=0.01, cap_s=0.05))
    assert time.monotonic() - t0 < 5
    assert issubclass(ServiceUnavailableError, APIError)


# ---------------------------------------------------------------- security of the NATS side (issue 15 + 12)


class _NatsMqtt:
    """What tests/test_security.py's Client needs of a broker, for one NATS node's MQTT port."""

    def __init__(self, fleet, port):
        self.fleet, self.port = fleet, port

    def credentials(self, user):
        if user == self.fleet.load()["gateway_user"]:
            return user, self.fleet.gateway_password()
        return user, self.fleet.device_secrets(user)["config"]["broker"]["password"]

    def tls_context(self, ca_file=None):
        import ssl
        return ssl.create_default_context(cafile=ca_file or self.fleet.path("ca", "ca.pem"))


@pytest.fixture(scope="module")
def secure_nats(tmp_path_factory):
    """One NATS node (JetStream, MQTT, 2 partitions) secured from a provisioned fleet."""
    from tools.natscluster import NatsCluster
    from tools.scaleout_site import secure_fleet
    d = tmp_path_factory.mktemp("natssec")
    fleet, sec, gw = secure_fleet(str(d), 2, devices=["dev-a", "dev-b"])
    c = NatsCluster(str(d / "nats"), 1, mqtt=True, mappings=nats_mappings("edgeflow", 2), security=sec).start()
    try:
        c.wait_ready()
        yield fleet, c, gw
    finally:
        c.stop()


def test_nats_device_cannot_act_as_another_device(secure_nats):
    """A device's credentials on NATS's MQTT: it cannot publish as another device (data, hello,
    state), into another partition, acks or the gateway state, nor read another device's
    acks or the whole tree; the broker refuses, and control messages sent after the forbidden
    ones prove that nothing forbidden got through (not a timer)."""
    from tests.test_security import Client
    from gateway.ingest_jetstream import Link, Security
    fleet, c, gw = secure_nats
    mq = _NatsMqtt(fleet, c.mqtt_ports[0])
    top = wire.Topics("edgeflow")
    own = partition_of("dev-a", 2)

    async def go():
        link = Link(c.urls, [("127.0.0.1", c.mqtt_ports[0])], "edgeflow-gw-t", replicas=1,
                    security=Security(Config(dict(gw, metrics={"port": 0}))))
        await link.start()  # TLS + the gateway's credentials, on NATS and on MQTT
        assert await asyncio.to_thread(link.out.connected.wait, 20)
        subs = {}
        for p in (0, 1):
            await link.reset_consumer(p)
            subs[p] = await link.js.pull_subscribe(f"edgeflow.p.{p}.*.*", durable="part-%03d" % p, stream="EDGEFLOW")
        from gateway import ckpt
        await ckpt.ensure(link.js, ckpt.Settings(replicas=1))  # the replicated checkpoint's stream
        a, b = Client(mq, "dev-a"), Client(mq, "dev-b")
        try:
            assert a.connect() == "Success" and b.connect() == "Success"
            assert b.sub(top.ack("dev-b")) == ["Granted QoS 1"]
            # reading another device's acks or everything: refused at subscribe time
            assert a.sub(top.ack("dev-b"), "edgeflow/#", "edgeflow/d/+/ack") == ["Unspecified error"] * 3
            assert a.sub(top.ack("dev-a")) == ["Granted QoS 1"]
            for t in (top.data("dev-b"), top.hello("dev-b"), top.state("dev-b"), top.ack("dev-b"), top.ack("dev-a"),
                      top.gw_state, "edgeflow/p/%d/dev-a/data" % (1 - own), "edgeflow/p/%d/dev-b/data" % own,
                      "edgeflow/ckpt/%d/d" % own, "edgeflow/ckpt/%d/s" % own):
                a.pub(t, b"forged")
            a.pub(top.data("dev-a"), b"control")
            got = []
            deadline = time.monotonic() + 60
            while not any(m.data == b"control" for m in got) and time.monotonic() < deadline:
                for p in (0, 1):
                    try:
                        got += await subs[p].fetch(10, timeout=1)
                    except asyncio.TimeoutError:  # nats-py's own, or the plain one when a pull ends early
                        pass
            assert [(m.subject, m.data) for m in got] == [("edgeflow.p.%d.dev-a.data" % own, b"control")]
            assert (await link.js.stream_info(ckpt.STREAM)).state.messages == 0  # no forged checkpoint
            link.out.publish("edgeflow/ckpt/9/d", b"x")  # the same path with the gateway's rights lands
            await _until_async(lambda: link.js.stream_info(ckpt.STREAM), lambda i: i.state.messages == 1, 20)
            for m in got:
                await m.ack()
            # acks: the gateway's reach their device; none reaches dev-a for dev-b
            link.out.publish(top.ack("dev-b"), b"ack-b")
            link.out.publish(top.ack("dev-a"), b"ack-a")
            assert [m[:2] for m in await asyncio.to_thread(a.until, top.ack("dev-a"), b"ack-a")] == \
                [(top.ack("dev-a"), b"ack-a")]
            assert (top.ack("dev-b"), b"ack-b") in [m[:2] for m in await asyncio.to_thread(b.until, top.ack("dev-b"),
                                                                                           b"ack-b")]
            # the forged ack dev-a sent to itself never arrived either (checked by the list above)
            # NATS has no use_username_as_clientid: dev-a can take dev-b's client id (a
            # persistent session even); it still gets nothing dev-b's permissions allow
            b.close()
            x = Client(mq, "dev-a", client_id="dev-b", clean=False)
            try:
                assert x.connect() == "Success"
                assert x.sub(top.ack("dev-b")) == ["Unspecified error"]
                assert x.sub(top.ack("dev-a")) == ["Granted QoS 1"]
                link.out.publish(top.ack("dev-b"), b"ack-b2")
                link.out.publish(top.ack("dev-a"), b"ack-a2")
                assert [m[:2] for m in await asyncio.to_thread(x.until, top.ack("dev-a"), b"ack-a2")] == \
                    [(top.ack("dev-a"), b"ack-a2")]
            finally:
                x.close()
        finally:
            a.close()
            b.close()
            for s in subs.values():
                await s.unsubscribe()  # else the drain in close() waits for them
            await link.close()

    import nats
    asyncio.run(go())


def test_nats_refuses_without_credentials_tls_or_the_right_ca(secure_nats, tmp_path):
    """The gateway without credentials, with a wrong password or without TLS is refused on
    NATS; a device's credentials do not work on the NATS port (MQTT only); anonymous MQTT,
    a wrong password and a wrong CA are refused on MQTT. Each refusal has a positive control."""
    import ssl

    import nats

    from tests.test_security import Client
    from tools.provision import Fleet as FleetDir
    fleet, c, gw = secure_nats
    mq = _NatsMqtt(fleet, c.mqtt_ports[0])
    ctx = ssl.create_default_context(cafile=fleet.path("ca", "ca.pem"))
    gwu, gwpw = mq.credentials("edgeflow-gateway")
    devu, devpw = mq.credentials("dev-a")

    async def attempt(**kw):
        try:
            nc = await nats.connect(c.urls, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3, **kw)
        except Exception as e:  # noqa: BLE001 - the refusal is the result
            return repr(e)
        await nc.close()
        return "connected"

    async def go():
        assert await attempt(tls=ctx, tls_hostname="localhost", user=gwu, password=gwpw) == "connected"
        assert "connected" != await attempt(tls=ctx, tls_hostname="localhost")
        assert "connected" != await attempt(tls=ctx, tls_hostname="localhost", user=gwu, password=gwpw + "x")
        assert "connected" != await attempt(user=gwu, password=gwpw)  # plaintext
        assert "connected" != await attempt(tls=ctx, tls_hostname="localhost", user=devu, password=devpw)
        other = FleetDir(str(tmp_path / "other"))
        other.init("127.0.0.1", names=["localhost"])
        bad = ssl.create_default_context(cafile=other.path("ca", "ca.pem"))
        assert "connected" != await attempt(tls=bad, tls_hostname="localhost", user=gwu, password=gwpw)
        assert "connected" != await attempt(tls=ctx, tls_hostname="not-the-node", user=gwu, password=gwpw)

    asyncio.run(go())
    ok = Client(mq, "dev-a")
    assert ok.connect() == "Success"
    ok.close()
    for cl in (Client(mq), Client(mq, "dev-a", password="wrong"), Client(mq, "dev-a", tls=False),
               Client(mq, "dev-a", ca_file=FleetDir(str(tmp_path / "other")).path("ca", "ca.pem"))):
        rc = cl.connect()
        cl.close()
        assert rc != "Success", rc


def test_provision_nats_node_config_and_users_follow_the_fleet(tmp_path):
    """`edgeflow-provision nats` writes a node config nats-server accepts and the users file;
    add / revoke / rotate rewrite the users (a revoked device is gone, a rotated password
    changes its hash, the others keep theirs)."""
    import re
    import subprocess

    from tools.natscluster import nats_server_bin
    from tools.provision import run
    f = str(tmp_path / "fleet")
    out = open(os.devnull, "w")
    assert run(["init", f, "n1", "n2", "--broker-host", "127.0.0.1", "--name", "localhost"], out) == 0
    assert run(["nats", f, "--partitions", "8", "--name", "nats1", "--name", "nats2", "--name", "nats3"], out) == 0

    def users():
        text = open(os.path.join(f, "nats", "auth.conf")).read()
        return dict(re.findall(r'user: "([^"]+)", password: "([^"]+)"', text))
    u0 = users()
    assert set(u0) == {"edgeflow-gateway", "n1", "n2"} and all(h.startswith("$2a$04$") for h in u0.values())
    assert oct(os.stat(os.path.join(f, "nats", "auth.conf")).st_mode & 0o777) == "0o600"
    assert run(["add", f, "n3"], out) == 0 and run(["revoke", f, "n1"], out) == 0 and run(["rotate", f, "n2"], out) == 0
    u1 = users()
    assert set(u1) == {"edgeflow-gateway", "n2", "n3"}
    assert u1["edgeflow-gateway"] == u0["edgeflow-gateway"] and u1["n2"] != u0["n2"]
    conf = open(os.path.join(f, "nats", "node.conf")).read()
    assert "{{partition(8,1)}}" in conf and "verify: true" in conf
    d = os.path.join(f, "nats")
    with open(os.path.join(d, "test.conf"), "w") as fh:
        fh.write(conf.replace("/etc/nats/edgeflow", d).replace("/var/lib/nats", str(tmp_path / "js")))
    r = subprocess.run([nats_server_bin(), "-t", "-c", os.path.join(d, "test.conf")], capture_output=True, text=True)
    assert r.returncode == 0 and "valid" in r.stdout + r.stderr, r.stdout + r.stderr


def test_scaleout_gateway_refuses_an_insecure_config(tmp_path):
    """edgeflow-scaleout without TLS / credentials / devices file: refused (exit 2), unless
    [security] insecure = true says the open set-up is meant."""
    from gateway.scaleout import main
    from tools.fleet import gateway_toml
    conf = str(tmp_path / "gw.toml")
    with open(conf, "w") as f:
        f.write(gateway_toml(1, "unused.db", groups=False))
    args = ["--id", "a", "-c", conf, "--nats", "nats://127.0.0.1:1", "--mqtt", "127.0.0.1:1",
            "--partitions", "2", "--dir", str(tmp_path / "parts")]
    assert main(args) == 2
    # TLS without the name to check in the nodes' certificate: refused too
    from tools.scaleout_site import secure_fleet
    _fleet, _sec, gw = secure_fleet(str(tmp_path), 2)
    gw["mqtt"].pop("tls_server_name")
    with open(conf, "w") as f:
        f.write(gateway_toml(1, "unused.db", groups=False, extra=gw))
    assert main(args) == 2


def test_jetstream_sink_and_collector_over_tls_with_users(tmp_path):
    """The JetStream sink and the collector connect with TLS (fleet CA, name checked) and a
    user + password file made by the provisioning helper: rows reach the central store;
    without tls_ca, or with a wrong password, the connect is refused; the sink cannot
    publish under another site, the collector not at all."""
    import shutil

    from gateway import collector as C
    from gateway.sinks.jetstream import connect
    from tests.test_sinks import checkpoint, open_set, readings, stop_collector, until
    from tools import natsauth
    from tools.natscluster import NatsCluster
    from tools.scaleout_site import secure_fleet
    fleet, sec, _gw = secure_fleet(str(tmp_path), 1)
    # the provisioning helper makes both users (tools/natsauth.py sink-user / collector-user)
    pwf = {"sink-s1": natsauth.add_downstream_user(fleet, "sink-s1", "sink", "s1", stream="SINKS"),
           "collector": natsauth.add_downstream_user(fleet, "collector", "collector", stream="SINKS")}
    for u, f in pwf.items():
        shutil.copy(f, str(tmp_path / (u + ".pw")))
    cluster = NatsCluster(tmp_path / "nats", 1, security=sec).start()
    url, ca = cluster.urls[0], fleet.path("ca", "ca.pem")
    central = str(tmp_path / "central.db")
    tls = {"tls_ca": ca, "tls_server_name": "localhost"}

    async def refused(wait=3, **kw):
        # connect() retries forever (a sink must ride out outages): refused = not connected
        # within `wait` s, while the same call with the right settings gets 20 s to connect
        try:
            nc = await asyncio.wait_for(connect([url], "t", **kw), wait)
        except Exception as e:  # noqa: BLE001 - the refusal is the result
            return repr(e)
        await nc.close()
        return None

    async def main():
        assert await refused(20, user="sink-s1", password_file=str(tmp_path / "sink-s1.pw"), **tls) is None
        assert await refused(user="sink-s1", password_file=str(tmp_path / "collector.pw"), **tls)
        assert await refused(user="sink-s1", password_file=str(tmp_path / "sink-s1.pw"))  # plaintext
        store, s = await open_set(tmp_path, [dict(
            {"name": "c", "type": "jetstream", "servers": [url], "stream": "SINKS", "batch": 5, "tables": ["records"],
             "user": "sink-s1", "password_file": str(tmp_path / "sink-s1.pw")}, **tls)])
        s.start()
        coll = C.Collector(C.load_config(None, {
            "nats.servers": [url], "nats.stream": "SINKS", "store.path": central, "nats.user": "collector",
            "nats.password_file": str(tmp_path / "collector.pw"), "nats.tls_ca": ca,
            "nats.tls_server_name": "localhost"}))
        ct = asyncio.ensure_future(coll.run())
        try:
            await checkpoint(store, s, [("readings", readings("d1", 1, 0, 12))])
            assert await until(lambda: coll.messages >= 3)
            # the sink user publishes under its own site only; the collector publishes nothing
            # (the same publish with the right user is stored: the refusals are the permissions)
            for u, subj, ok in (("sink-s1", "edgeflow.sink.s1.readings", True),
                                ("sink-s1", "edgeflow.sink.s2.readings", False),
                                ("collector", "edgeflow.sink.s1.readings", False)):
                nc = await connect([url], "t", user=u, password_file=str(tmp_path / (u + ".pw")), **tls)
                try:
                    if ok:
                        assert (await nc.jetstream(timeout=5).publish(subj, b"{}", stream="SINKS")).seq > 0
                    else:
                        with pytest.raises(Exception):
                            await nc.jetstream(timeout=2).publish(subj, b"{}", stream="SINKS")
                finally:
                    await nc.close()
        finally:
            await stop_collector(ct, coll)
            await s.stop()
            await store.close()
    try:
        asyncio.run(main())
    finally:
        cluster.stop()
    db = sqlite3.connect(central)
    assert db.execute("SELECT count(*) FROM readings WHERE site = 's1'").fetchone()[0] == 12


def test_nats_revoke_and_rotate_take_effect_on_reload(tmp_path):
    """edgeflow-provision revoke / rotate rewrite the NATS users; at the servers' reload a
    revoked device is disconnected and refused, a rotated one needs its new password."""
    from tests.test_security import Client
    from tools.natscluster import NatsCluster
    from tools.provision import run
    from tools.scaleout_site import secure_fleet
    fleet, sec, _gw = secure_fleet(str(tmp_path), 2, devices=["dev-a", "dev-b"])
    c = NatsCluster(str(tmp_path / "nats"), 1, mqtt=True, mappings=nats_mappings("edgeflow", 2), security=sec).start()
    try:
        c.wait_ready()
        mq = _NatsMqtt(fleet, c.mqtt_ports[0])
        old_a, old_b = mq.credentials("dev-a")[1], mq.credentials("dev-b")[1]
        b = Client(mq, "dev-b")
        assert b.connect() == "Success"
        out = open(os.devnull, "w")
        assert run(["revoke", fleet.root, "dev-b"], out) == 0 and run(["rotate", fleet.root, "dev-a"], out) == 0
        c.reload()
        assert b.disconnected.wait(20), "the revoked device stayed connected after the reload"
        b.close()
        rcs = []
        for cl in (Client(mq, "dev-b", password=old_b), Client(mq, "dev-a", password=old_a), Client(mq, "dev-a")):
            rcs.append(cl.connect())
            cl.close()
        assert rcs[0] != "Success" and rcs[1] != "Success" and rcs[2] == "Success", rcs
    finally:
        c.stop()


def test_lease_expired_on_the_server_is_taken_back_without_a_restart(tmp_path):
    """Under load a lease key can expire on the server although its owner renewed within its
    own period (the TTL runs from the server's store); another gateway then creates it, is
    fenced by the lock and deletes it. The owner takes it back (create) instead of stopping
    and restarting the partition: counted as reclaimed, not lost, the pipeline never stopped."""
    from gateway.scaleout import Owner, _key
    from tools.fleet import gateway_toml

    async def go(c, gw):
        conf = str(tmp_path / "gw.toml")
        with open(conf, "w") as f:
            f.write(gateway_toml(1, "unused.db", groups=False, extra=gw))
        a = Owner(conf, "a", c.urls, [("127.0.0.1", c.mqtt_ports[0])], 1, str(tmp_path / "parts"), lease_s=3.0,
                  replicas=1)
        ta = asyncio.ensure_future(a.run())
        try:
            await _until(lambda: len(a.parts) == 1, 20)
            task = a.parts[0].task
            # what a fenced taker leaves behind: its create, then its delete
            await a.kv.delete(_key(0))
            rev = await a.kv.create(_key(0), b"b")
            await a.kv.delete(_key(0), last=rev)
            await _until(lambda: a.reclaimed == 1, 20)
            assert a.lost == 0 and 0 in a.parts and a.parts[0].task is task and not task.done()
            assert (await a.kv.get(_key(0))).value == b"a"
        finally:
            a.stop()
            await asyncio.gather(ta, return_exceptions=True)

    _on_secure_node(tmp_path, 1, go)


def test_merge_refuses_a_partition_file_with_an_unfolded_state_journal(tmp_path):
    """A partition file left by a killed gateway holds its last state changes only in the
    state journal (store.py): merging its tables alone would give stale windows, so the merge
    says what to do instead of writing a wrong site database."""
    from gateway.store import SCHEMA
    part = str(tmp_path / "part-000.db")
    with sqlite3.connect(part) as c:
        c.executescript(SCHEMA)
    assert gmerge.merge([part], str(tmp_path / "site.db"), 60000)["partitions"] == 1
    with sqlite3.connect(part) as c:
        c.execute("INSERT INTO state_journal (body) VALUES (?)", (b"x",))
    with pytest.raises(gmerge.MergeError, match="not yet folded"):
        gmerge.merge([part], str(tmp_path / "site2.db"), 60000)
