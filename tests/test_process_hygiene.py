"""Children die with their parent: SIGTERM to `edgeflow-fleet --spawn` stops the mosquitto and
the gateway it started, and a parent killed with SIGKILL (a test killed by its timeout) leaves
nothing running."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.broker


def procs_with(marker):
    """pids whose command line mentions marker (a unique work dir)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open("/proc/%s/stat" % pid) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            out.append((int(pid), cmd))
    return out


def wait_for(cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    return cond()


def kill_all(marker):
    for pid, _ in procs_with(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_fleet_spawn_children_die_with_it(tmp_path, sig):
    d = str(tmp_path / ("fleet-%d" % sig))
    fleet = subprocess.Popen([sys.executable, "-m", "tools.fleet", "--spawn", "--dir", d, "--devices", "2",
                              "--duration", "120", "--no-check"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        def kids():
            k = [(pid, c) for pid, c in procs_with(d) if pid != fleet.pid]
            names = " ".join(c for _, c in k)
            return k if "mosquitto" in names and "gateway.cli" in names else None
        assert wait_for(kids, 60), procs_with(d)
        fleet.send_signal(sig)
        fleet.wait(30)
        left = wait_for(lambda: not procs_with(d), 20) or procs_with(d)
        assert left is True, "left running after %s: %s" % (signal.Signals(sig).name, left)
    finally:
        if fleet.poll() is None:
            fleet.kill()
            fleet.wait()
        kill_all(d)


def test_killed_test_process_leaves_no_broker_or_gateway(tmp_path):
    """A stand-in for a test killed by a timeout: it started a broker and a gateway the usual
    way (tools.broker, tools.proc.popen), then gets SIGKILL."""
    d = str(tmp_path / "killed")
    os.makedirs(d)
    script = textwrap.dedent("""
        import sys, time
        sys.path.insert(0, %r)
        from tools.broker import Mosquitto
        from tools.proc import popen
        b = Mosquitto(%r).start()
        g = popen([sys.executable, "-m", "gateway.cli", "run", "--insecure", "--broker", "127.0.0.1:%%d" %% b.port,
                   "--db", %r, "--metrics-port", "0"], cwd=%r)
        print("started", flush=True)
        time.sleep(600)
    """ % (ROOT, d, os.path.join(d, "gw.db"), ROOT))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "started"
        assert wait_for(lambda: len([p for p, _ in procs_with(d) if p != parent.pid]) >= 2, 30), procs_with(d)
        parent.kill()
        parent.wait(10)
        left = wait_for(lambda: not procs_with(d), 20) or procs_with(d)
        assert left is True, "left running: %s" % left
    finally:
        if parent.poll() is None:
            parent.kill()
        kill_all(d)


def test_free_ports_lie_below_the_ephemeral_range_and_are_not_given_twice():
    """A server's port taken from the ephemeral range can become the local port of an
    outgoing connection (a NATS route between two nodes) before the server binds it: a
    3-node cluster once failed to start with 'address already in use' that way."""
    from tools import proc
    ports = [proc.free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    if proc._ephemeral_low() > 11000:
        assert max(ports) < proc._ephemeral_low()
