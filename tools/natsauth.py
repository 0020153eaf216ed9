"""NATS security for a provisioned fleet (one site, several gateways: docs/scale-out.md).

    edgeflow-provision nats FLEET --partitions 8 --name nats1 --name nats2 --name nats3 [--ip 10.0.0.1 ...]

adds to an `edgeflow-provision init` folder (same CA, same device and gateway passwords):

    nats/ca.pem, nats/server.pem, nats/server.key   one certificate for every node: the fleet's
        names (the devices check server_hostname) + the nodes' names/IPs; server and client
        use (cluster routes authenticate each other with it: mutual TLS, verify on)
    nats/auth.conf      `authorization { users = [...] }` (0600): passwords as bcrypt hashes
    nats/node.conf      a node's whole nats-server config (TLS, users, JetStream, MQTT, routes,
        the partition mapping): copy it with the files above, set server_name

Users and permissions (NATS checks them on the subjects the MQTT topics map to,
edgeflow/d/<id>/data -> edgeflow.d.<id>.data, and for a publish after the partition mapping:
edgeflow.p.<partition>.<id>.data):
- a device: MQTT only; publish its own data/hello/state into its own partition, subscribe its own ack and the
  gateway state (mosquitto's %u ACL, one user entry per device: NATS config files have no
  %u pattern);
- the gateway: NATS and MQTT; publish acks and the gateway state, and on the NATS side only
  the JetStream API of its stream EDGEFLOW (consume, ack, recreate consumers), of its
  lease bucket and of the replicated checkpoint (stream EDGEFLOW_CKPT, object store
  edgeflow_ckpt); nothing on the device subjects it could forge;
- services (add-service): read, or read and write, on the whole prefix;
- a site's JetStream sink (sink-user): publish only under its own site's subject prefix into
  the sink stream (and create it); NATS only;
- the central collector (collector-user): consume and ack the sink stream, publish nothing;
  NATS only.

    python -m tools.natsauth sink-user FLEET sink-plant-a --site plant-a [--stream EDGEFLOW_SINK]
    python -m tools.natsauth collector-user FLEET collector [--stream EDGEFLOW_SINK]

print the password file to give the sink ([[sinks.sink]] user / password_file) or the
collector ([nats] user / password_file), and rewrite auth.conf (copy it to the nodes and
reload them, as after add / revoke).
`add` / `rotate` / `revoke` / `rotate-gateway` / `add-service` rewrite auth.conf when the
fleet has NATS settings; copy it to the nodes and reload them (`nats-server --signal
reload`, or SIGHUP). bcrypt cost 4: every password is 192 random bits, so the hash only has
to hide it, and a reconnect storm of thousands of devices costs the servers ~1 ms each.
"""
import hashlib
import json
import os

STREAM = "EDGEFLOW"  # gateway/ingest_jetstream.py
BUCKET = "edgeflow_leases"  # gateway/scaleout.py
CKPT_STREAM, CKPT_BUCKET = "EDGEFLOW_CKPT", "edgeflow_ckpt"  # gateway/ckpt.py
BCRYPT_COST = 4


def _subj(prefix):
    return prefix.replace("/", ".")


def device_permissions(prefix, dev, partitions):
    """NATS checks a publish on the subject after the servers' mapping: the device's own
    partition (gateway/partitions.py), so a device cannot push its data into another one."""
    from gateway.partitions import partition_of
    p = _subj(prefix)
    k = partition_of(dev, partitions)
    return {"publish": {"allow": ["%s.p.%d.%s.%s" % (p, k, dev, leaf) for leaf in ("data", "hello", "state")]},
            # $MQTT.sub.>: QoS 1 deliveries (implicit since nats-server 2.12; explicit for older ones)
            "subscribe": {"allow": ["%s.d.%s.ack" % (p, dev), "%s.gw.state" % p, "$MQTT.sub.>"]}}


def gateway_permissions(prefix, stream=STREAM, bucket=BUCKET):
    p = _subj(prefix)
    kv = "KV_" + bucket
    js = "$JS.API."
    return {"publish": {"allow": [
        "%s.d.*.ack" % p, "%s.gw.state" % p,
        js + "INFO", js + "STREAM.INFO." + stream, js + "STREAM.CREATE." + stream,
        js + "CONSUMER.*." + stream + ".>", js + "CONSUMER.DURABLE.CREATE.%s.*" % stream,
        js + "CONSUMER.MSG.NEXT.%s.*" % stream,
        "$JS.ACK.%s.>" % stream,
        js + "STREAM.INFO." + kv, js + "STREAM.CREATE." + kv, js + "STREAM.MSG.GET." + kv,
        js + "DIRECT.GET.%s.>" % kv, js + "CONSUMER.*." + kv, js + "CONSUMER.*.%s.>" % kv,
        "$KV.%s.>" % bucket] + ckpt_permissions(prefix)},
        "subscribe": {"allow": ["%s.gw.state" % p, "_INBOX.>", "$MQTT.sub.>"]}}


def ckpt_permissions(prefix, stream=CKPT_STREAM, bucket=CKPT_BUCKET):
    """The replicated checkpoint (gateway/ckpt.py): append/read/purge its partition subjects
    in its stream, and the snapshot object store (chunks, meta, its ordered consumers'
    flow control)."""
    js, obj = "$JS.API.", "OBJ_" + bucket
    # STREAM.NAMES: nats-py's object store looks its stream up by subject (names only)
    out = ["%s.ckpt.>" % _subj(prefix), "$O.%s.>" % bucket, "$JS.FC.%s.>" % obj, js + "STREAM.NAMES"]
    for s in (stream, obj):
        out += [js + "STREAM.INFO." + s, js + "STREAM.CREATE." + s, js + "STREAM.MSG.GET." + s,
                js + "DIRECT.GET.%s.>" % s, js + "STREAM.PURGE." + s, js + "CONSUMER.*.%s.>" % s,
                js + "CONSUMER.CREATE." + s, js + "CONSUMER.MSG.NEXT.%s.*" % s]
    return out


SINK_STREAM, SINK_PREFIX = "EDGEFLOW_SINK", "edgeflow.sink"  # gateway/sinks/__init__.py defaults


def sink_permissions(site, stream=SINK_STREAM, subject_prefix=SINK_PREFIX):
    """A site's gateway sink (gateway/sinks/jetstream.py): its stream's info/create and
    publishes under <subject_prefix>.<site>. only (the collector also checks subject vs
    body); PubAcks come back on _INBOX."""
    js = "$JS.API."
    return {"publish": {"allow": ["%s.%s.>" % (subject_prefix, site), js + "INFO", js + "STREAM.INFO." + stream,
                                  js + "STREAM.CREATE." + stream]},
            "subscribe": {"allow": ["_INBOX.>"]}}


def collector_permissions(stream=SINK_STREAM):
    """The central collector (gateway/collector.py): the sink stream's info/create, its
    durable consumer, fetches and acks; nothing else."""
    js = "$JS.API."
    return {"publish": {"allow": [js + "INFO", js + "STREAM.INFO." + stream, js + "STREAM.CREATE." + stream,
                                  js + "CONSUMER.*.%s.>" % stream, js + "CONSUMER.*.*.%s.>" % stream,
                                  js + "CONSUMER.CREATE." + stream, "$JS.ACK.%s.>" % stream]},
            "subscribe": {"allow": ["_INBOX.>"]}}


def add_downstream_user(fleet, user, role, site=None, stream=SINK_STREAM):
    """A sink (role "sink", with its site) or collector user with its own password; the fleet
    must have NATS settings (init). Writes FLEET/nats/users/<user>.password (0600), rewrites
    auth.conf; returns the password file's path."""
    from shared import wire
    from tools.provision import ProvisionError, new_password, write_secret
    st = fleet.load()
    if not st.get("nats"):
        raise ProvisionError("no NATS settings in this fleet: edgeflow-provision nats FLEET first")
    wire.check_device_id(user)
    if role not in ("sink", "collector") or (role == "sink") != bool(site):
        raise ProvisionError("a sink user needs --site, a collector user none")
    if site:
        wire.check_device_id(site)  # one subject token
    if user in (st["gateway_user"],) or user in st["devices"] or user in st.get("services", {}):
        raise ProvisionError("%r is already a device, a service or the gateway" % user)
    path = fleet.path("nats", "users", user + ".password")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    write_secret(path, new_password() + "\n")
    st["nats"].setdefault("downstream", {})[user] = {"role": role, "site": site, "stream": stream}
    fleet.save(st)
    render_users(fleet)
    return path


def service_permissions(prefix, access):
    p = _subj(prefix)
    perm = {"subscribe": {"allow": [p + ".>", "$MQTT.sub.>", "_INBOX.>"]}}
    perm["publish"] = {"allow": [p + ".>"] if access == "readwrite" else []}
    return perm


def _bcrypt(password, cache, user):
    """bcrypt hash of password, reused from cache while the password is the same."""
    import bcrypt
    tag = hashlib.sha256(password.encode()).hexdigest()[:32]
    old = cache.get(user)
    if old and old[0] == tag:
        return old[1], old
    h = bcrypt.hashpw(password.encode(), bcrypt.gensalt(BCRYPT_COST, prefix=b"2a")).decode()
    return h, [tag, h]


def render_users(fleet):
    """Write FLEET/nats/auth.conf from the fleet's current users (active devices, gateway,
    services). Returns the number of users."""
    from tools.provision import write_secret
    st = fleet.load()
    prefix = st["prefix"]
    cache_path = fleet.path("nats", "hashes.json")
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    new_cache = {}
    users = []

    def user(name, password, perms, types):
        h, new_cache[name] = _bcrypt(password, cache, name)
        users.append(user_entry(name, h, perms, types))

    user(st["gateway_user"], fleet.gateway_password(), gateway_permissions(prefix), ["STANDARD", "MQTT"])
    for svc, access in sorted(st.get("services", {}).items()):
        user(svc, fleet.service_password(svc), service_permissions(prefix, access), ["STANDARD", "MQTT"])
    for name, d in sorted(st.get("nats", {}).get("downstream", {}).items()):
        with open(fleet.path("nats", "users", name + ".password")) as f:
            pw = f.readline().strip()
        perm = sink_permissions(d["site"], d["stream"]) if d["role"] == "sink" else collector_permissions(d["stream"])
        user(name, pw, perm, ["STANDARD"])
    for dev in fleet.devices(st):
        pw = fleet.device_secrets(dev)["config"]["broker"]["password"]
        user(dev, pw, device_permissions(prefix, dev, st["nats"]["partitions"]), ["MQTT"])
    write_secret(fleet.path("nats", "auth.conf"), auth_conf(users))
    write_secret(cache_path, json.dumps(new_cache) + "\n")
    return len(users)


def user_entry(name, password_hash, perms, types):
    """One entry of the users list (password_hash: bcrypt, e.g. from hash_password())."""
    return "  {user: %s, password: %s, allowed_connection_types: %s,\n   permissions: %s}" % (
        json.dumps(name), json.dumps(password_hash), json.dumps(types), json.dumps(perms))


def hash_password(password):
    return _bcrypt(password, {}, None)[0]


def auth_conf(entries):
    return ("# edgeflow NATS users (tools/natsauth.py; regenerated by edgeflow-provision)\n"
            "authorization {\n timeout: 5\n users = [\n%s\n ]\n}\n" % "\n".join(entries))


def paths(d):
    """Files of a node's security settings in directory d (FLEET/nats or the install dir)."""
    return {"cert": os.path.join(d, "server.pem"), "key": os.path.join(d, "server.key"),
            "ca": os.path.join(d, "ca.pem"), "auth": os.path.join(d, "auth.conf")}


def tls_blocks(p, timeout=5):
    """The node config's TLS settings for the client port, MQTT and cluster routes, as three
    strings: (top-level tls {}, the tls {} inside mqtt {}, the tls {} inside cluster {})."""
    base = "cert_file: %s, key_file: %s, ca_file: %s, timeout: %s" % (
        json.dumps(p["cert"]), json.dumps(p["key"]), json.dumps(p["ca"]), timeout)
    return ("tls { %s }" % base, "tls { %s }" % base, "tls { %s, verify: true }" % base)


def init(fleet, partitions, names=(), ips=()):
    """Node certificate + users for a fleet folder whose site has `partitions` partitions
    (the servers' mapping); the settings are kept in fleet.json so that later add / rotate /
    revoke rewrite the users."""
    if not 1 <= int(partitions) <= 1024:
        raise ValueError("partitions: 1..1024")
    from tools.provision import _cert_pem, _key_pem, _read, make_server_cert, write_public, write_secret
    st = fleet.load()
    os.makedirs(fleet.path("nats"), mode=0o700, exist_ok=True)
    os.chmod(fleet.path("nats"), 0o700)
    all_names = list(dict.fromkeys(list(st["names"]) + list(names)))
    all_ips = list(dict.fromkeys(list(st["ips"]) + list(ips)))
    st["nats"] = {"names": all_names, "ips": all_ips, "partitions": int(partitions)}
    ca_key, ca_cert = fleet._ca()
    key, cert = make_server_cert(ca_key, ca_cert, all_names, all_ips, client_auth=True)
    write_secret(fleet.path("nats", "server.key"), _key_pem(key))
    write_public(fleet.path("nats", "server.pem"), _cert_pem(cert))
    write_public(fleet.path("nats", "ca.pem"), _read(fleet.path("ca", "ca.pem")))
    fleet.save(st)
    n = render_users(fleet)
    write_public(fleet.path("nats", "node.conf"), node_template(st, list(names) + list(ips)))
    return n


def node_template(st, nodes, install="/etc/nats/edgeflow"):
    """A whole nats-server config for one node of the site (set server_name per node):
    TLS on every port, the users, JetStream, MQTT, routes, the partition mapping."""
    from gateway.partitions import nats_mappings
    t, m, c = tls_blocks(paths(install))
    routes = ", ".join("nats-route://%s:6222" % h for h in (nodes or ["nats1", "nats2", "nats3"]))
    maps = ", ".join("%s: %s" % (json.dumps(k), json.dumps(v))
                     for k, v in nats_mappings(st["prefix"], st["nats"]["partitions"]).items())
    return ("# nats-server config of one node of an edgeflow site (tools/natsauth.py).\n"
            "# Copy FLEET/nats/{server.pem,server.key,ca.pem,auth.conf} to %(inst)s and this file\n"
            "# to %(inst)s/node.conf; set server_name; run nats-server -c %(inst)s/node.conf\n"
            "server_name: nats1\n"
            "listen: 0.0.0.0:4222\n"
            "http: 127.0.0.1:8222      # monitoring stays on the node\n"
            "max_payload: 4MB\n"
            "%(t)s\n"
            "include auth.conf         # the users (next to this file)\n"
            "jetstream { store_dir: /var/lib/nats, max_file_store: 8G }\n"
            "mqtt { listen: 0.0.0.0:8883, ack_wait: \"30s\", max_ack_pending: 1024, stream_replicas: 3, %(m)s }\n"
            "cluster { name: edgeflow, listen: 0.0.0.0:6222, routes: [%(routes)s], %(c)s }\n"
            "mappings { %(maps)s }\n") % {"inst": install, "t": t, "m": m, "c": c, "routes": routes, "maps": maps}


def refresh(fleet):
    """After a change of users: rewrite auth.conf if the fleet has NATS settings."""
    if fleet.load().get("nats"):
        return render_users(fleet)
    return None


def main(argv=None):
    import argparse
    import sys
    from tools.provision import Fleet, ProvisionError
    ap = argparse.ArgumentParser(prog="python -m tools.natsauth", description="NATS users of the downstream path")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in ("sink-user", "collector-user"):
        p = sub.add_parser(cmd)
        p.add_argument("fleet")
        p.add_argument("user")
        p.add_argument("--stream", default=SINK_STREAM)
        if cmd == "sink-user":
            p.add_argument("--site", required=True, help="the site id its sink publishes under")
    a = ap.parse_args(argv)
    try:
        path = add_downstream_user(Fleet(a.fleet), a.user, "sink" if a.cmd == "sink-user" else "collector",
                                   getattr(a, "site", None), a.stream)
    except (ProvisionError, ValueError) as e:
        print("natsauth: %s" % e, file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
