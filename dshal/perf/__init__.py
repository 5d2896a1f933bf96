"""Performance analysis: ``dshal bench`` (per-op roofline) and ``dshal profile`` (the model
core per layer and op), both writing self-contained HTML reports with JSON alongside.

- :mod:`dshal.perf.timing`     -- latency statistics, clocks (``perf_counter_ns`` / backend timer), repeats;
- :mod:`dshal.perf.roofline`   -- device peaks (declared or measured once) and % of roofline;
- :mod:`dshal.perf.cases`      -- bench cases: per-op input builders and torch rivals, ``ci``/``full``/YAML shapes;
- :mod:`dshal.perf.instrument` -- the profiler: op timing through ``dshal.runtime.op_hook``, layer hooks;
- :mod:`dshal.perf.report`     -- HTML (inline SVG plots, tables) and JSON writers;
- :mod:`dshal.perf.common`     -- options both commands share;
- :mod:`dshal.perf.bench`, :mod:`dshal.perf.profile` -- the two commands.
"""
