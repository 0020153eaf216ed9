# Board boot script (copied to the board root as /boot.py): runs before main.py.
# Keep it tiny: anything that fails here leaves the board without a REPL-friendly state.
import gc

try:
    import esp

    esp.osdebug(None)  # no ROM debug output mixed into the console
except ImportError:
    pass
gc.collect()
