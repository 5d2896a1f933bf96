"""Performance analysis: ``dshal bench`` (per-op roofline) and ``dshal profile`` (the model
core per layer and op), both writing self-contained HTML reports with JSON alongside.

- :mod:`dshal.perf.bench`   -- the bench command: its cases are the ops' own ``bench`` shape
  rows (:mod:`dshal.ops.examples`) or a YAML file of such rows, and its torch rivals;
- :mod:`dshal.perf.profile` -- the profile command;
- :mod:`dshal.perf.measure` -- what both measure with: latency statistics and clocks, device
  peaks and % of roofline, the profiler's op and layer instrumentation;
- :mod:`dshal.perf.report`  -- their shared options, HTML (inline SVG plots, tables) and JSON;
- :mod:`dshal.perf.syncs`   -- :class:`~dshal.perf.syncs.HostSyncCounter`, a check (which calls
  would make the host wait for the device), used by conformance's graph family and tests.
"""
