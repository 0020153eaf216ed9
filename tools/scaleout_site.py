"""One site, several gateways, on this machine: a 3-node NATS JetStream cluster with MQTT,
G gateway processes (gateway/scaleout.py) sharing P partitions, the fleet simulator (the
real firmware App, unchanged) over MQTT into the cluster, faults, and the ground truth.

    python -m tools.scaleout_site --devices 30 --duration 60 --gateways 2 --partitions 8
    python -m tools.scaleout_site --short          # the suite's variant (tests/test_scaleout.py)
    python -m tools.scaleout_site --checkpoint replicated --devices 30 --duration 60   # separate disks

--checkpoint replicated: every gateway has its own directory (nothing shared); partitions
move by the replicated checkpoint in JetStream (gateway/ckpt.py). At the end every
partition is rebuilt from JetStream alone, compared table by table with the file of its
last owner, and the ground truth runs on the rebuilt files.

Faults (times in seconds from the start): kill -9 gateway g0 (its partitions move to the
others: takeover time measured from its logs), restart it (partitions rebalance back),
kill -9 the NATS node some devices use, restart it. Then the devices drain, the gateways
stop, gateway/merge.py builds the site database and tools/groundtruth.py checks it:
0 lost, 0 duplicated, windows (device and merged group windows) recomputed from the
delivered readings. Exit status 1 on any error.
"""
import argparse
import asyncio
import glob
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from gateway.merge import merge  # noqa: E402
from gateway.partitions import nats_mappings, partition_of  # noqa: E402
from tools import groundtruth  # noqa: E402
from tools.fleet import Fleet, gateway_toml, gateway_windows  # noqa: E402
from tools import natsauth  # noqa: E402
from tools.natscluster import NatsCluster, die_with_parent, free_port  # noqa: E402
from tools.provision import Fleet as FleetDir  # noqa: E402

PY = sys.executable


def secure_fleet(workdir, partitions, devices=()):
    """A provisioned fleet folder (tools/provision.py: CA, gateway and device credentials)
    with its NATS settings (tools/natsauth.py: node certificate for localhost/127.0.0.1,
    users and permissions). Returns (fleet, natsauth.paths, the gateway's config sections)."""
    fleet = FleetDir(os.path.join(workdir, "fleet"))
    if not os.path.exists(fleet.state_path):
        fleet.init("127.0.0.1", names=["localhost"], devices=list(devices))
        natsauth.init(fleet, partitions)
    st = fleet.load()
    gw = {"mqtt": {"username": st["gateway_user"], "password_file": fleet.path("gateway", "mqtt_password"),
                   "tls_ca": fleet.path("gateway", "ca.pem"), "tls_server_name": "localhost"},
          "devices": {"file": fleet.path("gateway", "devices.json")}}
    return fleet, natsauth.paths(fleet.path("nats")), gw


class ScaleSite:
    """NATS cluster (MQTT on every node) + gateway processes; close() stops all of them.
    Secure by default: TLS on every port and route, per-device users (secure_fleet());
    devices= are provisioned before the servers start. insecure=True: the open set-up."""

    def __init__(self, workdir, nodes=3, partitions=8, lease_s=2.0, window_ms=10000, lateness_ms=20000,
                 ooo_ms=2000, idle_ms=15000, groups=True, gw_extra=None, insecure=False, devices=(),
                 checkpoint="shared", snapshot_min_bytes=256 << 10):
        self.dir = os.path.abspath(workdir)
        os.makedirs(self.dir, exist_ok=True)
        self.P = partitions
        self.lease_s = lease_s
        extra = {"log": {"format": "json"}, "store": {"synchronous": "NORMAL"}}
        self.fleet = security = None
        if insecure:
            extra["security"] = {"insecure": True}
        else:
            self.fleet, security, gw_sec = secure_fleet(self.dir, partitions, devices)
            extra.update(gw_sec)
        self.cluster = NatsCluster(os.path.join(self.dir, "nats"), nodes, mqtt=True,
                                   mappings=nats_mappings("edgeflow", partitions), security=security)
        self.parts_dir = os.path.join(self.dir, "parts")
        self.checkpoint = checkpoint
        self.snapshot_min_bytes = snapshot_min_bytes
        self.conf = os.path.join(self.dir, "gateway.toml")
        for sec, kv in (gw_extra or {}).items():  # per key: gw_extra may add to [mqtt]
            extra.setdefault(sec, {}).update(kv)
        with open(self.conf, "w") as f:
            f.write(gateway_toml(1883, "unused.db", window_ms, lateness_ms, ooo_ms, idle_ms, groups, extra))
        self.windows = gateway_windows(window_ms, lateness_ms, groups)
        self.gws = {}
        self.metrics_ports = {}

    def start(self):
        self.cluster.start()
        self.cluster.wait_ready(60)
        return self

    @property
    def mqtt_ports(self):
        return self.cluster.mqtt_ports

    def gw_dir(self, gid):
        """A gateway's partition directory: shared, or its own with the replicated checkpoint."""
        return self.parts_dir if self.checkpoint == "shared" else os.path.join(self.dir, "parts-" + gid)

    def log_path(self, gid):
        return os.path.join(self.dir, "%s.log" % gid)

    def start_gateway(self, gid):
        hosts = ",".join("127.0.0.1:%d" % p for p in self.cluster.mqtt_ports)
        log = open(self.log_path(gid), "ab")
        self.metrics_ports[gid] = free_port()
        self.gws[gid] = subprocess.Popen(
            [PY, "-m", "gateway.scaleout", "--id", gid, "-c", self.conf, "--nats", ",".join(self.cluster.urls),
             "--mqtt", hosts, "--partitions", str(self.P), "--dir", self.gw_dir(gid), "--lease-s", str(self.lease_s),
             "--metrics-port", str(self.metrics_ports[gid]), "--checkpoint", self.checkpoint,
             "--snapshot-min-bytes", str(self.snapshot_min_bytes)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        log.close()

    def scrape(self, gid):
        """{(metric name, partition label or None): value} from a gateway's metrics endpoint."""
        import urllib.request
        from prometheus_client.parser import text_string_to_metric_families
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.metrics_ports[gid], timeout=5) as r:
            text = r.read().decode()
        return {(smp.name, smp.labels.get("partition")): smp.value
                for fam in text_string_to_metric_families(text) for smp in fam.samples
                if smp.name.startswith("edgeflow_scaleout_")}

    def kill_gateway(self, gid):
        p = self.gws.pop(gid, None)
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()

    def stop_gateway(self, gid, timeout=30):
        p = self.gws.pop(gid, None)
        if p is None or p.poll() is not None:
            return None
        p.terminate()
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            return p.wait()

    def events(self, gid, name=None):
        """JSON log lines of one gateway (optionally one event)."""
        out = []
        try:
            with open(self.log_path(gid)) as f:
                for ln in f:
                    try:
                        d = json.loads(ln)
                    except ValueError:
                        continue
                    if name is None or d.get("event") == name:
                        out.append(d)
        except OSError:
            pass
        return out

    def owners(self):
        """partition -> gateway id, from the gateways' latest taken/released events."""
        last = {}
        for gid in sorted(set(self.gws) | {os.path.basename(p)[:-4] for p in glob.glob(self.dir + "/*.log")}):
            for e in self.events(gid):
                if e.get("event") in ("partition_taken", "partition_released", "partition_dropped"):
                    p = e["partition"]
                    if p not in last or e["ts"] >= last[p][0]:
                        last[p] = (e["ts"], gid if e["event"] == "partition_taken" else None)
        return {p: g for p, (_ts, g) in last.items() if g is not None}

    async def scrape_settled(self, gids, timeout=30.0):
        """Every gateway's metrics once ownership has settled: each partition owned once, as
        evenly as the gateways share them, and the metrics agree with the ownership events (a
        rebalance after a NATS node's kill can still be moving partitions on a loaded machine).
        Bounded: after timeout the last scrape is returned and the caller's checks say why."""
        t0 = time.time()
        while True:
            m = {g: self.scrape(g) for g in gids}
            owned = {g: sorted(int(k[1]) for k in m[g] if k[0] == "edgeflow_scaleout_partition_owned") for g in gids}
            by_events = self.owners()
            flat = sorted(p for g in gids for p in owned[g])
            fair = {len(v) for v in owned.values()} <= {self.P // len(gids), -(-self.P // len(gids))}
            agree = all(by_events.get(p) == g for g in gids for p in owned[g])
            if (flat == list(range(self.P)) and fair and agree) or time.time() - t0 > timeout:
                return m
            await asyncio.sleep(0.5)

    async def wait_owned(self, alive, timeout=60.0):
        """Until every partition is owned by a gateway in `alive`; returns seconds waited."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            own = self.owners()
            if len(own) == self.P and set(own.values()) == set(alive):
                return time.time() - t0
            await asyncio.sleep(0.2)
        raise RuntimeError("partitions not all owned by %s within %.0f s: %s" % (alive, timeout, self.owners()))

    def takeover_s(self, owned, t_kill):
        """Seconds from the kill until the last of the dead gateway's partitions was taken."""
        taken = {}
        for gid in self.gws:
            for e in self.events(gid, "partition_taken"):
                if e["ts"] > t_kill and e["partition"] in owned:
                    taken.setdefault(e["partition"], e["ts"])
        if not owned or set(taken) != owned:
            return None, owned
        return max(taken.values()) - t_kill, owned

    def last_owners(self):
        """partition -> the gateway that took it last (its file is the partition's latest)."""
        last = {}
        for gid in {os.path.basename(p)[:-4] for p in glob.glob(self.dir + "/*.log")}:
            for e in self.events(gid, "partition_taken"):
                if e["partition"] not in last or e["ts"] >= last[e["partition"]][0]:
                    last[e["partition"]] = (e["ts"], gid)
        return {p: g for p, (_ts, g) in last.items()}

    async def rebuild_from_stream(self):
        """Replicated checkpoint, gateways stopped: every partition rebuilt from JetStream
        alone into merge_dir. Returns (partitions whose rebuilt file equals, table by table,
        the file of its last owner; {partition: ckpt.Rebuild})."""
        from gateway import ckpt
        from gateway.scaleout import rebuild_all
        infos = await rebuild_all(self.conf, self.cluster.urls, self.P, self.merge_dir)
        owners = self.last_owners()
        name = "part-%03d.db"
        equal = [p for p in sorted(owners) if ckpt.dump(os.path.join(self.merge_dir, name % p))
                 == ckpt.dump(os.path.join(self.gw_dir(owners[p]), name % p))]
        return equal, infos

    def merge(self):
        out = os.path.join(self.dir, "site.db")
        if os.path.exists(out):
            os.remove(out)
        parts = sorted(glob.glob(os.path.join(self.merge_dir, "part-*.db")))
        return out, merge(parts, out, self.windows["size_ms"])

    @property
    def merge_dir(self):
        return self.parts_dir if self.checkpoint == "shared" else os.path.join(self.dir, "rebuilt")

    def outputs_moved(self, since, dead_port):
        """Running gateways whose MQTT output connected to another node after `since`."""
        n = 0
        for gid in self.gws:
            if any(e["ts"] > since and not e.get("host", "").endswith(":%d" % dead_port)
                   for e in self.events(gid, "mqtt_out_connected")):
                n += 1
        return n

    def misplaced(self):
        """Devices found in a partition DB other than gateway.partitions.partition_of() says:
        the servers' {{partition}} mapping and the Python function must agree."""
        bad = 0
        for path in glob.glob(os.path.join(self.merge_dir, "part-*.db")):
            p = int(os.path.basename(path)[5:8])
            c = sqlite3.connect(path)
            devs = [r[0] for r in c.execute("SELECT device FROM devices")]
            c.close()
            bad += sum(1 for d in devs if partition_of(d, self.P) != p)
        return bad

    def close(self):
        for gid in list(self.gws):
            self.stop_gateway(gid, 10)
        self.cluster.stop()


async def scenario(workdir, devices=20, duration=40.0, gateways=2, partitions=8, sample_ms=250, seed=1, log=print,
                   kill_node=0, node_down_s=None, insecure=False, device_timeout_ms=None, checkpoint="shared",
                   snapshot_min_bytes=256 << 10):
    """kill_node: index of the NATS node to kill -9 (None: none); node_down_s: how long it
    stays down at most (default duration/5); it comes back earlier once its devices and the
    gateways' MQTT outputs run on the other nodes."""
    site = ScaleSite(workdir, partitions=partitions, insecure=insecure, devices=["dev-%04d" % i for i in range(devices)],
                     checkpoint=checkpoint, snapshot_min_bytes=snapshot_min_bytes).start()
    truth = os.path.join(site.dir, "truth.db")
    fig = {}
    try:
        gids = ["g%d" % i for i in range(gateways)]
        for g in gids:
            site.start_gateway(g)
        await site.wait_owned(gids)
        log("gateways %s own %s" % (gids, site.owners()))
        ports = site.mqtt_ports
        # each device starts on one node and has the others as failover (broker.hosts)
        dev_over = {}
        for i in range(devices):
            k = i % len(ports)
            order = ports[k:] + ports[:k]
            dev_over[i] = {"broker": {"port": order[0], "hosts": ["127.0.0.1:%d" % p for p in order]}}
            if device_timeout_ms:
                dev_over[i]["broker"]["timeout_ms"] = device_timeout_ms
        fleet = Fleet(devices, ports[0], truth, seed=seed, sample_ms=sample_ms, dev_over=dev_over, broker=site.fleet)
        await fleet.start(stagger_s=1.0)
        step = duration / 5
        node_down_s = node_down_s or step
        await asyncio.sleep(step)
        t_kill = time.time()
        owned = {p for p, g in site.owners().items() if g == "g0"}
        site.kill_gateway("g0")
        log("t=%.0fs kill -9 g0" % (step))
        await site.wait_owned(gids[1:])
        fig["takeover_s"], moved = site.takeover_s(owned, t_kill)
        log("g0's partitions %s taken over in %.2f s" % (sorted(moved), fig["takeover_s"] or -1))
        if checkpoint != "shared":  # how the survivors got g0's partitions: rebuilt from JetStream
            fig["takeover_ckpt"] = [e for g in gids[1:] for e in site.events(g, "partition_checkpoint")
                                    if e["ts"] > t_kill and e["partition"] in moved]
            for e in fig["takeover_ckpt"]:
                log("  partition %d: trusted %s, rebuilt in %.3f s (claim included): snapshot %d B + %d deltas "
                    "(%d B) -> file %d B" % (e["partition"], e["trusted"], e["s"], e["snapshot_bytes"], e["deltas"],
                                             e["delta_bytes"], e["db_bytes"]))
        await asyncio.sleep(step)
        site.start_gateway("g0")
        log("restart g0")
        if kill_node is not None:
            await asyncio.sleep(step)
            k = kill_node  # the gateways' MQTT output starts on n0 too: both sides fail over
            dead = ports[k]
            t_node = time.time()
            site.cluster.kill(k)
            on_dead = [d for d in fleet.devices if d.app and d.app.uplink and d.app.uplink.client.port == dead]
            log("kill -9 NATS node n%d (devices %s use it)" % (k, [d.id for d in on_dead]))
            moved = tried = []
            while time.time() - t_node < node_down_s:
                ups = [d.app.uplink for d in on_dead if d.app and d.app.uplink]
                tried = [u for u in ups if u.client.port != dead or u.c["conn_fails"]]
                moved = [u for u in ups if u.session and u.client.port != dead]
                if len(moved) == len(on_dead) and site.outputs_moved(t_node, dead) == len(site.gws):
                    break
                await asyncio.sleep(0.2)
            fig["failed_over"] = (len(tried), len(moved), len(on_dead))
            fig["failover_s"] = time.time() - t_node if len(moved) == len(on_dead) else None
            fig["outputs_moved"] = (site.outputs_moved(t_node, dead), len(site.gws))
            log("devices of n%d that tried another node: %d, in a session on another node: %d of %d after %.1f s;"
                " gateways whose MQTT output moved: %d of %d" % ((k, len(tried), len(moved), len(on_dead),
                                                               time.time() - t_node) + fig["outputs_moved"]))
            for d in on_dead:
                u = d.app.uplink
                log("  %s port %d session %s connects %d failures %d" % (d.id, u.client.port, u.session,
                                                                        u.c["connects"], u.c["conn_fails"]))
            await asyncio.sleep(max(0.0, step - (time.time() - t_node)))
            site.cluster.start_node(k)
            log("restart NATS node n%d" % k)
        await asyncio.sleep(step)
        drained = await fleet.quiesce(timeout=90)
        log("devices drained: %s" % drained)
        await asyncio.sleep(site.lease_s)  # one more lease tick: the consumers' backlog is refreshed
        fig["metrics"] = await site.scrape_settled(gids)
        for g in gids:
            m = fig["metrics"][g]
            part = sorted(k[1] for k in m if k[0] == "edgeflow_scaleout_partition_owned")
            log("metrics %s: owns %s, taken %d, takeovers %d, committed %d, stream pending %d, ack pending %d" % (
                g, ",".join(part), m[("edgeflow_scaleout_partitions_taken_total", None)],
                m[("edgeflow_scaleout_lease_takeovers_total", None)],
                sum(v for k, v in m.items() if k[0] == "edgeflow_scaleout_partition_committed_records_total"),
                sum(v for k, v in m.items() if k[0] == "edgeflow_scaleout_partition_stream_pending"),
                sum(v for k, v in m.items() if k[0] == "edgeflow_scaleout_partition_ack_pending")))
        if checkpoint != "shared":  # since each gateway took its current partitions
            tot = {k: sum(v for g in gids for kk, v in fig["metrics"][g].items() if kk[0] == k) for k in (
                "edgeflow_scaleout_partition_ckpt_deltas_total", "edgeflow_scaleout_partition_ckpt_bytes_total",
                "edgeflow_scaleout_partition_ckpt_snapshots_total")}
            d, b, n = tot.values()
            fig["ckpt_appended"] = (d, b, n)
            log("checkpoint appends of the partitions' current owners: %d deltas, %d bytes (%.0f per delta), "
                "%d snapshots" % (d, b, b / max(1, d), n))
        await fleet.shutdown()
        fig["fleet"] = fleet.stats()
        await asyncio.sleep(1.0)
        for g in gids:
            site.stop_gateway(g)
        if checkpoint != "shared":
            equal, infos = await site.rebuild_from_stream()
            fig["ckpt_equal"] = (len(equal), partitions)
            fig["rebuilt"] = infos
            log("partitions rebuilt from JetStream alone equal to their last owner's file: %d of %d "
                "(snapshots used: %d)" % (len(equal), partitions, sum(1 for i in infos.values() if i.snapshot_bytes)))
        db, info = site.merge()
        fig["merge"] = info
        fig["misplaced"] = site.misplaced()
        log("devices whose data landed outside partition_of(): %d" % fig["misplaced"])
        rep = groundtruth.check(db, [truth], site.windows)
        fig["report"] = rep
        log(rep.text())
        return rep, fig
    finally:
        site.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=30)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--gateways", type=int, default=2)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--short", action="store_true", help="the suite's variant: 6 devices, 20 s")
    ap.add_argument("--no-node-kill", action="store_true", help="only the gateway faults")
    ap.add_argument("--node-down", type=float, default=None, help="max seconds the killed NATS node stays down")
    ap.add_argument("--insecure", action="store_true", help="plaintext, anonymous NATS (the open set-up)")
    ap.add_argument("--checkpoint", choices=("shared", "replicated"), default="shared",
                    help="replicated: each gateway its own directory, partitions move through JetStream")
    ap.add_argument("--snapshot-min-bytes", type=int, default=256 << 10,
                    help="replicated: the gateways' snapshot threshold (small: snapshots during the run)")
    ap.add_argument("--device-timeout-ms", type=int, default=None,
                    help="the devices' broker.timeout_ms (socket and CONNACK/SUBACK waits; fleet default 3000)")
    args = ap.parse_args(argv)
    if args.short:
        args.devices, args.duration = 6, 20
    d = args.dir or tempfile.mkdtemp(prefix="scaleout-")
    t0 = time.time()
    rep, fig = asyncio.run(scenario(d, args.devices, args.duration, args.gateways, args.partitions, seed=args.seed,
                                       kill_node=None if args.no_node_kill else 0, node_down_s=args.node_down,
                                       insecure=args.insecure, device_timeout_ms=args.device_timeout_ms,
                                       checkpoint=args.checkpoint, snapshot_min_bytes=args.snapshot_min_bytes))
    print("takeover_s=%s  devices_failover_s=%s  run_s=%.0f  dir=%s" % (
        fig.get("takeover_s"), fig.get("failover_s"), time.time() - t0, d))
    if "ckpt_equal" in fig:
        print("replicated checkpoint: rebuilt == last owner's file for %d of %d partitions" % fig["ckpt_equal"])
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
