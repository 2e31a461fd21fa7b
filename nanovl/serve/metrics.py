"""The server's Prometheus metrics, exposed with prometheus_client.

- One `CollectorRegistry` per app, never the global one: a process may build many apps (the tests do),
  and each reports only its own scheduler and store.
- A custom collector, read at scrape time: the scheduler and the embedding store keep their own counts
  (`Scheduler.stats`, `EmbedStore.hits` / `misses`), so nothing is counted twice; the server adds what
  only it sees, the errors it answered and the time to first token of each request.
- The time to first token is a summary (`_sum` and `_count`), counted once per request, when its first
  delta reaches the server.
- /metrics answers `generate_latest` (the Prometheus text format) with the content type that goes with it.
"""

from __future__ import annotations

import weakref

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from nanovl.engine.embed_store import EmbedStore
from nanovl.engine.scheduler import Request as EngineRequest
from nanovl.engine.scheduler import Scheduler

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the text format generate_latest writes


class Metrics:
    """The counts of one server, collected into its own registry."""

    def __init__(self, sched: Scheduler, store: EmbedStore | None):
        self.sched, self.store = sched, store
        self.errors, self.ttft_sum, self.ttft_count = 0, 0.0, 0
        self.noted = weakref.WeakSet()  # requests whose time to first token is counted
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def count_error(self):
        self.errors += 1

    def note_first_token(self, er: EngineRequest):
        """Count a request's time to first token once, when its first delta reaches us."""
        if er.first_token_at is not None and er not in self.noted:
            self.noted.add(er)
            self.ttft_sum += er.first_token_at - er.submitted
            self.ttft_count += 1

    def collect(self):
        s, store = self.sched.stats, self.store
        counters = [
            ("nanovl_requests_total", "chat requests admitted", s["requests"]),
            ("nanovl_prompt_tokens_total", "prompt tokens prefilled", s["prompt_tokens"]),
            ("nanovl_generated_tokens_total", "tokens generated", s["generated_tokens"]),
            ("nanovl_cancelled_total", "requests cancelled (client gone, timeout)", s["cancelled"]),
            ("nanovl_errors_total", "requests answered with an error", self.errors),
        ]
        for name, help_, value in counters:
            yield CounterMetricFamily(name, help_, value=value)
        yield GaugeMetricFamily("nanovl_queue_depth", "requests waiting for a slot", value=self.sched.queue_depth)
        yield GaugeMetricFamily("nanovl_running", "requests holding a slot", value=self.sched.running)
        yield SummaryMetricFamily("nanovl_time_to_first_token_seconds", "times to first token",
                                  count_value=self.ttft_count, sum_value=self.ttft_sum)  # fmt: skip
        store_counts = [
            ("nanovl_embed_store_hits_total", "images served from the embedding store", store.hits if store else 0),
            ("nanovl_embed_store_misses_total", "images encoded by the vision encoder", store.misses if store else 0),
        ]
        for name, help_, value in store_counts:
            yield CounterMetricFamily(name, help_, value=value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
