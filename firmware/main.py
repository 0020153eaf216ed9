# Board entry point (copied to the board root as /main.py by tools/deploy.py).
# Safe mode first (firmware/safemode.py: /safemode flag file or the button held at boot): then
# the app does not start and the watchdog stays off. Otherwise reads /config.json, validates it
# (errors are printed on the serial console) and runs the app.
# Importing it as firmware.main (tests, tools) does nothing.
if __name__ != "firmware.main":
    from firmware import safemode

    _why = safemode.reason()
    if _why:
        print("edgeflow: safe mode (%s): app not started, watchdog off; remove /safemode or release "
              "the button, then reset" % _why)
    else:
        del safemode
        from firmware.app import main, unload

        unload("firmware.safemode")  # RAM: checked once
        main("config.json")
