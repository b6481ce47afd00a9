"""The engine's load figures (``EngineStats``: KV-cache usage, running and waiting requests,
preemptions, queue times), collected by a vLLM stat logger.

vLLM hands its per-step statistics only to stat loggers, classes it instantiates itself, so the
collector is a class built around the ``EngineStats`` object it fills (``stat_logger_factory``),
defined once vLLM can be imported. It runs in the API process, on ``AsyncLLM``'s output handler.
"""

from __future__ import annotations

from nla_serve.types import EngineStats


def stat_logger_factory(stats: EngineStats) -> type:
    """A vLLM stat logger class (runs in this process, on AsyncLLM's output handler) that keeps
    ``stats`` current: KV-cache usage, running/waiting counts, per-request queue times."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Collector(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                stats.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
                stats.num_running = int(scheduler_stats.num_running_reqs)
                stats.num_waiting = int(scheduler_stats.num_waiting_reqs)
                stats.prefix_cache_hits += int(getattr(scheduler_stats.prefix_cache_stats, "hits", 0) or 0)
            if iteration_stats is not None:
                stats.preemptions += iteration_stats.num_preempted_reqs
                stats.preemptions_unexported += iteration_stats.num_preempted_reqs
                if len(stats.queue_times) < 10_000:
                    stats.queue_times.extend(r.queued_time for r in iteration_stats.finished_requests)

        def log_engine_initialized(self):
            pass

    return _Collector
