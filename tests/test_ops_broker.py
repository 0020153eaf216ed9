"""The Raspberry Pi broker set-up next to Debian's stock mosquitto config: a real mosquitto
started from the stock /etc/mosquitto/mosquitto.conf layout (main file + include_dir
conf.d) rebuilt in a temp dir, with the edgeflow snippet in conf.d."""
import getpass
import inspect
import os
import socket
import subprocess
import time

import pytest

from tests.conftest import free_port, mosquitto_bin
from tools import brokerconf

# Debian's /etc/mosquitto/mosquitto.conf (mosquitto 2.0.11-1.2+deb12u1), used if this machine has none
STOCK = """\
# Place your local configuration in /etc/mosquitto/conf.d/
#
# A full description of the configuration file is at
# /usr/share/doc/mosquitto/examples/mosquitto.conf.example

pid_file /run/mosquitto/mosquitto.pid

persistence true
persistence_location /var/lib/mosquitto/

log_dest file /var/log/mosquitto/mosquitto.log

include_dir /etc/mosquitto/conf.d
"""


def _stock_layout(tmp_path, snippet):
    """The stock main file with its paths moved into tmp_path; snippet goes to conf.d."""
    src = "/etc/mosquitto/mosquitto.conf"
    text = open(src).read() if os.path.exists(src) else STOCK
    for a, b in (("/run/mosquitto/", "run/"), ("/var/lib/mosquitto/", "lib/"), ("/var/log/mosquitto/", "log/"),
                 ("/etc/mosquitto/conf.d", "conf.d")):
        text = text.replace(a, str(tmp_path / b) + ("/" if b.endswith("/") else ""))
    for d in ("run", "lib", "log", "conf.d"):
        (tmp_path / d).mkdir()
    (tmp_path / "mosquitto.conf").write_text(text)
    (tmp_path / "conf.d" / "edgeflow.conf").write_text(snippet)
    if os.geteuid() == 0:  # as root mosquitto drops to user 'mosquitto', which cannot write tmp_path
        (tmp_path / "conf.d" / "zz-test-user.conf").write_text("user %s\n" % getpass.getuser())
    return str(tmp_path / "mosquitto.conf")


def _start(conf, port, timeout=10):
    p = subprocess.Popen([mosquitto_bin(), "-c", conf], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if p.poll() is not None:
            return p, p.stdout.read().decode()
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return p, None
        except OSError:
            time.sleep(0.05)
    p.kill()
    p.wait()
    raise AssertionError("mosquitto neither listened nor exited")


def test_full_broker_config_in_conf_d_clashes_with_the_stock_file(tmp_path):
    """The bug the conf.d snippet avoids: the standalone config repeats persistence_location."""
    if not mosquitto_bin():
        pytest.fail("mosquitto is not installed")
    port = free_port()
    conf = _stock_layout(tmp_path, brokerconf.render(port, str(tmp_path / "lib")))
    p, out = _start(conf, port)
    if out is None:
        p.terminate()
        p.wait()
    assert out is not None and "Duplicate persistence_location" in out, out


@pytest.mark.skipif("conf_d" not in inspect.signature(brokerconf.render).parameters,
                    reason="needs brokerconf.render(conf_d=...) from the security branch")
def test_conf_d_snippet_starts_next_to_the_stock_file(tmp_path):
    if not mosquitto_bin():
        pytest.fail("mosquitto is not installed")
    # on the Pi: every interface (the devices are on the LAN); the snippet says `listener 1883`
    assert brokerconf.render(1883, bind="", conf_d=True).splitlines()[1] == "listener 1883"
    port = free_port()
    conf = _stock_layout(tmp_path, brokerconf.render(port, bind="127.0.0.1", conf_d=True))  # tests: loopback only
    p, out = _start(conf, port)
    try:
        assert out is None, out
        import paho.mqtt.client as mqtt
        got = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="stock-probe")
        c.on_connect = lambda *a: got.append(a[3])
        c.connect("127.0.0.1", port)
        c.loop_start()
        t0 = time.monotonic()
        while not got and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        c.loop_stop()
        c.disconnect()
        assert got, "no CONNACK"
    finally:
        p.terminate()
        p.wait(10)
    # the stock file's persistence settings are the ones in force
    assert (tmp_path / "lib").is_dir()
