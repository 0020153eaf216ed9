"""Downstream exactly-once under faults, short variant of tools/sinkfaults.py (the full run is a
script): two sites with simulated fleets -> 3-node NATS JetStream cluster (replicas 3) -> the
collector, and an alert webhook failing half the time. kill -9 a NATS node, a gateway and the
collector at random (seeded) moments, cut one site's link to NATS; then every record, window
revision and alert must be present exactly once centrally (per site) and at the webhook."""
import pytest

from tools import sinkfaults

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.mark.timeout(240)
def test_two_sites_nats_cluster_collector_webhook_exactly_once_under_faults(tmp_path):
    res = sinkfaults.run(tmp_path / "run", duration=16.0, cut_s=5.0, devices=3, sample_ms=100, seed=5)
    print(sinkfaults.report(res))
    assert res["nats_kills"] == 1 and res["collector_kills"] == 1 and sum(res["gateway_kills"]) == 1
    assert sum(res["link_cuts"]) == 1
    for sid, s in res["sites"].items():
        assert s["groundtruth_ok"], s["groundtruth"]
        for table, v in s["tables"].items():
            assert (v["missing"], v["extra"], v["differ"], v["duplicated"]) == (0, 0, 0, 0), (sid, table, v)
        assert s["tables"]["readings"]["site"] > 500 and s["tables"]["window_revisions"]["site"] > 20
        assert s["alerts"] > 0 and s["webhook_missing"] == 0 and s["webhook_extra"] == 0
        assert s["outbox_left"] == 0
    assert res["webhook"]["failed_on_purpose"] > 0 and res["webhook"]["no_key"] == 0
    assert res["ok"], sinkfaults.report(res)
