"""A mosquitto process on a loopback port: for tests, the demo, the fleet simulator and benches.

    b = Mosquitto(data_dir, devices=["n1"]).start()  # free port unless port= is given; b.port, b.proc
    b.stop()                          # terminate, kill after 5 s
    b.stop(hold_port=True); b.start() # restart on the same port (persistence kept), the port held meanwhile

Secure by default, like a real site: a fleet is provisioned into data_dir/fleet
(tools/provision.py: CA, server certificate for localhost/127.0.0.1, password file, ACL) and
the listener speaks only TLS to known users. Clients get their settings from the launcher:
    b.paho(client, user)           TLS + credentials on a paho client (default: the gateway)
    b.gateway_config()             {"mqtt": {...}, "devices": {...}} for the gateway config
    b.device_secrets(dev)          {"config": {device_id, ack_key, broker: {..., tls}}, "files": {"/ca.pem": PEM}}
    b.add_device(dev)              provision one more device and reload the broker
    b.device_config(dev, hal)      config keys of a device (provisioned if new; CA put on hal.fs)
insecure=True gives the old anonymous plaintext listener (only for tests of that set-up).

Config from tools/brokerconf.py (fleet-sized queues). Started as root, mosquitto would drop
to the 'mosquitto' user and then fail to write its persistence file in data_dir: it keeps
the current user instead.
"""
import getpass
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time

from tools.brokerconf import render
from tools.provision import Fleet, security_paths
from tools.proc import free_port, popen  # noqa: F401 (free_port: re-exported to tests and tools)


def mosquitto_bin():
    for p in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if p and os.path.exists(p):
            return p
    return None


def listens(pid, port):
    """True if process pid has a TCP socket listening on port, None if /proc cannot tell (not
    Linux). A connection alone cannot tell: while a restarted broker is down, another process
    can take its port, and then mosquitto exits (address in use) but the port answers."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    try:
        inodes = set()
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue  # closed meanwhile
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        rows = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            if os.path.exists(table):
                with open(table) as f:
                    rows += f.read().splitlines()[1:]
    except OSError:  # the process is gone (its exit code tells why)
        return False
    for row in rows:
        f = row.split()  # sl local_address rem_address st ... inode (10th)
        if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
            return True
    return False


class Mosquitto:
    def __init__(self, data_dir, port=None, persistence=True, new_session=False, insecure=False, devices=(),
                 fleet=None, prefix="edgeflow"):
        self.dir = str(data_dir)
        self.port = port or free_port()
        self.persistence = persistence
        self.new_session = new_session  # own process group: Ctrl-C in a terminal does not reach it
        self.proc = None
        self._hold = None  # the port kept bound between stop(hold_port=True) and start()
        self.log_path = os.path.join(self.dir, "mosquitto.log")
        self.insecure = insecure
        self.fleet = None
        if not insecure:
            self.fleet = Fleet(fleet or os.path.join(self.dir, "fleet"))
            if os.path.exists(self.fleet.state_path):
                known = set(self.fleet.devices())
                new = [d for d in devices if d not in known]
                if new:
                    self.fleet.add_many(new)
            else:
                self.fleet.init("127.0.0.1", names=["localhost"], port=self.port, prefix=prefix, devices=devices)

    def start(self, timeout=10.0):
        exe = mosquitto_bin()
        if exe is None:
            raise RuntimeError("mosquitto is not installed: run `bash tools/setup.sh` "
                               "(or `sudo apt-get install mosquitto`)")
        os.makedirs(self.dir, exist_ok=True)
        conf = os.path.join(self.dir, "mosquitto.conf")
        user = getpass.getuser() if os.geteuid() == 0 else None
        with open(conf, "w") as f:
            f.write(render(self.port, self.dir, bind="127.0.0.1", persistence=self.persistence, user=user,
                           security=None if self.insecure else security_paths(self.fleet.path("broker"))))
        with open(self.log_path, "ab") as log:
            # dies with its parent: a test killed by a timeout leaves no broker behind
            self.proc = popen([exe, "-c", conf], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=self.new_session)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._release()
                raise RuntimeError("mosquitto exited: %s (see %s)" % (self._log_tail(), self.log_path))
            mine = listens(self.proc.pid, self.port)
            if mine is None:  # no /proc: a connection tells that someone listens
                try:
                    socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                    mine = True
                except OSError:
                    pass
            if mine:
                self._release()
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("mosquitto did not listen on %d within %.0f s: %s" % (self.port, timeout, self._log_tail()))

    def _log_tail(self, n=3):
        try:
            with open(self.log_path, errors="replace") as f:
                return " | ".join(line.strip() for line in f.readlines()[-n:])
        except OSError as e:
            return str(e)

    def stop(self, hold_port=False):
        """hold_port: keep the port bound (SO_REUSEADDR, not listening) until start() has
        mosquitto listening again, so no other process on the machine takes it meanwhile."""
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._release()
        if hold_port:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # mosquitto sets it too: it can still bind
            try:
                s.bind(("127.0.0.1", self.port))
                self._hold = s
            except OSError:
                s.close()

    def _release(self):
        s, self._hold = self._hold, None
        if s is not None:
            s.close()

    # ---- client settings (secure mode)

    @property
    def ca_file(self):
        return self.fleet.path("ca", "ca.pem")

    def tls_context(self, ca_file=None):
        ctx = ssl.create_default_context(cafile=ca_file or self.ca_file)
        return ctx

    def credentials(self, user=None):
        """(user, password) of a device, a service user, or the gateway when user is None."""
        st = self.fleet.load()
        if user is None or user == st["gateway_user"]:
            return st["gateway_user"], self.fleet.gateway_password()
        if user in st.get("services", {}):
            return user, self.fleet.service_password(user)
        return user, self.fleet.device_secrets(user)["config"]["broker"]["password"]

    def service(self, user, access="readwrite"):
        """A trusted non-device user (a test relay, an observer) on the whole topic tree."""
        if user not in self.fleet.load().get("services", {}):
            self.fleet.add_service(user, access)
            self._reload(user)
        return user

    def paho(self, client, user=None, password=None):
        """Configure a paho client for this broker (TLS with the fleet CA, name 'localhost'
        checked against 127.0.0.1's certificate, the user's credentials). Returns host, port."""
        if self.insecure:
            return "127.0.0.1", self.port
        u, pw = self.credentials(user)
        client.username_pw_set(u, pw if password is None else password)
        client.tls_set_context(self.tls_context())
        return "127.0.0.1", self.port

    def gateway_config(self):
        """Config sections for a gateway using this broker."""
        if self.insecure:
            return {"mqtt": {"host": "127.0.0.1", "port": self.port}, "security": {"insecure": True}}
        st = self.fleet.load()
        return {"mqtt": {"host": "127.0.0.1", "port": self.port, "username": st["gateway_user"],
                         "client_id": st["gateway_user"],
                         "password_file": self.fleet.path("gateway", "mqtt_password"),
                         "tls_ca": self.fleet.path("gateway", "ca.pem"), "tls_server_name": "localhost"},
                "devices": {"file": self.fleet.path("gateway", "devices.json")}}

    def gateway_toml(self, path, sections=None, raw=""):
        """Write a gateway TOML config for this broker: gateway_config() plus sections
        ({section: {key: value}}), then raw TOML text (e.g. [[windows.groups]])."""
        import json
        sec = self.gateway_config()
        for s, kv in (sections or {}).items():
            sec.setdefault(s, {}).update(kv)
        lines = []
        for s, kv in sec.items():
            lines.append("[%s]" % s)
            lines += ["%s = %s" % (k, json.dumps(v)) for k, v in kv.items()]
            lines.append("")
        with open(path, "w") as f:
            f.write("\n".join(lines) + raw)
        return path

    def device_secrets(self, dev):
        """{"config": {...}, "files": {"/ca.pem": PEM}} as edgeflow-deploy --secrets takes it."""
        return self.fleet.device_secrets(dev)

    def device_config(self, dev, hal=None):
        """The config keys a device needs for this broker (credentials, tls, ack_key), the device
        provisioned first if needed; with hal, the CA file is written to its flash (hal.fs)."""
        if self.insecure:
            return {"device_id": dev, "insecure": True, "broker": {"host": "127.0.0.1", "port": self.port}}
        self.add_devices([dev])
        sec = self.device_secrets(dev)
        for path, text in sec.get("files", {}).items() if hal is not None else ():
            f = hal.fs.open(path.lstrip("/"), "wb")
            f.write(text.encode())
            f.close()
        return sec["config"]

    def add_device(self, dev, timeout=10.0):
        """Provision dev and make the running broker reload its password file (SIGHUP)."""
        self.add_devices([dev], timeout)
        return self.device_secrets(dev)

    def add_devices(self, devs, timeout=10.0):
        """Provision the devices not provisioned yet; one broker reload for all of them."""
        known = set(self.fleet.devices())
        new = [d for d in devs if d not in known]
        if new:
            self.fleet.add_many(new)
            self._reload(new[-1], timeout)

    def _reload(self, user, timeout=10.0):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)
            self.wait_login(user, timeout)

    def wait_login(self, user, timeout=10.0):
        """Wait until the broker accepts user's credentials (after a reload)."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        deadline = time.time() + timeout
        while True:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user)
            self.paho(c, user)
            try:
                c.connect("127.0.0.1", self.port, 5)
                c.loop_start()
                for _ in range(100):
                    if c.is_connected():
                        break
                    time.sleep(0.02)
                ok = c.is_connected()
            except OSError:
                ok = False
            finally:
                c.disconnect()
                c.loop_stop()
            if ok:
                return
            if time.time() > deadline:
                raise RuntimeError("broker did not accept %s within %.0f s" % (user, timeout))
            time.sleep(0.1)

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()
