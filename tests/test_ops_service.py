"""Service conventions: --version, closed pipes, bad --where, env vars, journald priorities,
sd_notify READY/WATCHDOG/STOPPING, exit status 2 on config errors (RestartPreventExitStatus),
the systemd unit's hardening, and the web view's access rules."""
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from gateway.config import Config, ConfigError
from tests.conftest import ROOT, free_port

PY = sys.executable
UNIT = os.path.join(ROOT, "deploy", "edgeflow-gateway.service")


def _cli(*args, env=None, **kw):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([PY, "-m", "gateway.cli"] + list(args), cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=e, **kw)


@pytest.mark.parametrize("cmd", [["-m", "gateway.cli"], ["tools/fleet.py"], ["tools/demo.py"], ["tools/deploy.py"],
                                 ["tools/vboard.py"], ["tools/groundtruth.py"], ["tools/bench_gateway.py"],
                                 ["tools/bench_storm.py"], ["tools/longrun_retention.py"]])
def test_version_on_every_cli(cmd):
    r = subprocess.run([PY] + cmd + ["--version"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # the gateway also says which of its modules run compiled (gateway/accel.py)
    # (each of accel.MODULES, name=compiled or name=pure (why); argparse may wrap the line)
    mod = r"\w+=(compiled|pure \([^)]*\))"
    assert re.fullmatch(r"\S+ \d+\.\d+\S* \(edgeflow wire v\d+\)(; %s(,\s%s)*)?\n" % (mod, mod),
                        r.stdout), r.stdout


def _db(tmp_path, n=3000):
    p = str(tmp_path / "gw.db")
    db = sqlite3.connect(p)
    db.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v)")
    db.execute("CREATE TABLE readings (device TEXT, boot INTEGER, seq INTEGER, t INTEGER, channel INTEGER, "
               "flags INTEGER, value INTEGER)")
    db.executemany("INSERT INTO readings VALUES ('n1', 1, ?, ?, 0, 0, ?)", [(i, 1767225600000 + i, i)
                                                                           for i in range(n)])
    db.commit()
    db.close()
    return p


def test_closed_pipe_and_bad_where_end_without_traceback(tmp_path):
    db = _db(tmp_path, 200000)
    # `export ... | head -1`: the reader goes away early
    p = subprocess.Popen([PY, "-m", "gateway.cli", "export", "readings", "--db", db], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    rc = p.wait(60)
    assert first.startswith(b"device,boot,seq")
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert rc == 141
    r = _cli("export", "readings", "--db", db, "--where", "device = 'n1' AND")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("edgeflow-gateway: bad --where \"device = 'n1' AND\": ")
    r = _cli("export", "readings", "--db", db, "--where", "nosuchcolumn = 1")
    assert r.returncode == 2 and "no such column: nosuchcolumn" in r.stderr


def test_env_config_path_and_config_error_exit_2(tmp_path):
    conf = tmp_path / "gw.toml"
    conf.write_text('[mqtt]\nport = 70000\n')
    r = _cli("run", "--check", env={"EDGEFLOW_CONFIG": str(conf)})
    assert r.returncode == 2 and "mqtt.port must be within 1..65535" in r.stderr  # read from $EDGEFLOW_CONFIG
    conf.write_text('[store]\npath = "%s"\n[web]\nport = 0\n[security]\ninsecure = true\n' % (tmp_path / "x.db"))
    r = _cli("run", "--check", env={"EDGEFLOW_CONFIG": str(conf), "EDGEFLOW_WEB_TOKEN_SHA256": "ab" * 32})
    assert r.returncode == 0 and '"token_sha256": "(set)"' in r.stdout  # secrets are not printed
    r = _cli("run", "--check", env={"EDGEFLOW_CONFIG": str(conf), "EDGEFLOW_WEB_TOKEN_SHA256": "nothex"})
    assert r.returncode == 2 and "web.token_sha256 must be 64 hex" in r.stderr


def test_web_exposed_needs_a_token():
    with pytest.raises(ConfigError, match="exposes the web view"):
        Config({"web": {"host": "0.0.0.0"}})
    Config({"web": {"host": "0.0.0.0", "token_sha256": "0" * 64}})
    Config({"web": {"host": "0.0.0.0", "port": 0}})  # disabled: nothing exposed
    with pytest.raises(ConfigError, match="go together"):
        Config({"web": {"tls_cert": "/x.pem"}})


def test_systemd_unit_conventions_and_hardening():
    u = open(UNIT).read()
    for line in ("Type=notify", "WatchdogSec=", "RestartPreventExitStatus=2", "Restart=always",
                 "Environment=EDGEFLOW_CONFIG=", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "CapabilityBoundingSet=\n", "SystemCallFilter=@system-service", "PrivateUsers=yes"):
        assert line in u, line
    sa = shutil.which("systemd-analyze")
    if sa is None:
        return  # not a systemd machine: the directives above are what it would rate
    r = subprocess.run([sa, "security", "--offline=true", UNIT], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for edgeflow-gateway.service: ([0-9.]+) (\w+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    assert float(m.group(1)) <= 2.0, m.group(0)  # 'OK' band; the unit before was 7.9 EXPOSED


@pytest.mark.broker
def test_sd_notify_watchdog_and_journal_priorities(broker, tmp_path):
    """The gateway as systemd runs it: NOTIFY_SOCKET, WATCHDOG_USEC and stderr on the journal."""
    sock_path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(sock_path)
    s.settimeout(0.5)
    log_path = tmp_path / "journal.txt"
    log = open(log_path, "wb")
    st = os.fstat(log.fileno())
    conf = broker.gateway_toml(str(tmp_path / "gw.toml"), {
        "store": {"path": str(tmp_path / "gw.db"), "synchronous": "NORMAL"}, "metrics": {"port": 0},
        "web": {"port": 0}})
    env = dict(os.environ, NOTIFY_SOCKET=sock_path, WATCHDOG_USEC="1500000", EDGEFLOW_CONFIG=str(conf),
               JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino))
    env.pop("WATCHDOG_PID", None)
    p = subprocess.Popen([PY, "-m", "gateway.cli", "run"], cwd=ROOT, stdout=log, stderr=log, env=env)
    log.close()
    got = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30 and got.count("WATCHDOG=1") < 3:
            try:
                got.append(s.recv(4096).decode())
            except socket.timeout:
                assert p.poll() is None, log_path.read_text()
        assert got[0] == "READY=1" and got.count("WATCHDOG=1") >= 3, got
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        rest = []
        while True:
            try:
                rest.append(s.recv(4096).decode())
            except socket.timeout:
                break
        assert "STOPPING=1" in rest, rest
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        s.close()
    lines = log_path.read_text().splitlines()
    assert any(ln.startswith("<6>ts=") and "event=gateway_started" in ln for ln in lines), lines
    assert all(re.match(r"<[2-7]>", ln) for ln in lines), lines


def test_web_token_cli_and_basic_auth(tmp_path):
    """web-token prints a token and its hash; an exposed web view answers 401 without it."""
    import asyncio

    from gateway.web import WebView, token_hash
    r = _cli("web-token")
    assert r.returncode == 0
    tok = re.search(r"password\): (\S+)", r.stdout).group(1)
    h = re.search(r'token_sha256 = "([0-9a-f]{64})"', r.stdout).group(1)
    assert token_hash(tok) == h and tok not in r.stdout.split("config")[1]

    from tests.test_gateway_pipeline import cfg as pcfg, open_gw
    port = free_port()

    def get(path, auth=None):
        req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path))
        if auth:
            req.add_header("Authorization", auth)
        try:
            return urllib.request.urlopen(req, timeout=5).status
        except urllib.error.HTTPError as e:
            return e.code

    async def go():
        c = pcfg(tmp_path, web={"port": port, "token_sha256": h})
        gw = await open_gw(c)
        gw.ingest.connected = asyncio.Event()
        view = await WebView(gw).start()
        try:
            import base64
            loop = asyncio.get_running_loop()
            call = lambda *a: loop.run_in_executor(None, get, *a)  # noqa: E731
            assert await call("/") == 401
            assert await call("/api/snapshot", "Bearer wrong") == 401
            assert await call("/api/snapshot", "Bearer " + tok) == 200
            basic = "Basic " + base64.b64encode(("anyone:" + tok).encode()).decode()
            assert await call("/", basic) == 200
            assert await call("/static/uPlot.iife.min.js", basic) == 200
            assert await call("/healthz") in (200, 503)  # no token needed, says only ok/failing
        finally:
            await view.stop()
            await gw.store.close()
    asyncio.run(go())


def test_web_view_over_tls_with_basic_auth(tmp_path):
    """web.tls_cert/tls_key: HTTPS; the browser's basic-auth password (the token) crosses
    the network only inside TLS. A self-signed certificate for 127.0.0.1, trusted by the client."""
    import asyncio
    import base64
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from gateway.web import WebView, token_hash
    from tests.test_gateway_pipeline import cfg as pcfg, open_gw

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeflow-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_pem, key_pem = tmp_path / "web.pem", tmp_path / "web.key"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    port = free_port()
    tok = "s3cret-token"

    def get(path, auth=None, ctx=None):
        req = urllib.request.Request("https://127.0.0.1:%d%s" % (port, path))
        if auth:
            req.add_header("Authorization", auth)
        try:
            return urllib.request.urlopen(req, timeout=5, context=ctx).status
        except urllib.error.HTTPError as e:
            return e.code

    async def go():
        gw = await open_gw(pcfg(tmp_path, web={"port": port, "host": "127.0.0.1", "token_sha256": token_hash(tok),
                                               "tls_cert": str(cert_pem), "tls_key": str(key_pem)}))
        gw.ingest.connected = asyncio.Event()
        view = await WebView(gw).start()
        try:
            assert view.url == "https://127.0.0.1:%d/" % port
            loop = asyncio.get_running_loop()
            trust = ssl.create_default_context(cafile=str(cert_pem))
            basic = "Basic " + base64.b64encode(("me:" + tok).encode()).decode()
            assert await loop.run_in_executor(None, get, "/api/snapshot", basic, trust) == 200
            assert await loop.run_in_executor(None, get, "/api/snapshot", None, trust) == 401
            with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
                await loop.run_in_executor(None, get, "/", basic, ssl.create_default_context())
        finally:
            await view.stop()
            await gw.store.close()
    asyncio.run(go())
