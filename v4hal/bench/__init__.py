"""Benchmarks and the cost model (nothing here is imported by ``import v4hal``).

- ``cost`` / ``cost_cli`` (``v4hal cost``): analytic per-token FLOPs and KV-cache bytes of
  DeepSeek-V3.2, V4-Flash and V4-Pro versus context length; ``measure`` (``--measure``) times
  one ``v4-mini`` decode step, hybrid attention vs a dense-attention control.
- ``cli`` (``v4hal bench``): every op on every available backend, verified against the
  reference, then timed against the device's ceilings (``ceilings``) and the peers present
  (``peers``); cases in ``cases`` (views of the catalogue ``v4hal.cases``), the loop in
  ``runner``, timers in ``timing``, output in ``report``.
- ``gpu_check`` (``python -m v4hal.bench.gpu_check``): the one GPU script: every GPU kernel checked
  at V4 shapes and timed next to baselines, with its performance targets.
"""
