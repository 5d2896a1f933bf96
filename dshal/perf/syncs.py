"""Count the calls that would make the host wait for the device (host syncs).

On an accelerator these stall the CPU until queued work finishes and break graph capture:
reading a value (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``), ops whose output
shape depends on values (``nonzero``, boolean masking, ``unique``...), copies to the host,
and comparisons that return a Python bool. :class:`HostSyncCounter` records them at the
dispatcher and the torch-function level, so it works on CPU tensors too: it shows which
calls *would* sync on a GPU, e.g. for a plugin's code run emulated on the CPU.
"""

from __future__ import annotations

import traceback
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dshal.redact import code_path

#: aten ops that read device values on the host or size their output from them.
SYNC_ATEN_OPS = frozenset({
    "aten::_local_scalar_dense",  # .item(), int(t), float(t), bool(t)
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
    "aten::unique_dim",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::repeat_interleave",  # with a tensor of repeats and no output_size
})
#: Tensor methods that copy values to Python objects. Counted at the torch-function level:
#: on CPU tensors ``tolist`` reaches no aten op, and under ``torch.inference_mode`` neither
#: does ``.item()`` reach the dispatch mode.
SYNC_METHODS = frozenset({"tolist", "numpy", "__array__", "item", "__int__", "__float__", "__bool__", "__index__", "cpu"})


class HostSyncCounter:
    """Context manager: ``with HostSyncCounter() as syncs: ...``; then ``syncs.count``,
    ``syncs.by_op``, ``syncs.events`` (``(what, call site)`` of each, the site being the
    innermost frame outside torch) and ``syncs.where`` (a short stack for the first
    ``keep_stacks`` calls, to find them).

    ``repeat_interleave`` counts only with a tensor of repeats and no ``output_size``.
    ``exempt``: path fragments of machinery whose calls are not counted (e.g. the Triton
    interpreter, which reads values on the host where a device would not). ``dispatch=False``
    counts only the Tensor methods that copy values to Python (no dispatcher mode: torch
    cannot create some tensor subclasses under one, e.g. the lower-right causal bias SDPA
    takes for a few queries after cached keys).
    """

    def __init__(self, keep_stacks: int = 5, exempt: tuple[str, ...] = (), dispatch: bool = True) -> None:
        self.by_op: Counter[str] = Counter()
        self.where: list[str] = []
        self.events: list[tuple[str, str]] = []
        self._keep = keep_stacks
        self._exempt = exempt
        self._inside = False
        counter = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                name = func._schema.name
                kwargs = kwargs or {}
                if counter._inside:  # already counted as the Tensor method that called it
                    pass
                elif name == "aten::index" and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
                ):
                    counter._record("boolean-mask indexing")
                elif name in SYNC_ATEN_OPS and not (
                    name == "aten::repeat_interleave" and kwargs.get("output_size") is not None
                ):
                    counter._record(name)
                return func(*args, **kwargs)

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                name = getattr(func, "__name__", "")
                if name not in SYNC_METHODS or counter._inside:
                    return func(*args, **(kwargs or {}))
                counter._record(f"Tensor.{name}")
                counter._inside = True
                try:
                    return func(*args, **(kwargs or {}))
                finally:
                    counter._inside = False

        self._modes = (_Function(), _Dispatch()) if dispatch else (_Function(),)

    def _record(self, name: str) -> None:
        stack = [f for f in traceback.extract_stack() if f.filename != __file__]
        if self._exempt and any(part in f.filename for f in stack for part in self._exempt):
            return
        self.by_op[name] += 1
        frames = [f for f in stack if "/torch/" not in f.filename and "contextlib" not in f.filename]
        site = frames[-1] if frames else None
        self.events.append((name, f"{code_path(site.filename)}:{site.lineno} ({site.name})" if site else "?"))
        if len(self.where) < self._keep:
            self.where.append(
                f"{name} at " + " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in frames[-4:][::-1])
            )

    @property
    def count(self) -> int:
        return sum(self.by_op.values())

    def __enter__(self) -> HostSyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


__all__ = ["HostSyncCounter", "SYNC_ATEN_OPS", "SYNC_METHODS"]
