# The documented example pipeline config (docs/pipeline.md): tests, tools and the self-test use
# it as firmware.pexample.example_config(); the app never loads this module (RAM).


def example_config():
    """3 channels, 60 s windows, 5 rules, 2 detectors."""
    return {
        "channels": {"temp": 0, "hum": 1, "pot": 2},
        "window": {"size_ms": 60000, "offset_ms": 0},
        "ring": {"capacity": 64},
        "rules": [
            {"id": "hot", "type": "threshold", "channel": "temp", "enter": 30, "leave": 28,
             "min_duration_ms": 5000, "severity": 2},
            {"id": "hot_then_dry", "type": "sequence", "first": {"channel": "temp", "op": ">", "value": 30},
             "then": {"channel": "hum", "op": "<", "value": 20}, "within_ms": 10000, "severity": 3},
            {"id": "pot_burst", "type": "count", "channel": "pot", "op": ">=", "value": 90, "count": 5,
             "within_ms": 2000},
            {"id": "temp_dead", "type": "absence", "channel": "temp", "within_ms": 30000, "severity": 2},
            {"id": "hum_jump", "type": "rate", "channel": "hum", "delta": 10, "within_ms": 5000},
        ],
        "anomaly": {"zscore": {"channels": ["temp"], "window": 32, "k": 4, "min_std": 0.05},
                    "ewma": {"channels": ["hum"], "alpha_shift": 4, "k": 6, "min_dev": 0.1}},
    }
