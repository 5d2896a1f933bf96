"""``dshal plan``: what each rank of a TP/EP job holds and moves, worked out on the meta device.

:mod:`dshal.plan.names` lists a checkpoint's tensors from its ``config.json``;
:mod:`dshal.plan.simulate` builds one rank with the real loading path and transforms
(simulated groups, meta tensors) and runs a prefill chunk and a decode step through
``dshal.ops``; :mod:`dshal.plan.plan` turns that into the per-rank report of ``dshal plan``.
Nothing here is imported by ``import dshal``.
"""
