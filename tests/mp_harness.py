"""Drives the real MicroPython (npm WebAssembly build under Node) for the test suite."""
import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "tests", "mp", "run.mjs")
LOGIC_RUNNER = os.path.join(ROOT, "tests", "mp", "logic_runner.py")
PKG = os.path.join(ROOT, "node_modules", "@micropython", "micropython-webassembly-pyscript", "micropython.mjs")


def available():
    return shutil.which("node") is not None and os.path.exists(PKG)


def run_script(script, args=(), root=ROOT, heap=2 * 1024 * 1024, timeout=600):
    """Run a Python script under MicroPython with firmware/, shared/, tests/ mirrored to /lib."""
    cmd = ["node", RUNNER, "--heap", str(heap), "--root", root, script] + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def run_logic_tests(root=ROOT, modules=()):
    """Returns (results {(module, name): 'PASS'|'FAIL'|'SKIP'}, summary (p, f, s), completed process)."""
    proc = run_script(LOGIC_RUNNER, modules, root=root)
    results = {}
    summary = None
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "MP":
            results[(parts[2], parts[3])] = parts[1]
        elif parts[:1] == ["MP-SUMMARY"]:
            summary = tuple(int(x) for x in parts[1:4])
    return results, summary, proc
