"""edgeflow-deploy against the virtual board (real MicroPython 1.27 + real mpremote), and units."""
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading

import pytest

from tests.conftest import ROOT
from tools import deploy, vboard

pytestmark = pytest.mark.skipif(not vboard.available(), reason="node / npm MicroPython missing: run tools/setup.sh")

CFG = ["--device-id", "node-7", "--wifi-ssid", "lab", "--wifi-password", "secret123",
       "--broker", "10.0.0.2:1883", "--set", "insecure=true", "--sample-ms", "500"]


def mpremote(url, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "mpremote", "connect", url] + list(args),
                          capture_output=True, text=True, timeout=timeout)


def snapshot(d):
    out = {}
    for dirpath, _, names in os.walk(d):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    d = tmp_path_factory.mktemp("board")
    vb = vboard.VBoard(str(d)).start()
    yield vb
    vb.stop()


@pytest.fixture(scope="module")
def deployed(board):
    out = io.StringIO()
    res = deploy.run(["--port", board.url, "--selftest"] + CFG, out=out)
    return res, out.getvalue()


# ---------------------------------------------------------------- end to end


def test_deploy_copies_compiles_and_verifies(board, deployed):
    res, text = deployed
    assert res.verified and res.reset
    assert "/lib/shared/wire.mpy" in res.copied and "/config.json" in res.copied
    assert not res.unchanged
    files = snapshot(board.dir)
    assert "lib/shared/wire.mpy" in files and "lib/firmware/selftest.mpy" in files
    assert not any(f.endswith(".py") and f.startswith("lib/") for f in files)  # compiled, not source
    with open(os.path.join(board.dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["device_id"] == "node-7" and cfg["broker"] == {"host": "10.0.0.2", "port": 1883}
    assert cfg["sample_ms"] == 500
    with open(os.path.join(board.dir, "lib", "shared", "wire.mpy"), "rb") as f:
        assert f.read(2) == b"M\x06"  # an .mpy v6 file
    assert "verified (sha256)" in text


def test_firmware_logic_imports_and_selftest_passes_on_the_board(board, deployed):
    # every pure-logic firmware module imports on the board (the .mpy files just deployed)
    logic = []
    for name in sorted(os.listdir(os.path.join(ROOT, "firmware"))):
        if not name.endswith(".py") or name in ("main.py", "boot.py", "__init__.py") or "firmware/" + name in deploy.HOST_ONLY:
            continue
        with open(os.path.join(ROOT, "firmware", name)) as f:
            src = f.read()
        if not re.search(r"^\s*(import|from)\s+(machine|network|ntptime|dht|esp32|esp)\b", src, re.M):
            logic.append("firmware." + name[:-3])
    code = "import shared.wire\n" + "".join("import %s\n" % m for m in logic) + "print('imported', %d)" % len(logic)
    p = mpremote(board.url, "exec", code)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "imported %d" % len(logic) in p.stdout
    p = mpremote(board.url, "exec", "import firmware.selftest as t\nt.run()")
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"selftest: (\d+) passed, (\d+) failed", p.stdout)
    assert m, p.stdout
    assert int(m.group(1)) > 0 and int(m.group(2)) == 0, p.stdout
    # the same file sent as source with `mpremote run`
    p = mpremote(board.url, "run", os.path.join(ROOT, "firmware", "selftest.py"))
    m = re.search(r"selftest: (\d+) passed, (\d+) failed", p.stdout)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) == 0, p.stdout + p.stderr


def test_second_deploy_copies_nothing(board, deployed):
    deploy.run(["--port", board.url, "--selftest"] + CFG, out=io.StringIO())  # in sync even if the tree moved meanwhile
    before = snapshot(board.dir)
    out = io.StringIO()
    res = deploy.run(["--port", board.url, "--selftest"] + CFG, out=out)
    assert res.copied == [] and res.removed == []
    assert len(res.unchanged) >= len(deployed[0].copied)
    assert "0 copied, 0 removed" in out.getvalue()
    assert snapshot(board.dir) == before


def test_changed_config_copies_only_config_and_stale_files_go(board, deployed):
    deploy.run(["--port", board.url] + CFG, out=io.StringIO())
    stale = os.path.join(board.dir, "lib", "firmware", "gone.py")
    p = mpremote(board.url, "exec", "f=open('/lib/firmware/gone.py','w'); f.write('x=1'); f.close()")
    assert p.returncode == 0 and os.path.exists(stale)
    changed = [("750" if a == "500" else a) for a in CFG]  # another --sample-ms
    res = deploy.run(["--port", board.url] + changed, out=io.StringIO())
    assert res.copied == ["/config.json"]
    assert res.removed == ["/lib/firmware/gone.py"]
    assert not os.path.exists(stale)
    deploy.run(["--port", board.url] + CFG, out=io.StringIO())  # back to the module's config


def test_dry_run_writes_nothing(board, deployed):
    before = snapshot(board.dir)
    out = io.StringIO()
    res = deploy.run(["--port", board.url, "--dry-run", "--force"] + CFG, out=out)
    assert res.dry_run and len(res.copied) > 5
    assert "would copy /lib/shared/wire_dev.mpy" in out.getvalue()
    assert snapshot(board.dir) == before


def test_list_shows_files_with_hashes(board, deployed):
    out = io.StringIO()
    res = deploy.run(["--port", board.url, "--list"], out=out)
    with open(os.path.join(board.dir, "config.json"), "rb") as f:
        h = hashlib.sha256(f.read()).hexdigest()
    assert res.listing["/config.json"][1] == h
    assert "/lib/shared/wire_dev.mpy" in out.getvalue()
    assert "/dev" not in out.getvalue()


def test_bad_config_is_refused_before_any_copy(board, deployed, capsys):
    before = snapshot(board.dir)
    bad = list(CFG)
    bad[1] = "bad/id"
    assert deploy.main(["--port", board.url, "--force"] + bad) == deploy.EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device_id" in err[0]
    assert snapshot(board.dir) == before


def test_errno_numbers_are_linux_on_the_virtual_board(board):
    code = ("import os, errno\n"
            "def e(f, *a):\n"
            " try:\n  f(*a)\n except OSError as x:\n  return x.errno\n"
            "os.mkdir('/t1')\n"
            "print(e(os.stat, '/nope'), e(os.mkdir, '/t1'), e(os.listdir, '/config.json'),"
            " e(open, '/t1', 'w'), errno.ENOENT)\n"
            "f=open('/t1/x','w'); f.close()\n"
            "print(e(os.rmdir, '/t1'))\n"
            "os.remove('/t1/x'); os.rmdir('/t1')\n")
    p = mpremote(board.url, "exec", code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["2", "17", "20", "21", "2", "39"]
    p = mpremote(board.url, "fs", "rm", ":nope")
    assert p.returncode != 0 and "No such file" in p.stdout + p.stderr
    assert not os.path.exists(os.path.join(board.dir, "t1"))


def test_full_filesystem_is_a_clear_error(tmp_path):
    with vboard.VBoard(str(tmp_path / "small"), fs_limit=6000) as vb:
        out = io.StringIO()
        with pytest.raises(deploy.DeployError) as ei:
            deploy.run(["--port", vb.url, "--py"] + CFG, out=out)
        assert ei.value.code == deploy.EXIT_FULL
        assert "filesystem full" in str(ei.value)
        # and the ENOSPC (28) itself, as a board reports it
        p = mpremote(vb.url, "exec", "f=open('/big','wb')\ntry:\n f.write(bytes(7000))\nexcept OSError as e:\n print('errno', e.errno)")
        assert "errno 28" in p.stdout


# ---------------------------------------------------------------- units


def test_diff_compares_hashes_and_finds_stale_files():
    plan = [("/lib/shared/wire.mpy", b"abc"), ("/main.py", b"print(1)"), ("/config.json", b"{}")]
    remote = {
        "/lib/shared/wire.mpy": (3, hashlib.sha256(b"abc").hexdigest()),
        "/main.py": (8, hashlib.sha256(b"print(2)").hexdigest()),
        "/lib/shared/old.py": (5, "00"),
        "/data/keep.bin": (5, "00"),
    }
    copy, unchanged, remove = deploy.diff(plan, remote)
    assert copy == ["/main.py", "/config.json"]
    assert unchanged == ["/lib/shared/wire.mpy"]
    assert remove == ["/lib/shared/old.py"]  # only under the managed folders


def test_plan_places_files_and_compiles_for_xtensawin():
    plan = dict(deploy.plan_files(ROOT, "xtensawin", False, {"device_id": "a"}))
    assert "/lib/shared/wire_dev.mpy" in plan and "/lib/firmware/pins.mpy" in plan
    assert plan["/lib/shared/wire_dev.mpy"][:2] == b"M\x06"
    # only what the board runs: no simulator, no gateway-side decoders, selftest on request
    assert "/lib/firmware/hal_sim.mpy" not in plan and "/lib/shared/wire.mpy" not in plan
    assert "/lib/firmware/selftest.mpy" not in plan
    st = dict(deploy.plan_files(ROOT, "xtensawin", False, None, selftest=True))
    assert "/lib/firmware/selftest.mpy" in st and "/lib/shared/wire.mpy" in st and "/lib/firmware/hal_sim.mpy" not in st
    assert json.loads(plan["/config.json"]) == {"device_id": "a"}
    if os.path.exists(os.path.join(ROOT, "firmware", "main.py")):
        assert "/main.py" in plan and "/lib/firmware/main.mpy" not in plan
    src = dict(deploy.plan_files(ROOT, "xtensawin", True, None))
    assert "/lib/shared/wire_dev.py" in src and "/config.json" not in src


def test_freeze_manifest_lists_what_the_deploy_copies():
    # tools/manifest.py (frozen modules for a self-built image) must freeze exactly the library
    # files the deploy copies to the board: a module missing there fails at import on the board
    frozen = set()

    def package(name, files, base_path=None):
        frozen.update("/lib/%s/%s" % (name, f) for f in files)

    with open(os.path.join(ROOT, "tools", "manifest.py")) as f:
        exec(f.read(), {"include": lambda *a, **k: None, "package": package})
    copied = {p for p, _ in deploy.plan_files(ROOT, "xtensawin", True, None) if p.startswith("/lib/")}
    assert frozen == copied, (sorted(copied - frozen), sorted(frozen - copied))


def test_config_from_flags_and_file(tmp_path):
    cfg = deploy.build_config(deploy.parse_args(CFG + ["--prefix", "site/a", "--set", "status_every_s=30",
                                                       "--set", "broker.keepalive_s=60"]))
    assert cfg == {"device_id": "node-7", "wifi": {"ssid": "lab", "password": "secret123"},
                   "broker": {"host": "10.0.0.2", "port": 1883, "keepalive_s": 60}, "sample_ms": 500,
                   "prefix": "site/a", "status_every_s": 30, "insecure": True}
    deploy.validate_config(cfg)
    f = tmp_path / "c.json"
    f.write_text(json.dumps(dict(cfg, device_id="from-file")))
    cfg2 = deploy.build_config(deploy.parse_args(["--config", str(f), "--sample-ms", "250"]))
    assert cfg2["device_id"] == "from-file" and cfg2["sample_ms"] == 250
    for bad in (["--broker", "host:notaport"], ["--config", str(tmp_path / "missing.json")]):
        with pytest.raises(deploy.DeployError) as ei:
            deploy.build_config(deploy.parse_args(bad))
        assert ei.value.code == deploy.EXIT_CONFIG
    for key, val in (("device_id", ""), ("sample_ms", 0), ("broker", {"host": "", "port": 1883})):
        with pytest.raises(deploy.DeployError):
            deploy.validate_config(dict(cfg, **{key: val}))
            deploy._basic_config_check(dict(cfg, **{key: val}))  # the stand-in refuses them too
        with pytest.raises(deploy.DeployError):
            deploy._basic_config_check(dict(cfg, **{key: val}))


def test_missing_port_is_a_clear_error(capsys):
    assert deploy.main(CFG) == deploy.EXIT_PORT
    assert "--port" in capsys.readouterr().err
    assert deploy.main(["--port", "/dev/ttyNOPE0"] + CFG) == deploy.EXIT_PORT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/dev/ttyNOPE0 not found" in err[0]


def test_nothing_listening_is_a_clear_error(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert deploy.main(["--port", "socket://127.0.0.1:%d" % port] + CFG) == deploy.EXIT_PORT
    assert "nothing listens" in capsys.readouterr().err


def test_board_not_answering_is_a_clear_error(capsys):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    conns = []
    stop = threading.Event()

    def accept():  # accepts and reads, never answers: a port with no REPL behind it
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                conns.append(c)
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        url = "socket://127.0.0.1:%d" % srv.getsockname()[1]
        assert deploy.main(["--port", url, "--timeout", "1"] + CFG) == deploy.EXIT_BOARD
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "does not answer" in err[0]
    finally:
        stop.set()
        t.join(2)
        for c in conns:
            c.close()
        srv.close()


def test_deploy_uses_safe_mode_and_clears_it(board, deployed):
    # the flag is written for the time of the copy and removed before the reset
    assert "safemode" not in snapshot(board.dir)
    deploy.run(["--port", board.url, "--safe-mode", "--no-reset"] + CFG, out=io.StringIO())
    assert "safemode" in snapshot(board.dir)
    deploy.run(["--port", board.url, "--no-reset"] + CFG, out=io.StringIO())
    assert "safemode" not in snapshot(board.dir)


def test_safe_mode_reason_flag_and_button(tmp_path, monkeypatch):
    import types
    from firmware import safemode
    monkeypatch.chdir(tmp_path)
    pin = types.SimpleNamespace(v=1)

    class Pin:
        IN = 1
        PULL_UP = 1

        def __init__(self, *a):
            pass

        def value(self):
            return pin.v

    monkeypatch.setitem(sys.modules, "machine", types.SimpleNamespace(Pin=Pin))
    assert safemode.reason() is None
    pin.v = 0  # held: the pin is pulled to GND
    assert safemode.reason() == "button held"
    pin.v = 1
    (tmp_path / "safemode").write_text("deploy")
    assert safemode.reason() == "flag file /safemode"
