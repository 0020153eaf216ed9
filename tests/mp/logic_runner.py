# MicroPython side of the dual-runtime harness: imports every firmware/shared
# module (CPython-only constructs fail here) and runs every test_* function in
# tests/logic/test_*.py. Prints one 'MP PASS|FAIL|SKIP module name' line each
# and a closing 'MP-SUMMARY passed failed skipped'. Run by tests/test_micropython.py.
import sys
import os
import gc

# Modules that import hardware-only modules (machine, network, dht) and so are
# imported only on a board; everything else must import here.
DEVICE_ONLY = ("firmware.hal_esp32", "main", "boot")
# CPython-only stand-ins (MicroPython has what they replace)
HOST_ONLY = ("firmware.cpyticks",)

passed = 0
failed = 0
skipped = 0


def walk(pkg_dir, pkg):
    out = []
    for name in sorted(os.listdir(pkg_dir)):
        full = pkg_dir + "/" + name
        if os.stat(full)[0] & 0x4000:
            if name != "__pycache__":
                out.extend(walk(full, pkg + "." + name))
        elif name.endswith(".py") and name != "__init__.py":
            out.append(pkg + "." + name[:-3])
    return out


def load(modname):
    mod = __import__(modname)
    for part in modname.split(".")[1:]:
        mod = getattr(mod, part)
    return mod


only = sys.argv[1:]  # optional module-name filters

for top in ("shared", "firmware"):
    for m in walk("/lib/" + top, top):
        if m in DEVICE_ONLY or m in HOST_ONLY:
            continue
        try:
            load(m)
            passed += 1
            print("MP PASS import", m)
        except Exception as e:
            failed += 1
            print("MP FAIL import", m)
            sys.print_exception(e)

for m in walk("/lib/tests/logic", "tests.logic"):
    short = m.split(".")[-1]
    if not short.startswith("test_"):
        continue
    if only and short not in only:
        continue
    try:
        mod = load(m)
    except Exception as e:
        failed += 1
        print("MP FAIL", short, "<import>")
        sys.print_exception(e)
        continue
    skip = getattr(mod, "MP_SKIP", ())
    for name in sorted(dir(mod)):
        if not name.startswith("test_"):
            continue
        fn = getattr(mod, name)
        if not callable(fn):
            continue
        if name in skip:
            skipped += 1
            print("MP SKIP", short, name)
            continue
        try:
            fn()
            passed += 1
            print("MP PASS", short, name)
        except Exception as e:
            failed += 1
            print("MP FAIL", short, name)
            sys.print_exception(e)
        gc.collect()

print("MP-SUMMARY", passed, failed, skipped)
