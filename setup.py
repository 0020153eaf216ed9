"""Optional C build of the gateway's hot modules (gateway/accel.py, docs/benchmarks.md section 6).

Each gateway/<name>.py of accel.MODULES is compiled by Cython, with its .pxd, into the
extension gateway._c_<name>, stamped with the SHA-256 of those sources (accel.source_digest).
Without Cython or a C compiler (or with EDGEFLOW_PURE_PYTHON=1) the package installs as pure
Python and runs the same code uncompiled. Everything else is in pyproject.toml.
"""
import os
import shutil
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gateway.accel import MODULES, PURE_ENV, source_digest  # noqa: E402  (stdlib-only module)

# the stamped copies Cython compiles, as a package `gateway` so that Cython finds each module's .pxd
GEN = os.path.join("build", "accel", "gateway")


class OptionalBuildExt(build_ext):
    """A failed compile leaves the pure Python modules in use: warn, do not fail the install."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - no compiler, no Python headers
            print("edgeflow: C build skipped (%s); the gateway runs as pure Python" % e, file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print("edgeflow: %s not compiled (%s); pure Python is used" % (ext.name, e), file=sys.stderr)


def ext_modules():
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("edgeflow: Cython not installed; the gateway runs as pure Python", file=sys.stderr)
        return []
    os.makedirs(GEN, exist_ok=True)
    open(os.path.join(GEN, "__init__.py"), "a").close()
    exts = []
    for name in MODULES:
        py = os.path.join("gateway", name + ".py")
        stamp = '\nSOURCE_SHA256 = "%s"  # added by setup.py: the sources this was compiled from\n' % (
            source_digest(os.path.join(HERE, py)))
        with open(py) as f:
            text = f.read() + stamp
        gen = os.path.join(GEN, "_c_%s.py" % name)
        old = None
        if os.path.exists(gen):
            with open(gen) as f:
                old = f.read()
        if old != text:  # unchanged: no recompile
            with open(gen, "w") as f:
                f.write(text)
        pxd = os.path.join("gateway", name + ".pxd")
        if os.path.exists(pxd):  # C types for the module's loops (else compiled as plain Python)
            shutil.copyfile(pxd, os.path.join(GEN, "_c_%s.pxd" % name))
        exts.append(Extension("gateway._c_" + name, [gen]))
    try:
        return cythonize(exts, compiler_directives={"language_level": 3}, quiet=True)
    except Exception as e:  # noqa: BLE001
        print("edgeflow: Cython failed (%s); the gateway runs as pure Python" % e, file=sys.stderr)
        return []


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
