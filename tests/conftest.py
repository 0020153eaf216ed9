import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Figures other tests report for the closing summary (MicroPython counts, mpy-cross).
REPORT = {}


def pytest_terminal_summary(terminalreporter):
    for line in REPORT.values():
        terminalreporter.write_line(line)


def pytest_unconfigure(config):
    """A test that leaves a non-daemon thread (an unclosed aiosqlite connection) would hang
    the interpreter at exit and CI until its time limit: name the leak and exit now."""
    import threading
    left = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if left:
        sys.stderr.write("conftest: threads left running by tests: %s; exiting without waiting\n" % left)
        sys.stderr.flush()
        sys.stdout.flush()
        status = getattr(config, "_edgeflow_status", 1)
        os._exit(status if status else 3)


def pytest_sessionfinish(session, exitstatus):
    session.config._edgeflow_status = int(exitstatus)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_bin():
    for p in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if p and os.path.exists(p):
            return p
    return None


class Broker:
    """A real mosquitto on a free loopback port, stopped by the fixture that started it."""

    def __init__(self, tmpdir, port=None):
        self.port = port or free_port()
        self.dir = str(tmpdir)
        self.proc = None

    def start(self):
        conf = os.path.join(self.dir, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(broker_config(self.port, self.dir))
        self.log = open(os.path.join(self.dir, "mosquitto.log"), "ab")
        self.proc = subprocess.Popen([mosquitto_bin(), "-c", conf], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("mosquitto exited: see " + self.log.name)
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not listen on %d" % self.port)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def broker_config(port, data_dir):
    import getpass
    from tools.brokerconf import render
    return render(port, data_dir, bind="127.0.0.1", user=getpass.getuser())


@pytest.fixture
def broker(tmp_path):
    if not mosquitto_bin():
        pytest.fail("mosquitto is not installed: run the README's set-up command")
    b = Broker(tmp_path).start()
    yield b
    b.stop()
