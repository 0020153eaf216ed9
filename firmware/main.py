# Board entry point (copied to the board root as /main.py by tools/deploy.py).
# Reads /config.json, validates it (errors are printed on the serial console) and runs the app.
# Importing it as firmware.main (tests, tools) does nothing.
if __name__ != "firmware.main":
    from firmware.app import main

    main("config.json")
