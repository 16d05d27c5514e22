"""The runner's Prometheus metrics (module-level; ``sdcache serve`` exposes them on its ``/metrics``).

========================================================= ===============================================
``sdcache_runner_model_load_seconds{tier}``               histogram: one observation per model file a
                                                          request needed, by the tier that served it:
                                                          ``cluster``, ``store`` or ``disk`` (loaded into
                                                          host RAM, :mod:`.model_cache`), ``ram`` (already
                                                          there), ``device`` (a base model or ControlNet
                                                          already built on the device, :mod:`.runner`)
``sdcache_runner_lora_switch_seconds``                    histogram of LoRA set changes on a base model
                                                          (:class:`.lora.LoraPatcher`)
``sdcache_runner_denoise_seconds``                        histogram of pipeline calls (text encoding,
                                                          denoising loop, VAE decode)

The queue's metrics (``sdcache_runner_queue_*``) live in :mod:`sdcache.serving.metrics`.
========================================================= ===============================================
"""

from __future__ import annotations

from sdcache import metrics

TIERS = ("device", "ram", "cluster", "store", "disk")
#: From a RAM hit (well under a millisecond) to a cold multi-GB checkpoint from a slow store.
LOAD_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

MODEL_LOAD_SECONDS = metrics.histogram(
    "sdcache_runner_model_load_seconds", "Seconds to bring a model file a request needs into use, by tier.",
    ["tier"], buckets=LOAD_BUCKETS)
LORA_SWITCH_SECONDS = metrics.histogram(
    "sdcache_runner_lora_switch_seconds", "Seconds to switch the LoRA set applied to a base model.",
    buckets=STEP_BUCKETS)
DENOISE_SECONDS = metrics.histogram(
    "sdcache_runner_denoise_seconds", "Seconds per pipeline call: text encoding, denoising loop, VAE decode.",
    buckets=STEP_BUCKETS)

#: Children bound once, one per tier.
LOAD_SECONDS_BY_TIER = {t: MODEL_LOAD_SECONDS.labels(t) for t in TIERS}
