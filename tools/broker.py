"""A mosquitto process on a loopback port: for tests, the demo, the fleet simulator and benches.

    b = Mosquitto(data_dir).start()   # free port unless port= is given; b.port, b.proc
    b.stop()                          # terminate, kill after 5 s
    b.start()                         # restart on the same port (persistence kept)

Config from tools/brokerconf.py (fleet-sized queues). Started as root, mosquitto would drop
to the 'mosquitto' user and then fail to write its persistence file in data_dir: it keeps
the current user instead.
"""
import getpass
import os
import shutil
import socket
import subprocess
import time

from tools.brokerconf import render
from tools.proc import popen


def mosquitto_bin():
    for p in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if p and os.path.exists(p):
            return p
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    def __init__(self, data_dir, port=None, persistence=True, new_session=False):
        self.dir = str(data_dir)
        self.port = port or free_port()
        self.persistence = persistence
        self.new_session = new_session  # own process group: Ctrl-C in a terminal does not reach it
        self.proc = None
        self.log_path = os.path.join(self.dir, "mosquitto.log")

    def start(self, timeout=10.0):
        exe = mosquitto_bin()
        if exe is None:
            raise RuntimeError("mosquitto is not installed: run `bash tools/setup.sh` "
                               "(or `sudo apt-get install mosquitto`)")
        os.makedirs(self.dir, exist_ok=True)
        conf = os.path.join(self.dir, "mosquitto.conf")
        user = getpass.getuser() if os.geteuid() == 0 else None
        with open(conf, "w") as f:
            f.write(render(self.port, self.dir, bind="127.0.0.1", persistence=self.persistence, user=user))
        with open(self.log_path, "ab") as log:
            # dies with its parent: a test killed by a timeout leaves no broker behind
            self.proc = popen([exe, "-c", conf], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=self.new_session)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("mosquitto exited: see " + self.log_path)
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("mosquitto did not listen on %d within %.0f s" % (self.port, timeout))

    def stop(self):
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()
