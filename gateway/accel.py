"""Compiled or pure Python: which build of the gateway's hot modules runs.

The hot modules (MODULES): batch (the per-reading byte loops), windows and watermark (C classes
for the window and watermark state), datapath (the Gateway's per-message handlers, its base class),
mqttc (the MQTT packet cutter of the ingest; added by the ingest helper).

setup.py compiles each module of MODULES (gateway/<name>.py with its gateway/<name>.pxd) with
Cython into gateway/_c_<name> (a C extension beside the sources), stamped with the SHA-256 of
the .py and .pxd it was built from. The compiled module never takes the source's own name, so
it cannot shadow the .py; it is used only if its stamp equals the sources on disk now. An
edited .py (a dev checkout, a hot-fix on a Pi) therefore runs as the edited Python, with a
warning, until `pip install -e .` rebuilds it. EDGEFLOW_PURE_PYTHON=1 forces pure Python for
all of them, EDGEFLOW_PURE_PYTHON=windows,dedup for those named.

Which one runs: `edgeflow-gateway --version`, the gateway_started log line and the metric
edgeflow_gateway_build_info (field / label `accel`: "batch=compiled, datapath=compiled, ..." or
"batch=pure (why), ...").
"""
import hashlib
import importlib
import logging
import os

MODULES = ("batch", "windows", "watermark", "datapath", "mqttc")
PURE_ENV = "EDGEFLOW_PURE_PYTHON"

STATUS = {}  # name -> "compiled" or "pure (why)"


def source_digest(py_path):
    """SHA-256 hex of a module's .py and its .pxd beside it (what setup.py stamps)."""
    h = hashlib.sha256()
    for path in (py_path, py_path[:-3] + ".pxd"):
        try:
            with open(path, "rb") as f:
                h.update(f.read())
        except FileNotFoundError:
            pass
        h.update(b"\0")
    return h.hexdigest()


def load(name, package=__package__):
    """The module `name` of `package`: its compiled twin _c_<name> if built from the sources
    on disk, else the Python module. Records why in STATUS."""
    pure = importlib.import_module("%s.%s" % (package, name))
    why = None
    env = os.environ.get(PURE_ENV, "")
    if env == "1" or name in env.split(","):
        why = "pure (%s)" % PURE_ENV
    else:
        try:
            comp = importlib.import_module("%s._c_%s" % (package, name))
        except ImportError:
            why = "pure (not compiled)"
        else:
            path = pure.__file__ or ""
            if not path.endswith(".py") or getattr(comp, "SOURCE_SHA256", None) != source_digest(path):
                why = "pure (compiled module is stale: rebuild with pip install -e .)"
                logging.getLogger("edgeflow.gateway").warning(
                    "%s: %s is older than %s, running the Python source", why, comp.__file__, path)
    STATUS[name] = why or "compiled"
    return pure if why else comp


def summary():
    """'batch=compiled' or 'batch=pure (why)', for logs and --version."""
    return ", ".join("%s=%s" % kv for kv in sorted(STATUS.items()))


batch = load("batch")
windows = load("windows")
watermark = load("watermark")
datapath = load("datapath")
mqttc = load("mqttc")
