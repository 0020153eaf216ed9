# Freeze edgeflow into your own MicroPython image (bytecode stays in flash, not in the heap):
#   cd micropython/ports/esp32
#   make BOARD=ESP32_GENERIC FROZEN_MANIFEST=/path/to/edgeflow/tools/manifest.py
# Then remove /lib/firmware and /lib/shared from the board (files on the filesystem shadow frozen
# modules) and keep /main.py, /boot.py and /config.json (docs/firmware.md "RAM").
# Only what the board runs: no simulator (hal_sim), no self-test, no gateway-side wire decoders.
include("$(PORT_DIR)/boards/manifest.py")

package("shared", files=["__init__.py", "wire_dev.py", "wire_ctl.py", "auth.py"], base_path="..")
# (tests/test_deploy.py checks these lists against what edgeflow-deploy copies)
package("firmware", files=[
    "__init__.py", "anomaly.py", "app.py", "appboot.py", "appx.py", "backoff.py", "cep.py", "clock.py", "config.py",
    "cwindow.py", "hal.py", "hal_esp32.py", "halnet.py", "identity.py", "mqtt.py", "mqttc.py", "obfull.py", "obload.py",
    "obread.py", "outbox.py", "pconf.py", "pins.py", "pipeline.py", "prules.py", "ring.py", "safemode.py", "slots.py",
    "uplink.py", "window.py",
], base_path="..")
