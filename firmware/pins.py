# ESP32 DevKit pin map: the one place the firmware's ESP32 HAL and wokwi/diagram.json agree on.
# tests check the Wokwi diagram against this table.
DHT22_DATA = 15  # DHT22 temperature/humidity, single-wire data
POT_ADC = 34  # potentiometer wiper on ADC1 channel 6 (input-only pin, 11 dB attenuation)
BUTTON = 4  # pushbutton to GND, internal pull-up
STATUS_LED = 2  # status LED (also the DevKit's on-board LED)
# (tests/test_wokwi.py names them: no table here, its names would be qstrs on the board)
