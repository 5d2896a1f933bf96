"""Kept as an import path only: the roofline lives in :mod:`dshal.perf.measure`.
``dshal.backends.triton_gpu`` (the GPU plugins' base) imports :func:`same_part` from here
to match a device name against its peaks table; new code imports :mod:`dshal.perf.measure`."""

from dshal.perf.measure import part_words, same_part

__all__ = ["part_words", "same_part"]
