"""Documented commands run as written in a fresh shell (no activated venv), and the demo's
status line fits the terminal and counts like with like."""
import glob
import os
import re
import sqlite3
import subprocess

import pytest

from tests.conftest import ROOT

BARE = re.compile(r"^(python3?|pytest|mpremote|pip|edgeflow-[a-z]+|esptool\.py)\b")
NOTE = ". .venv/bin/activate"


def _shell_lines(path):
    """Command lines of the ```sh blocks (continuations joined)."""
    out, cur, inside = [], "", False
    for ln in open(path, encoding="utf-8"):
        s = ln.rstrip("\n")
        if s.startswith("```"):
            inside = s.strip() in ("```sh", "```bash", "```shell")
            continue
        if not inside:
            continue
        s = s.strip()
        if cur:
            s = cur + " " + s
        if s.endswith("\\"):
            cur = s[:-1].strip()
            continue
        cur = ""
        if s and not s.startswith("#"):
            out.append(s)
    return out


def test_readme_commands_need_no_activated_venv():
    bad = [ln for ln in _shell_lines(os.path.join(ROOT, "README.md")) if BARE.match(ln)]
    assert bad == [], "README commands that fail in a fresh shell: %s" % bad


def test_docs_with_bare_commands_say_to_activate():
    for path in glob.glob(os.path.join(ROOT, "docs", "*.md")) + [os.path.join(ROOT, "wokwi", "README.md")]:
        text = open(path, encoding="utf-8").read()
        bare = [ln for ln in _shell_lines(path) if BARE.match(ln)]
        inline = re.findall(r"`((?:python3? |mpremote |edgeflow-[a-z]+ )[^`]*)`", text)
        if bare or inline:
            assert NOTE in text, "%s uses venv commands (%s) without saying to activate it" % (
                os.path.relpath(path, ROOT), (bare + inline)[:3])


def test_readme_venv_executables_run():
    """Every .venv/bin/X the README uses (and setup.sh installs) exists and answers --help."""
    exes = set()
    for ln in _shell_lines(os.path.join(ROOT, "README.md")):
        exes |= set(re.findall(r"\.venv/bin/([A-Za-z0-9_.-]+)", ln))
    exes.discard("esptool.py")  # installed by the README's own `.venv/bin/pip install esptool` step
    assert {"python", "edgeflow-demo", "edgeflow-gateway", "mpremote"} <= exes, exes
    for x in sorted(exes):
        path = os.path.join(ROOT, ".venv", "bin", x)
        if not os.path.exists(path):
            pytest.fail("README uses .venv/bin/%s but tools/setup.sh does not install it" % x)
        r = subprocess.run([path, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")})  # a fresh shell
        assert r.returncode == 0, (x, r.stderr[-500:])


class _Fleet:
    def stats(self):
        return {"devices": 200, "online": 187, "stored": 1234567, "unacked": 4321, "sent": 0, "replayed": 0,
                "cep": 0, "anomalies": 0, "errors": 0}


class _Site:
    def __init__(self, db):
        self.db = db
        self.broker = None

    def gateway_alive(self):
        return True


def test_demo_status_line_fits_and_counts_committed_records(tmp_path):
    from tools.demo import Status
    db = str(tmp_path / "gw.db")
    c = sqlite3.connect(db)
    c.executescript("CREATE TABLE devices (device TEXT, received INTEGER); CREATE TABLE meta (k, v);"
                    "CREATE TABLE cep_events (x); CREATE TABLE anomalies (x); CREATE TABLE late (x);"
                    "CREATE TABLE readings (x);")
    # committed = every record the gateway accepted (all kinds), like the devices' "stored"
    c.executemany("INSERT INTO devices VALUES (?, ?)", [("a", 1000), ("b", 234)])
    c.executemany("INSERT INTO readings VALUES (?)", [(1,)] * 10)
    c.commit()
    c.close()
    st = Status(_Fleet(), _Site(db), 0.0, out=open(os.devnull, "w"))
    full = st.line()
    assert "stored 1234567" in full and "committed 1234" in full and "unacked 4321" in full
    assert "online 187/200" in full and "broker DOWN" in full
    for width in (30, 60, 80, 120):
        ln = st.line(width)
        assert len(ln) <= width and ln and full.startswith(ln), (width, ln)
