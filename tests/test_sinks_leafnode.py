"""WAN store-and-forward through a site's NATS leaf node (docs/scale-out.md): the gateway's
jetstream sink publishes to the leaf node's own JetStream (domain site-a); the hub's stream
sources it across the leaf link; the collector reads the hub. With the WAN link cut
(LinkProxy between leaf and hub), the site's outbox still empties (the leaf stores), and when
the link is back the collector gets every row exactly once. Real nats-servers, loopback."""
import asyncio
import sqlite3

from nats.js import api

from gateway import collector as C
from tests.test_sinks import checkpoint, open_set, readings, stop_collector, until
from tools.natscluster import LinkProxy, NatsCluster


def test_leaf_node_stores_while_the_wan_link_is_cut(tmp_path):
    hub = NatsCluster(tmp_path / "hub", 1, leafnodes=True, domain="hub").start()
    px = LinkProxy(hub.leaf_ports)
    leaf = NatsCluster(tmp_path / "leaf", 1, domain="site-a", leaf_remotes=px.ports).start()
    central = str(tmp_path / "central.db")

    async def main():
        import nats
        hc = await nats.connect(hub.urls[0])
        hjs = hc.jetstream()
        # the hub stream: no subjects of its own, it sources the site stream over the leaf link
        await hjs.add_stream(api.StreamConfig(
            name="EDGEFLOW_SINK", retention=api.RetentionPolicy.WORK_QUEUE, storage=api.StorageType.FILE,
            duplicate_window=600, sources=[api.StreamSource(name="EDGEFLOW_SITE",
                                                            external=api.ExternalStream(api="$JS.site-a.API"))]))
        store, s = await open_set(tmp_path, [{"name": "c", "type": "jetstream", "servers": leaf.urls,
                                              "stream": "EDGEFLOW_SITE", "retention": "limits",
                                              "max_age_s": 7 * 86400.0, "tables": ["readings"], "batch": 10,
                                              "retry_base_s": 0.05, "retry_max_s": 0.5}], site="site-a")
        s.start()
        coll = C.Collector(C.load_config(None, {"nats.servers": hub.urls, "store.path": central,
                                                "nats.create_stream": False}))
        ct = asyncio.ensure_future(coll.run())
        w = s.workers[0]
        try:
            await checkpoint(store, s, [("readings", readings("d1", 1, 0, 30))])
            assert await until(lambda: w.rows == 0 and coll.rows_new == 30)
            px.down()
            await asyncio.sleep(0.5)
            await checkpoint(store, s, [("readings", readings("d1", 1, 30, 50))])
            assert await until(lambda: w.rows == 0)  # the leaf node acked: stored on site
            await asyncio.sleep(1.0)
            assert coll.rows_new == 30  # nothing crossed the cut link
            px.up()
            assert await until(lambda: coll.rows_new == 80, 600), coll.rows_new
        finally:
            await stop_collector(ct, coll)
            await s.stop()
            await store.close()
            await hc.close()
    try:
        asyncio.run(main())
    finally:
        leaf.stop()
        px.close()
        hub.stop()
    db = sqlite3.connect(central)
    assert db.execute("SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM readings WHERE site = 'site-a'"
                      ).fetchone() == (80, 80, 0, 79)
