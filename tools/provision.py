"""edgeflow-provision: a fleet's secrets and the broker's security config, in one folder.

    edgeflow-provision init FLEET node-01 node-02 --broker-host 192.168.1.10 --name edgeflow-broker
    edgeflow-provision add FLEET node-03            # new device (MQTT credentials + ack key)
    edgeflow-provision rotate FLEET node-01         # new MQTT password and ack key for one device
    edgeflow-provision revoke FLEET node-02         # the broker and the gateway forget it
    edgeflow-provision rotate-gateway FLEET         # new gateway MQTT password
    edgeflow-provision renew-server FLEET           # new broker certificate (same CA)
    edgeflow-provision add-service FLEET monitor --access read   # a trusted non-device client
    edgeflow-provision list FLEET
    edgeflow-provision nats FLEET --partitions 8 --name nats1 --name nats2 --name nats3
                                                    # a NATS cluster site (tools/natsauth.py)

What FLEET holds (folder 0700, every secret file 0600):
    fleet.json                  settings and the device list (active / revoked); no secrets
    ca/ca.key, ca/ca.pem        the fleet's CA (EC P-256); ca.key never leaves this folder
    broker/                     copy to the broker host (install dir, default /etc/mosquitto/edgeflow):
        edgeflow.conf           mosquitto config (TLS listener, allow_anonymous false, password_file,
                                acl_file, use_username_as_clientid): include it from conf.d
        server.pem, server.key, ca.pem
        passwd                  mosquitto's own format ($7$: PBKDF2-SHA512), no plaintext
        acl                     %u patterns: a device reaches only its own topics
    gateway/                    copy to the gateway host:
        mqtt_password           the gateway's MQTT password (or env EDGEFLOW_MQTT_PASSWORD)
        devices.json            the device registry with every ack key (docs/wire.md)
        ca.pem, gateway.toml    the [mqtt] / [devices] lines for the gateway config
    devices/NODE.json           one device's secrets for `edgeflow-deploy --secrets devices/NODE.json`

Secrets never go on a command line: they are generated here and written to 0600 files.
After add / rotate / revoke, copy broker/passwd, broker/acl and gateway/devices.json again
and reload: `sudo systemctl reload mosquitto` (SIGHUP: mosquitto rereads the password and
ACL files) and restart the gateway. docs/security.md has the whole procedure.
"""
import argparse
import base64
import datetime
import hashlib
import ipaddress
import json
import os
import secrets
import sys

from shared import wire
from tools import brokerconf

GATEWAY_USER = "edgeflow-gateway"
DEFAULT_PORT = 8883
DEFAULT_INSTALL = "/etc/mosquitto/edgeflow"
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default; passwords are 192-bit random, not guessable
# Devices may have no clock before their first TLS session (the time beacon comes over it):
# certificates are valid from 2000-01-01 so a board whose RTC starts there still accepts them.
NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
CA_YEARS = 30
SERVER_YEARS = 10


class ProvisionError(Exception):
    pass


# ---------------------------------------------------------------- files


def write_secret(path, data, sync=True):
    """Write a file readable by its owner only (0600), atomically (tmp + rename)."""
    if isinstance(data, str):
        data = data.encode()
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_public(path, data):
    if isinstance(data, str):
        data = data.encode()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _mkdirs(root):
    for d in ("", "ca", "broker", "gateway", "devices"):
        p = os.path.join(root, d)
        os.makedirs(p, exist_ok=True)
        os.chmod(p, 0o700)


# ---------------------------------------------------------------- secrets


def new_password():
    return secrets.token_urlsafe(24)


def new_ack_key():
    return secrets.token_hex(32)


def mosquitto_hash(password, salt=None, iterations=PBKDF2_ITERATIONS):
    """mosquitto 2.0 password file hash: $7$ITER$base64(salt)$base64(PBKDF2-SHA512)."""
    salt = salt or os.urandom(12)
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return "$7$%d$%s$%s" % (iterations, base64.b64encode(salt).decode(), base64.b64encode(dk).decode())


def check_mosquitto_hash(password, h):
    parts = h.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    salt = base64.b64decode(parts[3])
    return secrets.compare_digest(mosquitto_hash(password, salt, int(parts[2])), h)


def read_passwd(path):
    out = {}
    try:
        text = _read(path).decode()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            user, _, h = line.partition(":")
            out[user] = h
    return out


def write_passwd(path, users):
    write_secret(path, "".join("%s:%s\n" % (u, users[u]) for u in sorted(users)))


# ---------------------------------------------------------------- certificates


def _crypto():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _key_pem(key):
    _, _, serialization, _, _, _ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert):
    _, _, serialization, _, _, _ = _crypto()
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(name):
    """(key, cert) of a new fleet CA."""
    x509, hashes, _, ec, _, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOT_BEFORE).not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca_key, ca_cert, names, ips, client_auth=False):
    """(key, cert) for the broker: DNS names and IP addresses in subjectAltName. client_auth:
    also usable as a TLS client certificate (NATS cluster routes authenticate each other)."""
    x509, hashes, _, ec, EKU, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (names or ips)[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOT_BEFORE).not_valid_after(now + datetime.timedelta(days=365 * SERVER_YEARS))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([EKU.SERVER_AUTH] + ([EKU.CLIENT_AUTH] if client_auth else [])),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


# ---------------------------------------------------------------- ACL


def render_acl(prefix, gateway_user, services=None):
    """mosquitto ACL: the gateway reads the devices' topics and writes acks and its state; every other user reaches only
    the topics named after its own user name (%u; with use_username_as_clientid the client id
    is the user name too, so nobody can take the gateway's client id or another device's).
    services: {user: "read" | "readwrite"} on the whole prefix (monitoring, test relays)."""
    p = prefix
    svc = "".join("user %s\ntopic %s %s/#\n\n" % (u, services[u], p) for u in sorted(services or {}))
    return svc + (
        "# edgeflow ACL (tools/provision.py). Devices: only their own topics (%%u = user name).\n"
        "# the gateway reads what devices send and writes only acks and its own state\n"
        "user %(gw)s\n"
        "topic read %(p)s/d/+/data\n"
        "topic read %(p)s/d/+/hello\n"
        "topic read %(p)s/d/+/state\n"
        "topic write %(p)s/d/+/ack\n"
        "topic write %(p)s/gw/state\n"
        "\n"
        "# every user (patterns apply to all):\n"
        "pattern write %(p)s/d/%%u/data\n"
        "pattern write %(p)s/d/%%u/hello\n"
        "pattern write %(p)s/d/%%u/state\n"
        "pattern read %(p)s/d/%%u/ack\n"
        "pattern read %(p)s/gw/state\n"
    ) % {"p": p, "gw": gateway_user}


# ---------------------------------------------------------------- the fleet folder


class Fleet:
    """A provisioned fleet folder (see the module doc)."""

    def __init__(self, root):
        self.root = os.path.abspath(str(root))
        self.state_path = self.path("fleet.json")

    def path(self, *p):
        return os.path.join(self.root, *p)

    # ---- state

    def load(self):
        try:
            st = json.loads(_read(self.state_path))
        except FileNotFoundError:
            raise ProvisionError("%s is not a provisioned fleet (no fleet.json): run `edgeflow-provision init`"
                                 % self.root)
        if st.get("version") != 1:
            raise ProvisionError("fleet.json: unsupported version %r" % st.get("version"))
        return st

    def save(self, st):
        write_secret(self.state_path, json.dumps(st, indent=1, sort_keys=True) + "\n")

    def devices(self, st=None):
        st = st or self.load()
        return sorted(d for d, v in st["devices"].items() if not v.get("revoked"))

    # ---- init

    def init(self, broker_host, names=(), ips=(), port=DEFAULT_PORT, prefix="edgeflow",
             gateway_user=GATEWAY_USER, install_dir=DEFAULT_INSTALL, bind="", devices=()):
        if os.path.exists(self.state_path):
            raise ProvisionError("%s already holds a fleet: use add / rotate / revoke" % self.root)
        wire.Topics(prefix)
        wire.check_device_id(gateway_user)
        names, ips = list(names), list(ips)
        if not names and not ips:
            names = ["edgeflow-broker"]
        try:
            ipaddress.ip_address(broker_host)
            if broker_host not in ips:
                ips.append(broker_host)
        except ValueError:
            if broker_host not in names:
                names.insert(0, broker_host)
        for i in ips:
            ipaddress.ip_address(i)
        _mkdirs(self.root)
        st = {"version": 1, "prefix": prefix, "gateway_user": gateway_user, "broker_host": broker_host,
              "port": port, "bind": bind, "names": names, "ips": ips,
              # MicroPython's TLS checks a DNS name most reliably: devices check the first one
              "server_hostname": names[0] if names else ips[0],
              "install_dir": install_dir, "devices": {}}
        ca_key, ca_cert = make_ca("edgeflow fleet CA %s" % secrets.token_hex(4))
        write_secret(self.path("ca", "ca.key"), _key_pem(ca_key))
        write_public(self.path("ca", "ca.pem"), _cert_pem(ca_cert))
        self.save(st)
        self._server_cert(st)
        self._gateway_password(st)
        write_secret(self.path("gateway", "devices.json"), json.dumps({"version": 1, "devices": {}}) + "\n")
        self._render(st)
        if devices:
            self.add_many(list(devices))
        return self.load()

    def _ca(self):
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        return (load_pem_private_key(_read(self.path("ca", "ca.key")), None),
                x509.load_pem_x509_certificate(_read(self.path("ca", "ca.pem"))))

    def _server_cert(self, st):
        ca_key, ca_cert = self._ca()
        key, cert = make_server_cert(ca_key, ca_cert, st["names"], st["ips"])
        write_secret(self.path("broker", "server.key"), _key_pem(key))
        write_public(self.path("broker", "server.pem"), _cert_pem(cert))

    def _gateway_password(self, st):
        pw = new_password()
        users = read_passwd(self.path("broker", "passwd"))
        users[st["gateway_user"]] = mosquitto_hash(pw)
        write_passwd(self.path("broker", "passwd"), users)
        write_secret(self.path("gateway", "mqtt_password"), pw + "\n")

    def _render(self, st):
        """Everything derived from the state: CA copies, mosquitto config, ACL, gateway.toml."""
        ca = _read(self.path("ca", "ca.pem"))
        write_public(self.path("broker", "ca.pem"), ca)
        write_public(self.path("gateway", "ca.pem"), ca)
        write_public(self.path("broker", "acl"), render_acl(st["prefix"], st["gateway_user"], st.get("services")))
        inst = st["install_dir"].rstrip("/")
        write_public(self.path("broker", "edgeflow.conf"), brokerconf.render(
            st["port"], bind=st["bind"], conf_d=True, security=security_paths(inst)))
        write_public(self.path("gateway", "gateway.toml"), (
            "# [mqtt] and [devices] for the gateway config (paths where you copy gateway/)\n"
            "[mqtt]\nhost = %s\nport = %d\nusername = %s\npassword_file = \"/etc/edgeflow/mqtt_password\"\n"
            "tls_ca = \"/etc/edgeflow/ca.pem\"\ntls_server_name = %s\n\n"
            "[devices]\nfile = \"/etc/edgeflow/devices.json\"\n") % (
            json.dumps(st["broker_host"]), st["port"], json.dumps(st["gateway_user"]),
            json.dumps(st["server_hostname"])))

    # ---- devices

    def _registry(self):
        return json.loads(_read(self.path("gateway", "devices.json")))

    def _save_registry(self, reg):
        write_secret(self.path("gateway", "devices.json"), json.dumps(reg, indent=1, sort_keys=True) + "\n")

    def _issue(self, st, devs, stamp):
        """New MQTT password + ack key for each of devs: the password file and the registry are
        rewritten once, each device gets its secrets file. Returns the files' paths."""
        users = read_passwd(self.path("broker", "passwd"))
        reg = self._registry()
        ca = _read(self.path("ca", "ca.pem")).decode()
        paths = []
        for dev in devs:
            pw, key = new_password(), new_ack_key()
            users[dev] = mosquitto_hash(pw)
            entry = dict(reg["devices"].get(dev) or {})
            entry["ack_key"] = key
            reg["devices"][dev] = entry
            secret = {
                "config": {
                    "device_id": dev,
                    "prefix": st["prefix"],
                    "ack_key": key,
                    "broker": {"host": st["broker_host"], "port": st["port"], "user": dev, "password": pw,
                               "client_id": dev,
                               "tls": {"ca": "/ca.pem", "server_hostname": st["server_hostname"]}},
                },
                "files": {"/ca.pem": ca},
            }
            path = self.path("devices", dev + ".json")
            write_secret(path, json.dumps(secret, indent=1, sort_keys=True) + "\n", sync=len(devs) == 1)
            paths.append(path)
            st["devices"].setdefault(dev, {}).update(stamp)
        if len(devs) > 1:
            os.sync()  # one flush for the batch instead of one fsync per file
        # the broker learns the devices before the gateway does (the gateway refuses unknown ids)
        write_passwd(self.path("broker", "passwd"), users)
        self._save_registry(reg)
        self.save(st)
        return paths

    def add(self, dev):
        return self.add_many([dev])[0]

    def add_many(self, devs):
        st = self.load()
        for dev in devs:
            try:
                wire.check_device_id(dev)
            except wire.WireError:
                raise ProvisionError("bad device id %r: 1..32 of A-Z a-z 0-9 _ -" % (dev,))
            if dev == st["gateway_user"] or dev in st.get("services", {}):
                raise ProvisionError("%r is the gateway's or a service's user name" % dev)
            if dev in st["devices"] and not st["devices"][dev].get("revoked"):
                raise ProvisionError("%s is already provisioned: use rotate for new secrets" % dev)
        if len(set(devs)) != len(devs):
            raise ProvisionError("a device id is given twice")
        for dev in devs:
            st["devices"][dev] = {}  # re-adding a revoked device starts a fresh record
        return self._issue(st, devs, {"added": _now()})

    def rotate(self, dev):
        st = self.load()
        self._active(st, dev)
        return self._issue(st, [dev], {"rotated": _now()})[0]

    def revoke(self, dev):
        st = self.load()
        self._active(st, dev)
        users = read_passwd(self.path("broker", "passwd"))
        users.pop(dev, None)
        write_passwd(self.path("broker", "passwd"), users)
        reg = self._registry()
        reg["devices"].pop(dev, None)
        self._save_registry(reg)
        try:
            os.unlink(self.path("devices", dev + ".json"))
        except FileNotFoundError:
            pass
        st["devices"][dev]["revoked"] = _now()
        self.save(st)

    def add_service(self, user, access="read"):
        """A trusted client that is neither a device nor the gateway (a monitor: read; a test
        relay: readwrite) with its own password. Returns the password file's path."""
        st = self.load()
        wire.check_device_id(user)
        if access not in ("read", "readwrite"):
            raise ProvisionError("access must be read or readwrite")
        if user == st["gateway_user"] or user in st["devices"]:
            raise ProvisionError("%r is already a device or the gateway" % user)
        pw = new_password()
        users = read_passwd(self.path("broker", "passwd"))
        users[user] = mosquitto_hash(pw)
        write_passwd(self.path("broker", "passwd"), users)
        path = self.path("services", user + ".password")
        os.makedirs(self.path("services"), mode=0o700, exist_ok=True)
        write_secret(path, pw + "\n")
        st.setdefault("services", {})[user] = access
        self.save(st)
        self._render(st)
        return path

    def service_password(self, user):
        return _read(self.path("services", user + ".password")).decode().strip()

    def rotate_gateway(self):
        self._gateway_password(self.load())

    def renew_server(self):
        self._server_cert(self.load())

    def _active(self, st, dev):
        if dev not in st["devices"]:
            raise ProvisionError("%s is not in this fleet" % dev)
        if st["devices"][dev].get("revoked"):
            raise ProvisionError("%s is revoked: `add` it to issue new secrets" % dev)

    # ---- for tests and the simulator

    def device_secrets(self, dev):
        return json.loads(_read(self.path("devices", dev + ".json")))

    def gateway_password(self):
        return _read(self.path("gateway", "mqtt_password")).decode().strip()


def security_paths(d):
    return {"cafile": d + "/ca.pem", "certfile": d + "/server.pem", "keyfile": d + "/server.key",
            "password_file": d + "/passwd", "acl_file": d + "/acl"}


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- CLI


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="edgeflow-provision", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Set-up, rotation and revocation: docs/security.md")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init", help="new fleet: CA, broker certificate, gateway and device credentials")
    p.add_argument("fleet", help="folder for the fleet's secrets (created, mode 0700)")
    p.add_argument("devices", nargs="*", help="device ids to provision now")
    p.add_argument("--broker-host", required=True, help="address the devices and the gateway connect to")
    p.add_argument("--name", action="append", default=[], help="DNS name in the broker certificate (repeatable); "
                   "devices check the first one (default: edgeflow-broker)")
    p.add_argument("--ip", action="append", default=[], help="IP address in the broker certificate (repeatable)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TLS listener port (default 8883)")
    p.add_argument("--bind", default="", help="listener address (default: all interfaces)")
    p.add_argument("--prefix", default="edgeflow", help="topic prefix (default edgeflow)")
    p.add_argument("--gateway-user", default=GATEWAY_USER, help="the gateway's MQTT user and client id")
    p.add_argument("--install-dir", default=DEFAULT_INSTALL,
                   help="where broker/ is copied on the broker host (default %s)" % DEFAULT_INSTALL)
    for name, hlp in (("add", "provision new devices"), ("rotate", "new MQTT password and ack key for devices"),
                      ("revoke", "remove devices from the broker's password file and the gateway's registry")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("fleet")
        p.add_argument("devices", nargs="+")
    p = sub.add_parser("add-service", help="a trusted client on the whole topic tree (monitor: read)")
    p.add_argument("fleet")
    p.add_argument("user")
    p.add_argument("--access", choices=("read", "readwrite"), default="read")
    p = sub.add_parser("nats", help="TLS certificate and users for a NATS cluster that speaks MQTT (scale-out)")
    p.add_argument("fleet")
    p.add_argument("--partitions", type=int, required=True, help="P of the site (the servers' partition mapping)")
    p.add_argument("--name", action="append", default=[], help="DNS name of a NATS node (repeatable)")
    p.add_argument("--ip", action="append", default=[], help="IP address of a NATS node (repeatable)")
    for name, hlp in (("rotate-gateway", "new gateway MQTT password"),
                      ("renew-server", "new broker certificate from the same CA"),
                      ("list", "devices and their state")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("fleet")
    return ap.parse_args(argv)


RELOAD = ("copy %(f)s/broker/passwd and %(f)s/broker/acl to the broker host and reload it "
          "(sudo systemctl reload mosquitto); copy %(f)s/gateway/devices.json to the gateway and restart it")


def run(argv=None, out=None):
    out = out or sys.stdout
    a = parse_args(argv)
    f = Fleet(a.fleet)
    rc = _run(a, f, out)
    if a.cmd not in ("init", "list", "renew-server", "nats"):
        from tools import natsauth
        if natsauth.refresh(f) is not None:  # users changed: the NATS side too
            print("provision: rewrote %s: copy it to every NATS node and reload them (nats-server --signal reload)"
                  % f.path("nats", "auth.conf"), file=out)
    return rc


def _run(a, f, out):
    if a.cmd == "nats":
        from tools import natsauth
        n = natsauth.init(f, a.partitions, a.name, a.ip)
        print("provision: NATS certificate and %d users in %s; a node's config in %s (docs/scale-out.md)"
              % (n, f.path("nats"), f.path("nats", "node.conf")), file=out)
        return 0
    if a.cmd == "init":
        f.init(a.broker_host, a.name, a.ip, a.port, a.prefix, a.gateway_user, a.install_dir, a.bind, a.devices)
        print("provision: fleet in %s (%d devices); broker files in %s/broker, gateway files in %s/gateway"
              % (f.root, len(a.devices), f.root, f.root), file=out)
        for d in a.devices:
            print("  deploy %s: edgeflow-deploy --port PORT --secrets %s" % (d, f.path("devices", d + ".json")), file=out)
        return 0
    if a.cmd in ("add", "rotate"):
        paths = f.add_many(a.devices) if a.cmd == "add" else [f.rotate(d) for d in a.devices]
        for d, path in zip(a.devices, paths):
            print("provision: %s %s: edgeflow-deploy --port PORT --secrets %s" % (a.cmd, d, path), file=out)
        print("then " + RELOAD % {"f": f.root}, file=out)
        return 0
    if a.cmd == "revoke":
        for d in a.devices:
            f.revoke(d)
            print("provision: revoked %s" % d, file=out)
        print("then " + RELOAD % {"f": f.root}, file=out)
        return 0
    if a.cmd == "add-service":
        path = f.add_service(a.user, a.access)
        print("provision: service user %s (%s on %s/#), password in %s; then %s" % (
            a.user, a.access, f.load()["prefix"], path, RELOAD % {"f": f.root}), file=out)
        return 0
    if a.cmd == "rotate-gateway":
        f.rotate_gateway()
        print("provision: new gateway password in %s; copy it and broker/passwd, reload mosquitto, restart the gateway"
              % f.path("gateway", "mqtt_password"), file=out)
        return 0
    if a.cmd == "renew-server":
        f.renew_server()
        print("provision: new %s and server.key; copy them to the broker host and restart mosquitto"
              % f.path("broker", "server.pem"), file=out)
        return 0
    st = f.load()
    for d in sorted(st["devices"]):
        v = st["devices"][d]
        print("%-32s %s" % (d, "revoked " + v["revoked"] if v.get("revoked") else "active (added %s%s)" % (
            v.get("added"), ", rotated " + v["rotated"] if v.get("rotated") else "")), file=out)
    return 0


def main(argv=None):
    try:
        return run(argv)
    except (ProvisionError, wire.WireError, ValueError, OSError) as e:
        print("edgeflow-provision: %s" % e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
