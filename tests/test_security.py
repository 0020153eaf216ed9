"""Security acceptance (issue 12) against a real mosquitto running the config edgeflow-provision
writes: anonymous and plaintext clients refused, a device's credentials confined to its own
topics, nobody takes the gateway's client id, TLS with a wrong CA or name refused by the
gateway and by the firmware's MQTT client, unprovisioned ids quarantined, secrets never on a
command line. Every "not delivered" is checked against a control message sent after it on
the same connection (in-order delivery), not against a timer."""
import asyncio
import json
import os
import queue
import stat
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from firmware.hal_sim import SimHal
from firmware.mqtt import MQTTClient
from gateway.config import Config, ConfigError
from gateway.ingest import Ingest, tls_context
from gateway.metrics import Stats
from gateway.service import Gateway
from shared import wire
from tests.conftest import ROOT, mosquitto_bin
from tools import deploy, provision
from tools.broker import Mosquitto

pytestmark = pytest.mark.broker
TOP = wire.Topics()


@pytest.fixture(scope="module")
def sec(tmp_path_factory):
    if not mosquitto_bin():
        pytest.fail("mosquitto is not installed: run the README's set-up command")
    b = Mosquitto(tmp_path_factory.mktemp("secbroker"), devices=["n1", "n2", "n3"]).start()
    yield b
    b.stop()


class Client:
    """A paho client on its own network thread, with waits that end on events."""

    def __init__(self, broker, user=None, password=None, client_id=None, clean=True, tls=True, ca_file=None):
        self.msgs = queue.Queue()
        self.connack = queue.Queue()
        self.disconnected = threading.Event()
        self.subacks = queue.Queue()
        cid = client_id or user or "anon-%d" % time.monotonic_ns()
        c = self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=clean)
        c.on_connect = lambda cl, u, f, rc, p: self.connack.put((str(rc), f.session_present))
        c.on_disconnect = lambda cl, u, f, rc, p: self.disconnected.set()
        c.on_message = lambda cl, u, m: self.msgs.put((m.topic, bytes(m.payload), m.retain))
        c.on_subscribe = lambda cl, u, mid, rcs, p: self.subacks.put([str(r) for r in rcs])
        if password is not None:
            c.username_pw_set(user, password)
        elif user is not None:
            c.username_pw_set(*broker.credentials(user))
        if tls:
            c.tls_set_context(broker.tls_context(ca_file))
        self.port = broker.port

    def connect(self, timeout=10):
        """CONNACK reason as text ('Success', 'Not authorized', ...) or the exception's text."""
        try:
            self.c.connect("127.0.0.1", self.port, 30)
        except Exception as e:  # noqa: BLE001 - the refusal is the result
            return repr(e)
        self.c.loop_start()
        try:
            rc, self.session_present = self.connack.get(timeout=timeout)
        except queue.Empty:
            rc = "no CONNACK (connection closed)"
        return rc

    def sub(self, *topics):
        self.c.subscribe([(t, 1) for t in topics])
        return self.subacks.get(timeout=10)

    def pub(self, topic, payload, retain=False):
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        return info

    def until(self, topic, payload, timeout=10):
        """Messages received up to and including (topic, payload)."""
        got = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                m = self.msgs.get(timeout=0.2)
            except queue.Empty:
                continue
            got.append(m)
            if m[0] == topic and m[1] == payload:
                return got
        raise AssertionError("control message %s %r not received; got %r" % (topic, payload, got))

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


# ---------------------------------------------------------------- provisioning


def test_provisioned_files_are_private_and_the_hash_is_mosquittos_own(sec, tmp_path):
    f = sec.fleet
    assert stat.S_IMODE(os.stat(f.root).st_mode) == 0o700
    for p in ("ca/ca.key", "broker/server.key", "broker/passwd", "gateway/mqtt_password", "gateway/devices.json",
              "devices/n1.json", "fleet.json"):
        assert stat.S_IMODE(os.stat(f.path(p)).st_mode) == 0o600, p
    pw = sec.credentials("n1")[1]
    gw_pw = f.gateway_password()
    users = provision.read_passwd(f.path("broker", "passwd"))
    assert set(users) == {"edgeflow-gateway", "n1", "n2", "n3"}
    assert provision.check_mosquitto_hash(pw, users["n1"]) and not provision.check_mosquitto_hash(pw, users["n2"])
    # no plaintext password outside the files meant to carry it
    for p in ("broker/passwd", "broker/acl", "broker/edgeflow.conf", "fleet.json", "gateway/gateway.toml"):
        text = open(f.path(p)).read()
        assert pw not in text and gw_pw not in text, p
    reg = json.load(open(f.path("gateway", "devices.json")))
    assert reg["version"] == 1 and set(reg["devices"]) == {"n1", "n2", "n3"}
    assert reg["devices"]["n1"]["ack_key"] == f.device_secrets("n1")["config"]["ack_key"]
    assert len(bytes.fromhex(reg["devices"]["n1"]["ack_key"])) == 32
    # both ways compatible with mosquitto_passwd (-U hashes a plaintext file in place)
    pf = tmp_path / "pw"
    pf.write_text("u1:%s\n" % pw)
    subprocess.run(["mosquitto_passwd", "-U", str(pf)], check=True, capture_output=True)
    assert provision.check_mosquitto_hash(pw, pf.read_text().strip().split(":", 1)[1])


def test_provision_cli_init_add_rotate_revoke_list(tmp_path, capsys):
    d = str(tmp_path / "fleet")
    assert provision.main(["init", d, "node-01", "--broker-host", "192.168.1.10", "--name", "pi.local"]) == 0
    f = provision.Fleet(d)
    s1 = f.device_secrets("node-01")
    assert s1["config"]["broker"]["tls"] == {"ca": "/ca.pem", "server_hostname": "pi.local"}
    assert s1["config"]["broker"]["host"] == "192.168.1.10" and s1["config"]["broker"]["port"] == 8883
    conf = open(f.path("broker", "edgeflow.conf")).read()
    assert "allow_anonymous false" in conf and "use_username_as_clientid true" in conf
    assert "password_file /etc/mosquitto/edgeflow/passwd" in conf and "persistence" not in conf
    assert provision.main(["add", d, "node-02"]) == 0
    assert provision.main(["add", d, "node-02"]) == 2  # already there: rotate is the way
    assert provision.main(["rotate", d, "node-01"]) == 0
    s2 = f.device_secrets("node-01")
    assert s2["config"]["broker"]["password"] != s1["config"]["broker"]["password"]
    assert s2["config"]["ack_key"] != s1["config"]["ack_key"]
    assert provision.main(["revoke", d, "node-02"]) == 0
    assert "node-02" not in provision.read_passwd(f.path("broker", "passwd"))
    assert "node-02" not in json.load(open(f.path("gateway", "devices.json")))["devices"]
    assert not os.path.exists(f.path("devices", "node-02.json"))
    assert provision.main(["add", d, "bad/id"]) == 2
    assert provision.main(["add", d, "edgeflow-gateway"]) == 2
    # a new broker certificate from the same CA; a new gateway password; a read-only service user
    old_pem, old_pw = open(f.path("broker", "server.pem")).read(), f.gateway_password()
    assert provision.main(["renew-server", d]) == 0 and provision.main(["rotate-gateway", d]) == 0
    assert open(f.path("broker", "server.pem")).read() != old_pem and f.gateway_password() != old_pw
    from cryptography import x509
    ca = x509.load_pem_x509_certificate(open(f.path("ca", "ca.pem"), "rb").read())
    x509.load_pem_x509_certificate(open(f.path("broker", "server.pem"), "rb").read()).verify_directly_issued_by(ca)
    assert provision.main(["add-service", d, "monitor"]) == 0
    assert "user monitor\ntopic read edgeflow/#" in open(f.path("broker", "acl")).read()
    assert stat.S_IMODE(os.stat(f.path("services", "monitor.password")).st_mode) == 0o600
    capsys.readouterr()
    assert provision.main(["list", d]) == 0
    out = capsys.readouterr().out
    assert "node-01" in out and "rotated" in out and "node-02" in out and "revoked" in out


def test_deploy_takes_the_secrets_file_and_copies_the_ca(sec, tmp_path):
    path = sec.fleet.path("devices", "n1.json")
    args = deploy.parse_args(["--secrets", path, "--wifi-ssid", "lab", "--wifi-password", "secret123"])
    cfg = deploy.build_config(args)
    deploy.validate_config(cfg)  # the firmware's own validation: TLS, user, password, ack_key
    assert cfg["broker"]["user"] == "n1" and cfg["broker"]["tls"]["ca"] == "/ca.pem"
    assert cfg["ack_key"] == sec.device_secrets("n1")["config"]["ack_key"]
    # --broker moves the device to another address without dropping its credentials
    cfg2 = deploy.build_config(deploy.parse_args(["--secrets", path, "--broker", "10.0.0.9:8883"]))
    assert cfg2["broker"]["host"] == "10.0.0.9" and cfg2["broker"]["password"] == cfg["broker"]["password"]
    extra = deploy.load_secrets(path)[1]
    plan = dict(deploy.plan_files(ROOT, "none", True, cfg, extra))
    assert plan["/ca.pem"] == open(sec.ca_file, "rb").read()
    # a secrets file others can read is refused
    loose = tmp_path / "loose.json"
    loose.write_text(open(path).read())
    os.chmod(loose, 0o644)
    with pytest.raises(deploy.DeployError):
        deploy.load_secrets(str(loose))


# ---------------------------------------------------------------- broker: who may connect


def test_anonymous_plaintext_and_wrong_password_refused(sec):
    assert Client(sec).connect() == "Not authorized"  # TLS, no credentials
    c = Client(sec, tls=False)  # plaintext to the TLS listener
    assert c.connect() != "Success"
    assert Client(sec, "n1", password="guess").connect() == "Not authorized"
    ok = Client(sec, "n1")
    assert ok.connect() == "Success"
    ok.close()


# ---------------------------------------------------------------- ACLs


def test_device_cannot_publish_as_another_device_nor_acks_nor_gateway_state(sec):
    obs = Client(sec, sec.service("test-observer", "read"))  # a trusted reader of the whole tree
    assert obs.connect() == "Success"
    obs.sub("edgeflow/#", "other/#")
    gw = Client(sec, "edgeflow-gateway")
    assert gw.connect() == "Success"
    gw.pub(TOP.gw_state, b"gw-online", retain=True)
    obs.until(TOP.gw_state, b"gw-online")
    n1 = Client(sec, "n1")
    assert n1.connect() == "Success"
    forged = [(TOP.data("n2"), b"forged-data"), (TOP.hello("n2"), b"forged-hello"),
              (TOP.state("n2"), b"forged-state"), (TOP.ack("n2"), b"forged-ack"),
              (TOP.ack("n1"), b"self-ack"), (TOP.gw_state, b"forged-gw-state"),
              ("edgeflow/d/n2/data/x", b"deeper"), ("other/topic", b"elsewhere")]
    for t, p in forged:
        n1.pub(t, p, retain=t == TOP.gw_state)
    n1.pub(TOP.data("n1"), b"control")  # allowed, and after every forged one on this connection
    got = obs.until(TOP.data("n1"), b"control")
    assert [m for m in got if m[1] != b"control"] == []
    # the gateway's credentials cannot publish as a device either
    gw.pub(TOP.data("n2"), b"gw-forged-data")
    gw.pub(TOP.gw_state, b"gw-control")
    assert [m for m in obs.until(TOP.gw_state, b"gw-control") if m[1] == b"gw-forged-data"] == []
    # the retained gateway state is still the gateway's
    n2 = Client(sec, "n2")
    assert n2.connect() == "Success"
    n2.sub(TOP.gw_state)
    assert n2.until(TOP.gw_state, b"gw-online")[-1][2] is True
    for c in (gw, n1, n2, obs):
        c.close()


def test_device_cannot_read_another_devices_acks_or_data(sec):
    gw = Client(sec, "edgeflow-gateway")
    assert gw.connect() == "Success"
    n1, n2 = Client(sec, "n1"), Client(sec, "n2")
    assert n1.connect() == "Success" and n2.connect() == "Success"
    n1.sub(TOP.ack("n2"), "edgeflow/d/+/ack", "edgeflow/#", "#", TOP.ack("n1"))
    n2.sub(TOP.ack("n2"))
    gw.pub(TOP.ack("n2"), b"ack-for-n2")
    n2.pub(TOP.data("n2"), b"data-of-n2")
    gw.pub(TOP.ack("n1"), b"ack-for-n1")  # control, after the others
    got = n1.until(TOP.ack("n1"), b"ack-for-n1")
    assert [m for m in got if m[0] not in (TOP.ack("n1"), TOP.gw_state)] == []
    assert n2.until(TOP.ack("n2"), b"ack-for-n2")  # it was published: n2 got it
    for c in (gw, n1, n2):
        c.close()


def test_nobody_takes_the_gateways_client_id_or_its_queued_messages(sec):
    gw = Client(sec, "edgeflow-gateway", client_id="edgeflow-gateway", clean=False)
    assert gw.connect() == "Success"
    gw.sub(TOP.sub_data)
    # a device's credentials with the gateway's client id, persistent session
    thief = Client(sec, "n3", client_id="edgeflow-gateway", clean=False)
    thief.c.on_message = lambda *a: None
    assert thief.connect() == "Success"
    assert thief.session_present is False  # not the gateway's session: the id is the user name
    n3 = Client(sec, "n1")
    assert n3.connect() == "Success"
    n3.pub(TOP.data("n1"), b"while-thief-connected")
    assert gw.until(TOP.data("n1"), b"while-thief-connected")
    assert not gw.disconnected.is_set()  # the gateway was not kicked off
    # gateway offline: its session queues; the thief reconnects with the id and gets nothing
    gw.pub(TOP.gw_state, b"gw-state-control", retain=True)
    gw.close()
    n3.pub(TOP.data("n1"), b"queued-for-gateway")
    thief.close()
    thief2 = Client(sec, "n3", client_id="edgeflow-gateway", clean=False)
    assert thief2.connect() == "Success"
    # a session's queued messages come at once on connect, before the retained state it subscribes to
    thief2.sub(TOP.gw_state)
    got = thief2.until(TOP.gw_state, b"gw-state-control")
    assert [m for m in got if m[1] == b"queued-for-gateway"] == []
    gw2 = Client(sec, "edgeflow-gateway", client_id="edgeflow-gateway", clean=False)
    assert gw2.connect() == "Success" and gw2.session_present is True
    assert gw2.until(TOP.data("n1"), b"queued-for-gateway")
    for c in (gw2, thief2, n3):
        c.close()


def test_revoke_and_rotate_take_effect_on_reload(tmp_path):
    b = Mosquitto(tmp_path, devices=["r1", "r2"]).start()
    try:
        old, old2 = b.credentials("r1")[1], b.credentials("r2")[1]
        live = Client(b, "r2")
        assert live.connect() == "Success"
        b.fleet.revoke("r2")
        b.fleet.rotate("r1")
        b._reload("r1")  # SIGHUP; returns once r1's new password works
        assert Client(b, "r1", password=old).connect() == "Not authorized"
        assert Client(b, "r2", password=old2).connect() == "Not authorized"
        # a revoked device that was connected is disconnected by the reload
        assert live.disconnected.wait(10)
        live.close()
    finally:
        b.stop()


# ---------------------------------------------------------------- TLS: wrong CA, wrong name


def _other_ca(tmp_path):
    other = provision.Fleet(tmp_path / "other")
    other.init("127.0.0.1", names=["localhost"])
    return other.path("ca", "ca.pem")


def _gw_cfg(sec, **mqtt_over):
    c = sec.gateway_config()
    c["mqtt"].update(mqtt_over)
    c["metrics"] = {"port": 0}
    return Config(c)


def _gw_connect(cfg):
    """The gateway's own MQTT ingest: 'connected' (CONNACK accepted) or why the TLS was refused."""
    async def go():
        ing = Ingest(cfg, Stats())
        task = asyncio.ensure_future(ing.start())
        try:
            for _ in range(500):
                if ing.connected.is_set():
                    return "connected"
                if ing.tls_failures:
                    return "refused: " + ing.last_error
                await asyncio.sleep(0.02)
            return "neither"
        finally:
            await ing.stop(offline=False)
            task.cancel()
    return asyncio.run(go())


def test_gateway_refuses_a_wrong_ca_or_name_and_an_insecure_config(sec, tmp_path):
    assert _gw_connect(_gw_cfg(sec)) == "connected"
    r = _gw_connect(_gw_cfg(sec, tls_ca=_other_ca(tmp_path)))
    assert r.startswith("refused") and "certificate verify failed" in r, r
    r = _gw_connect(_gw_cfg(sec, tls_server_name="evil.example"))
    assert r.startswith("refused") and "mismatch" in r, r
    # the name is checked even when the host is an address in the certificate
    assert tls_context(_gw_cfg(sec).mqtt).server_name == "localhost"
    for missing in ("tls_ca", "username", "password_file"):
        c = sec.gateway_config()
        c["mqtt"][missing] = ""
        with pytest.raises(ConfigError) as ei:
            Ingest(Config(c), Stats())
        assert "refusing" in str(ei.value)
    c = sec.gateway_config()
    del c["devices"]
    with pytest.raises(ConfigError):
        Ingest(Config(c), Stats())
    c["security"] = {"insecure": True}
    Ingest(Config(c), Stats())  # explicit: allowed


def test_renewed_broker_certificate_is_trusted_without_touching_clients(tmp_path):
    b = Mosquitto(tmp_path, devices=["c1"]).start()
    try:
        before = open(b.fleet.path("broker", "server.pem")).read()
        b.fleet.renew_server()
        b.stop(hold_port=True)
        b.start()
        assert open(b.fleet.path("broker", "server.pem")).read() != before
        assert _gw_connect(_gw_cfg(b)) == "connected"
        c = Client(b, "c1")
        assert c.connect() == "Success"
        c.close()
    finally:
        b.stop()


def test_gateway_password_from_env(sec, monkeypatch):
    c = sec.gateway_config()
    c["mqtt"]["password_file"] = ""
    monkeypatch.setenv("EDGEFLOW_MQTT_PASSWORD", sec.fleet.gateway_password())
    assert _gw_connect(Config(dict(c, metrics={"port": 0}))) == "connected"
    monkeypatch.setenv("EDGEFLOW_MQTT_PASSWORD", "wrong")
    assert _gw_connect(Config(dict(c, metrics={"port": 0}))) == "neither"  # refused: no CONNACK success


def test_firmware_client_refuses_a_wrong_ca_or_name(sec, tmp_path):
    """firmware/mqtt.py through the HAL's open_connection (the same code as on the ESP32)."""
    sec_n1 = sec.device_secrets("n1")
    b = sec_n1["config"]["broker"]
    other_ca = open(_other_ca(tmp_path)).read()

    async def attempt(ca_text, name):
        hal = SimHal(console=False)
        f = hal.fs.open("ca.pem", "wb")
        f.write(ca_text.encode())
        f.close()
        hal.use_tls({"ca": "/ca.pem", "server_hostname": name})
        c = MQTTClient("n1", "127.0.0.1", sec.port, user=b["user"], password=b["password"],
                       open_connection=hal.open_connection, timeout_ms=5000)
        try:
            await c.connect()
        except Exception as e:  # noqa: BLE001 - the refusal is the result
            return type(e).__name__ + ": " + str(e)
        await c.disconnect()
        return "connected"

    async def plaintext():
        c = MQTTClient("n1", "127.0.0.1", sec.port, user=b["user"], password=b["password"], timeout_ms=3000)
        try:
            await c.connect()
            return "connected"
        except Exception as e:  # noqa: BLE001
            return type(e).__name__

    ca = sec_n1["files"]["/ca.pem"]
    assert asyncio.run(attempt(ca, "localhost")) == "connected"
    r = asyncio.run(attempt(other_ca, "localhost"))
    assert "certificate verify failed" in r, r
    r = asyncio.run(attempt(ca, "evil.example"))
    assert "certificate verify failed" in r and "mismatch" in r, r
    assert asyncio.run(plaintext()) != "connected"


# ---------------------------------------------------------------- gateway hardening


def _reading(dev, t, seq=0):
    return wire.encode_readings(dev, 1, [(seq, t, 0, 0, 20000)])


def test_unprovisioned_ids_are_quarantined_and_watermark_stays_bounded(sec, tmp_path):
    now = int(time.time() * 1000)
    c = sec.gateway_config()
    c.update({"store": {"path": str(tmp_path / "gw.db")}, "metrics": {"port": 0},
              "watermark": {"out_of_orderness_ms": 0, "idle_timeout_ms": 10 ** 9}})
    gw = Gateway(c)
    gw._handle(TOP.data("n1").encode(), _reading("n1", now), now)
    wm = gw.watermarks.global_wm
    assert wm is not None and wm <= now
    # an invented device 23 h ahead, and forged offline states of the real one: refused / its own only
    gw._handle(TOP.data("ghost").encode(), _reading("ghost", now + 23 * 3600 * 1000), now)
    gw._handle(TOP.hello("ghost").encode(), b"x", now)
    assert gw.stats.quarantined.get("unprovisioned") == 2
    assert gw.watermarks.global_wm == wm and "ghost" not in gw.watermarks.devs
    # a provisioned device: never past now + max_future
    maxf = gw.max_future
    gw._handle(TOP.data("n2").encode(), _reading("n2", now + maxf + 1), now)
    assert gw.watermarks.global_wm <= now + maxf
    gw._handle(TOP.data("n2").encode(), _reading("n2", now + maxf, 1), now)
    assert gw.watermarks.global_wm <= now + maxf
    # a device provisioned while the gateway runs is taken (the devices file is reread)
    sec.add_device("late-1")
    later = now + 1500
    gw._handle(TOP.data("late-1").encode(), _reading("late-1", now), later)
    assert gw.stats.quarantined.get("unprovisioned") == 2 and "late-1" in gw.watermarks.devs


def test_secrets_never_on_a_command_line(sec, tmp_path):
    """The gateway (subprocess, as deployed) connects over TLS with its credentials; neither
    its command line nor the broker's carries a secret."""
    c = sec.gateway_config()
    lines = []
    for s, kv in dict(c, store={"path": str(tmp_path / "gw.db")}, metrics={"port": 0}).items():
        lines.append("[%s]" % s)
        lines += ["%s = %s" % (k, json.dumps(v)) for k, v in kv.items()]
    conf = tmp_path / "gw.toml"
    conf.write_text("\n".join(lines) + "\n")
    log = open(tmp_path / "gw.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(conf)], cwd=ROOT,
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "mqtt_connected" not in open(tmp_path / "gw.log").read():
            assert p.poll() is None and time.monotonic() < deadline, open(tmp_path / "gw.log").read()
            time.sleep(0.1)
        secrets = [sec.fleet.gateway_password()] + [sec.credentials(d)[1] for d in ("n1", "n2")]
        for pid in (p.pid, sec.proc.pid):
            cmd = open("/proc/%d/cmdline" % pid, "rb").read().decode(errors="replace")
            assert not any(s in cmd for s in secrets), cmd
    finally:
        p.terminate()
        p.wait(20)
        log.close()
    assert p.returncode == 0


def test_upgrade_from_the_open_broker_drops_forged_retained_messages(tmp_path):
    """A site switched from the open broker: retained messages an anonymous attacker left in
    mosquitto's persistence (a forged ack, a forged gateway state) survive the new config
    (seen with 2.0.11: check_retain_source does not stop the retained ack), so the upgrade
    procedure (docs/security.md) removes the persistence file; devices resend what is unacked."""
    old = Mosquitto(tmp_path, insecure=True).start()
    c = Client(old, tls=False)
    assert c.connect() == "Success"
    c.pub(TOP.ack("n1"), b"forged-retained-ack", retain=True)
    c.pub(TOP.gw_state, b"forged-retained-state", retain=True)
    c.close()
    old.stop()

    def first_messages(broker):
        gw = Client(broker, "edgeflow-gateway")
        assert gw.connect() == "Success"
        gw.pub(TOP.gw_state, b"real-state", retain=True)
        gw.close()
        n1 = Client(broker, "n1")
        assert n1.connect() == "Success"
        n1.sub(TOP.ack("n1"))  # a retained ack would come now, before the state below
        n1.sub(TOP.gw_state)
        got = n1.until(TOP.gw_state, b"real-state")
        n1.close()
        return [m[1] for m in got if m[1].startswith(b"forged")]

    new = Mosquitto(tmp_path, port=old.port, devices=["n1"]).start()  # same folder: same persistence
    try:
        kept = first_messages(new)
    finally:
        new.stop()
    assert kept == [b"forged-retained-ack"]  # why the procedure removes the file
    os.unlink(os.path.join(str(tmp_path), "mosquitto.db"))
    new.start()
    try:
        assert first_messages(new) == []
    finally:
        new.stop()


def test_the_raspberry_pi_snippet_runs_in_mosquitto(tmp_path):
    """fleet/broker/edgeflow.conf as installed on the Pi (conf.d snippet, files in the install
    dir) is a config mosquitto 2.0 runs: TLS only, devices log in, anonymous refused."""
    import getpass
    from tools.broker import free_port, mosquitto_bin
    port = free_port()
    f = provision.Fleet(tmp_path / "fleet")
    f.init("127.0.0.1", names=["localhost"], port=port, bind="127.0.0.1",
           install_dir=str(tmp_path / "fleet" / "broker"), devices=["p1"])
    conf = tmp_path / "mosquitto.conf"  # the stock mosquitto.conf + include_dir, in one file
    conf.write_text(("user %s\n" % getpass.getuser() if os.geteuid() == 0 else "") +
                    open(f.path("broker", "edgeflow.conf")).read())
    log = open(tmp_path / "mq.log", "wb")
    p = subprocess.Popen([mosquitto_bin(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        b = Mosquitto(tmp_path / "clients", port=port, fleet=f.root)  # client settings only: never started
        deadline = time.monotonic() + 10
        while True:
            c = Client(b, "p1")
            r = c.connect()
            if r == "Success" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r == "Success", open(tmp_path / "mq.log").read()
        c.close()
        assert Client(b).connect() == "Not authorized"
    finally:
        p.terminate()
        p.wait(10)
        log.close()
