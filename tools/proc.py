"""Child processes that die with their parent (mosquitto, gateways started by tools and tests).

    p = popen([...], **subprocess_kwargs)   # subprocess.Popen + die with the parent
    exit_on_sigterm()                       # SIGTERM runs finally-blocks (stops children in order)

On Linux the child asks the kernel for SIGTERM when its parent dies (prctl
PR_SET_PDEATHSIG), so even a parent killed with SIGKILL (a test timeout, an OOM kill)
leaves no broker or gateway running. The signal is tied to the thread that forked: start
children from the main thread or the asyncio loop's thread, not from a pool thread that
may exit first.
"""
import ctypes
import ctypes.util
import collections
import os
import random
import signal
import socket
import subprocess
import sys

_PR_SET_PDEATHSIG = 1
_libc = None


def _prctl():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc.prctl


def die_with_parent(parent_pid, sig=signal.SIGTERM):
    """A preexec_fn: runs in the child between fork and exec."""
    def preexec():
        if sys.platform.startswith("linux"):
            _prctl()(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
            if os.getppid() != parent_pid:  # the parent died before the prctl took effect
                os._exit(1)
    return preexec


def popen(args, **kw):
    """subprocess.Popen whose child gets SIGTERM when this process dies."""
    if sys.platform.startswith("linux") and "preexec_fn" not in kw:
        _prctl()  # load libc before forking: the preexec function must not import
        kw["preexec_fn"] = die_with_parent(os.getpid())
    return subprocess.Popen(args, **kw)


def exit_on_sigterm(code=143):
    """SIGTERM raises SystemExit in the main thread, so `finally:` blocks stop children."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, lambda *a: None)  # one orderly shutdown, not a second one
        raise SystemExit(code)
    signal.signal(signal.SIGTERM, handler)


_handed_out = collections.deque(maxlen=4096)  # ports given out lately: not given again before they are bound


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port():
    """A TCP port free on 127.0.0.1 for a server started next. Taken below the kernel's
    ephemeral range: a port from that range can become the local port of any outgoing
    connection (a NATS route between two nodes, a client) between this call and the server's
    bind, and the server then exits with 'address already in use'."""
    low = _ephemeral_low()
    if low > 11000:
        for _ in range(200):
            port = random.randrange(10000, low)
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.append(port)
            return port
    with socket.socket() as s:  # no room below the range: the kernel's choice
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _handed_out.append(port)
    return port
