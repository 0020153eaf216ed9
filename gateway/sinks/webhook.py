"""Webhook sink: one HTTP POST of JSON per outbox item (one row), the item id in the
`Idempotency-Key` header. 2xx = durably accepted (deleted from the outbox). 408, 429 and
5xx, timeouts and connection errors = retried (backoff with full jitter). Any other 4xx =
the receiver refuses this item for good: counted (edgeflow_sink_rejected), logged with the
key, deleted (retrying it forever would hold every later alert back).

Body: {"v": 1, "site", "table", "key": "<site>/<table>/<device>/<boot>/<seq>", "rows": [[...]],
"columns": [...]} so a receiver needs no schema of its own.
"""
import asyncio
import json
import time

import aiohttp

from . import tables as T


class WebhookSink:
    def __init__(self, cfg, site):
        self.cfg = cfg
        self.site = site
        self.session = None
        self.tokens = float(cfg["burst"])
        self.t_last = time.monotonic()

    async def open(self):
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg["timeout_s"]))

    async def _token(self):
        rate, burst = self.cfg["rate"], self.cfg["burst"]
        while True:
            now = time.monotonic()
            self.tokens = min(burst, self.tokens + (now - self.t_last) * rate)
            self.t_last = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / rate)

    @staticmethod
    def payload(item):
        d = json.loads(item.body)
        d["key"] = item.msg_id
        d["columns"] = list(T.TABLES[item.table][0])
        return json.dumps(d, separators=(",", ":")).encode()

    async def send(self, items):
        await self.open()
        headers = dict(self.cfg["headers"])
        headers["Content-Type"] = "application/json"
        done, rejected = [], []
        for it in items:
            await self._token()
            headers["Idempotency-Key"] = it.msg_id
            try:
                async with self.session.post(self.cfg["url"], data=self.payload(it), headers=headers) as r:
                    await r.read()
                    st = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                return done, rejected, "%s: %r" % (it.msg_id, e)
            if 200 <= st < 300:
                done.append(it)
            elif 400 <= st < 500 and st not in (408, 429):
                rejected.append(it)
            else:
                return done, rejected, "%s: HTTP %d" % (it.msg_id, st)
        return done, rejected, ""

    async def close(self):
        if self.session is not None:
            await self.session.close()
            self.session = None
