import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Figures other tests report for the closing summary (MicroPython counts, mpy-cross).
REPORT = {}


def pytest_terminal_summary(terminalreporter):
    for line in REPORT.values():
        terminalreporter.write_line(line)


def pytest_unconfigure(config):
    """A test that leaves a non-daemon thread (an unclosed store.Database) would hang
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


from tools.broker import Mosquitto, free_port, mosquitto_bin  # noqa: E402,F401 (re-exported to tests)


class Broker(Mosquitto):
    """A real mosquitto on a free loopback port, stopped by the fixture that started it.
    Secure like a site (TLS, passwords, ACLs: tools/broker.py) unless insecure=True."""

    def __init__(self, tmpdir, port=None, insecure=False):
        Mosquitto.__init__(self, tmpdir, port, insecure=insecure)


@pytest.fixture
def broker(tmp_path):
    if not mosquitto_bin():
        pytest.fail("mosquitto is not installed: run the README's set-up command")
    b = Broker(tmp_path).start()
    yield b
    b.stop()


@pytest.fixture
def open_broker(tmp_path):
    """Anonymous plaintext mosquitto: only for MQTT protocol mechanics with free topic names
    and client ids (tests/test_mqtt_client.py); everything else uses `broker`."""
    if not mosquitto_bin():
        pytest.fail("mosquitto is not installed: run the README's set-up command")
    b = Broker(tmp_path, insecure=True).start()
    yield b
    b.stop()
