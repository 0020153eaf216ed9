"""The installed edgeflow version (pyproject.toml), for --version and the build_info metric."""


def version():
    try:
        from importlib.metadata import version as v
        return v("edgeflow")
    except Exception:  # noqa: BLE001 - a source tree that was never pip-installed
        return "0+unknown"


def version_line(prog):
    from shared import wire
    return "%s %s (edgeflow wire v%d)" % (prog, version(), wire.VERSION)
