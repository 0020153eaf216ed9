# Safe mode: main.py does not start the app (and so never arms the watchdog) when the flag
# file /safemode exists (tools/deploy.py writes it for the time of a deploy; --safe-mode leaves
# it) or the button (firmware/pins.py BUTTON, to GND) is held at boot. The REPL stays free for
# mpremote; remove the flag (or release the button) and reset to run the app again.



def reason():
    """Why the app must not start ('flag file /safemode', 'button held') or None."""
    import os
    try:
        os.stat("safemode")  # the module's name: no qstr of its own (RAM)
        return "flag file /safemode"
    except OSError:
        pass
    try:
        import machine
    except ImportError:
        return None
    from firmware import pins
    if machine.Pin(pins.BUTTON, machine.Pin.IN, machine.Pin.PULL_UP).value() == 0:
        return "button held"
    return None
