"""The short variant of tools/fuzz_gateway.py: hostile messages among real devices; the full
run (100,000 messages) is the script."""
import asyncio

from tools import fuzz_gateway


def test_fuzz_short():
    res = asyncio.run(fuzz_gateway.run(12000, seed=3))
    assert res["hostile"] > 8000 and res["bad_whole_messages"] > 4000
    assert res["crashes"] == 0, res["examples"]
    assert res["oracle_mismatches"] == 0, res["examples"]
    assert res["lost"] == res["duplicated"] == res["wrong_values"] == 0
    assert res["quarantined_by_reason"].get("too_many_devices")  # the device cap was reached
    assert res["rss_growth_kb_after_warmup"] < 64 * 1024, res
    assert res["ok"]


class _WrongOracle(fuzz_gateway.Oracle):
    """An oracle that misses one check (data in another device's name): the comparison must notice."""

    def _data(self, p, dev, now):
        reason, per = fuzz_gateway.Oracle._data(self, p, dev, now)
        return (None, {}) if reason == "spoofed_device_id" else (reason, per)


def test_fuzz_comparison_catches_a_wrong_verdict():
    res = asyncio.run(fuzz_gateway.run(4000, seed=3, oracle_cls=_WrongOracle))
    assert res["oracle_mismatches"] > 0 and not res["ok"]
