"""edgeflow-vboard: a virtual MicroPython board on a loopback TCP port.

    edgeflow-vboard --dir var/board [--port N] [--fs-limit BYTES] [--run-main]

Starts tools/vboard/server.mjs under Node: the real MicroPython 1.27 interpreter (npm
WebAssembly build) behind 127.0.0.1:N, speaking the REPL protocol mpremote uses. Prints the URL
(socket://127.0.0.1:N) to pass to mpremote or edgeflow-deploy; Ctrl-C stops it. The board's
files live in --dir on the host. Not hardware: no Wi-Fi, pins or real time (see docs/deploy.md).

From Python (tests):  with VBoard(dir) as vb: ... vb.url ...
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "tools", "vboard", "server.mjs")
PKG = os.path.join(ROOT, "node_modules", "@micropython", "micropython-webassembly-pyscript", "micropython.mjs")


class VBoardError(Exception):
    pass


def available():
    return shutil.which("node") is not None and os.path.exists(PKG)


class VBoard:
    """The virtual board as a child process; .url once started. Stop it with stop()."""

    def __init__(self, dir, port=0, fs_limit=0, run_main=False, log=False):
        self.dir = os.path.abspath(dir)
        self.port = port
        self.fs_limit = fs_limit
        self.run_main = run_main
        self.log = log
        self.proc = None
        self.url = None

    def start(self, timeout=15):
        if not available():
            raise VBoardError("node or the MicroPython npm package is missing: run `bash tools/setup.sh` (npm ci)")
        os.makedirs(self.dir, exist_ok=True)
        cmd = ["node", SERVER, "--dir", self.dir, "--port", str(self.port)]
        if self.fs_limit:
            cmd += ["--fs-limit", str(self.fs_limit)]
        if self.run_main:
            cmd.append("--run-main")
        if self.log:
            cmd.append("--log")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None if self.log else subprocess.DEVNULL,
                                     text=True)
        line = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or not line[0].startswith("socket://"):
            self.stop()
            raise VBoardError("the virtual board did not start (port %s in use?)" % self.port)
        self.url = line[0].strip()
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()


def _stop_on_signal(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    ap = argparse.ArgumentParser(prog="edgeflow-vboard", description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", action="version", version=_version_line("edgeflow-vboard"))
    ap.add_argument("--dir", required=True, help="host folder holding the board's filesystem")
    ap.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: a free one)")
    ap.add_argument("--fs-limit", type=int, default=0, help="simulated flash size in bytes (ENOSPC beyond)")
    ap.add_argument("--run-main", action="store_true", help="run /main.py after a soft reset")
    ap.add_argument("--log", action="store_true", help="log connections to stderr")
    args = ap.parse_args(argv)
    vb = VBoard(args.dir, args.port, args.fs_limit, args.run_main, args.log)
    try:
        vb.start()
    except VBoardError as e:
        print("edgeflow-vboard: %s" % e, file=sys.stderr)
        return 1
    # SIGTERM (kill, systemd, a test harness) stops the Node server too, like Ctrl-C
    signal.signal(signal.SIGTERM, _stop_on_signal)
    print(vb.url, flush=True)
    print("edgeflow-vboard: files in %s; try `mpremote connect %s exec \"print(1)\"`; Ctrl-C stops" % (vb.dir, vb.url),
          file=sys.stderr, flush=True)
    try:
        while vb.proc.poll() is None:
            time.sleep(0.5)
        print("edgeflow-vboard: the server exited (%s)" % vb.proc.returncode, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        vb.stop()



def _version_line(prog):
    from gateway.version import version_line
    return version_line(prog)


if __name__ == "__main__":
    sys.exit(main())
