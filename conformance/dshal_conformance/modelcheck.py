"""The model core under observation: one engine for the ``model`` family and ``dshal diff``.

- :func:`suite_checkpoint` -- the fixed tiny DeepSeek-V3 checkpoint the suite generates
  from a seed (no download; the same tensors on every machine);
- :func:`reference_runtime` -- the float64 oracle: the cpu backend's runtime with every
  op overridden to the op's reference implementation (``ops: {op: reference}``), used
  with a float64 model;
- :func:`trace` -- one forward pass with hooks at every op call (through
  :func:`dshal.runtime.op_hook`) and at every top-level layer (``embed``, ``layers.N``,
  ``norm``, ``lm_head``); outputs (and, for ``dshal diff``, inputs) are kept as CPU copies;
- :func:`rel_drift` / :func:`token_agreement` -- the model-level metrics.

The model core itself has no ``if tracing:``: hooks come and go around it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dshal.config import GEMM_MODES, REFERENCE_PROVIDER, PrecisionConfig, load_config
from dshal.model import DictReader, build_model, tiny_args
from dshal.model.checkpoint import random_checkpoint
from dshal.ops.catalogue import SPECS
from dshal.perf.measure import layer_modules
from dshal.runtime import build_runtime, op_hook

#: Seed of the suite's tiny checkpoint and prompt: fixed, so every report judges the same model.
CHECKPOINT_SEED = 20251205
#: Weight scale of the suite's checkpoint: large enough that logits have clear top-1 margins.
CHECKPOINT_STD = 0.05
#: Tokens of the prompt, and greedy steps compared, per tier.
PROMPT_LEN = {"ci": 6, "full": 16}
STEPS = {"ci": 4, "full": 16}
#: Label of the high-precision mode (the model's own dtype; ``bf16`` in older configs).
HIGH = "high"


# ------------------------------------------------------------------ the model under test
def suite_args(tier: str = "ci") -> Any:
    """ModelArgs of the suite's checkpoint: ``tiny_args()`` (3 layers: 1 dense, 2 MoE) for
    ci; 6 layers for full (more depth for drift to compound over)."""
    return tiny_args() if tier == "ci" else tiny_args(num_hidden_layers=6)


def suite_checkpoint(args: Any, seed: int = CHECKPOINT_SEED) -> dict[str, torch.Tensor]:
    """The fixed tiny checkpoint (official tensor names, float32), generated from ``seed``."""
    return random_checkpoint(args, seed, CHECKPOINT_STD)


def suite_prompt(args: Any, length: int, seed: int = CHECKPOINT_SEED) -> torch.Tensor:
    """``[1, length]`` token ids drawn from ``seed``."""
    return torch.randint(0, args.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed + 1))


def gemm_value(mode: str) -> str:
    """The ``precision.gemm`` config value of a mode label (``high`` is spelled ``bf16``
    where the config does not know ``high``)."""
    if mode == HIGH and HIGH not in GEMM_MODES:
        return "bf16"
    return mode


def mode_labels() -> list[str]:
    """Every precision mode the config accepts, as labels: ``high`` once (``bf16`` is its
    alias), without ``auto`` (it means the checkpoint's own format, which is high here)."""
    out = [HIGH]
    out += [m for m in GEMM_MODES if m not in ("auto", "bf16", HIGH)]
    return out


#: What a backend must serve itself for a mode to count as declared.
MODE_OPS = {"fp8": ("quantize_fp8", "fp8_gemm"), "int8": ("quantize_int8", "int8_gemm")}


def mode_unsupported(mode: str, runtime: Any, provided: frozenset[str]) -> str | None:
    """Why ``runtime``'s backend does not declare ``mode`` (None when it does)."""
    family = "fp8" if mode.startswith("fp8") else ("int8" if mode.startswith("int8") else None)
    if family is None:
        return None
    if family == "fp8" and not runtime.backend.fp8_formats():
        return f"backend {runtime.backend.name!r} declares no FP8 format"
    if family == "fp8" and not runtime.backend.capabilities().fp8_storage:
        return f"backend {runtime.backend.name!r} cannot hold float8 tensors on its device (fp8_storage False)"
    missing = [op for op in MODE_OPS[family] if op not in provided]
    if missing:
        return f"backend {runtime.backend.name!r} does not provide {', '.join(missing)} ({mode} needs them)"
    return None


def precision_for(mode: str, runtime: Any) -> Any:
    """The precision config of ``mode`` with the backend's native E4M3 spelled out, so the
    float64 reference quantizes weights to the same FP8 format as the backend."""
    return PrecisionConfig(gemm=gemm_value(mode), fp8_format=runtime.backend.native_e4m3())


# ------------------------------------------------------------------ runtimes
def reference_runtime() -> Any:
    """The float64 oracle's runtime: the cpu backend with every op overridden to its
    reference implementation (``ops: {op: reference}``), input checks included."""
    return build_runtime(load_config({"backend": "cpu", "ops": dict.fromkeys(SPECS, REFERENCE_PROVIDER)}))


def with_reference_stand_ins(runtime: Any, provided: frozenset[str]) -> tuple[Any, tuple[str, ...]]:
    """``runtime`` and no stand-ins when its backend provides every op; else a runtime of
    the same backend and config in which each op it does not provide is served by the op's
    reference (``ops: {op: reference}``), and those ops' names. A partial plugin (a few
    native ops) thereby gets its ops judged inside the model; reports name the stand-ins."""
    missing = tuple(op for op, spec in SPECS.items() if op not in provided and spec.has_reference)
    if not missing:
        return runtime, ()
    config = dataclasses.replace(runtime.config, ops={**runtime.config.ops, **dict.fromkeys(missing, REFERENCE_PROVIDER)})
    return build_runtime(config), missing


def backend_runtime(name: str, emulate: bool | None = None, config: Any = None, source: str = "<keyword arguments>") -> Any:
    """``name``'s runtime as a user gets it (``fallback: warn``: a missing op is served by
    the reference and shows in the providers); not activated. ``source``: what messages say
    chose the backend (a command's flag)."""
    overrides: dict[str, Any] = {"backend": name}
    if emulate is not None:
        overrides["emulate"] = emulate
    return build_runtime(load_config(config, overrides_source=source, **overrides))


def build(runtime: Any, args: Any, checkpoint: dict[str, torch.Tensor], precision: Any, dtype: torch.dtype | None = None) -> Any:
    """The model core on ``runtime`` (activated) from ``checkpoint``, in ``precision``."""
    runtime.activate()
    if dtype is not None:
        args = dataclasses.replace(args, dtype=dtype)
    return build_model(args, DictReader(checkpoint, path=f"<suite checkpoint seed={CHECKPOINT_SEED}>"), precision, runtime.device)


# ------------------------------------------------------------------ tracing
@dataclass
class OpCall:
    """One op call seen during a traced forward pass."""

    index: int
    layer: str
    op: str
    #: n-th call of ``op`` inside ``layer`` (0-based): the key two traces are matched on.
    nth: int
    outputs: tuple[torch.Tensor, ...]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.layer, self.op, self.nth)

    @property
    def label(self) -> str:
        return f"{self.layer}: {self.op}#{self.nth}"


@dataclass
class Trace:
    """What one traced forward pass saw: each layer's output and every op call, in order."""

    layers: dict[str, torch.Tensor]
    calls: list[OpCall]
    logits: torch.Tensor

    def by_key(self) -> dict[tuple[str, str, int], OpCall]:
        return {c.key: c for c in self.calls}


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def output_tensors(value: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(value, torch.Tensor):
        return (value.detach().to("cpu", copy=True),)
    if isinstance(value, (tuple, list)):
        return tuple(t for v in value for t in output_tensors(v))
    return ()


def layer_output(out: Any) -> torch.Tensor:
    """The hidden state a Block hands on: its ``(x, residual)`` pair is the stream
    ``x + residual`` (what the next layer's fused norm adds up)."""
    x, residual = out
    return (x.detach().to("cpu", torch.float64) + residual.detach().to("cpu", torch.float64))


#: ``route(key, args, out) -> out``: sees each ``moe_gate`` call's inputs and output in a
#: traced pass and may hand the model another routing (:class:`RouterTies`).
RouteHook = Callable[[tuple[str, str, int], tuple[Any, ...], Any], Any]


@dataclass
class _Tracer:
    keep_inputs: bool | frozenset[str]
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: list[OpCall] = field(default_factory=list)
    stack: list[str] = field(default_factory=list)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    on_call: Callable[[str, str], None] | None = None
    route: RouteHook | None = None

    def wrap(self, name: str, provider: Callable[..., Any]) -> Callable[..., Any]:
        def traced(*args: Any, **kwargs: Any) -> Any:
            out = provider(*args, **kwargs)
            layer = self.stack[-1] if self.stack else "(outside layers)"
            nth = self.counts.get((layer, name), 0)
            self.counts[(layer, name)] = nth + 1
            if name == "moe_gate" and self.route is not None:
                out = self.route((layer, name, nth), args, out)
            keep = self.keep_inputs is True or (not isinstance(self.keep_inputs, bool) and name in self.keep_inputs)
            self.calls.append(
                OpCall(len(self.calls), layer, name, nth, output_tensors(out),
                       _to_cpu(args) if keep else (), _to_cpu(kwargs) if keep else {})
            )
            if self.on_call is not None:
                self.on_call(layer, name)
            return out

        traced.__name__ = name
        traced.__wrapped__ = provider  # type: ignore[attr-defined]
        return traced


def trace(model: Any, input_ids: torch.Tensor, keep_inputs: bool | frozenset[str] = False,
          forward: Callable[[torch.Tensor], torch.Tensor] | None = None, route: RouteHook | None = None) -> Trace:
    """One forward pass of ``model`` on the active runtime with every op call and every
    top-level layer recorded (hooks removed afterwards). ``forward(ids)`` runs the pass
    (default ``model(ids)``; e.g. a decode step on a KV cache) and returns logits ``[B, T, V]``.
    ``keep_inputs``: keep every call's inputs (True) or those of the named ops; ``route``:
    see :data:`RouteHook`."""
    tracer = _Tracer(keep_inputs, route=route)
    handles = []

    def enter(name: str) -> None:
        tracer.stack.append(name)

    def leave(name: str, out: Any) -> None:
        tracer.stack.pop()
        tracer.layers[name] = layer_output(out) if name.startswith("layers.") else _single(out)

    try:
        for name, module in layer_modules(model):
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: enter(name)))
            handles.append(module.register_forward_hook(lambda m, a, out, name=name: leave(name, out)))
        with op_hook(tracer.wrap):
            logits = (forward or model)(input_ids.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return Trace(tracer.layers, tracer.calls, logits.detach().to("cpu", torch.float64))


def _single(out: Any) -> torch.Tensor:
    t = out[0] if isinstance(out, tuple) else out
    return t.detach().to("cpu", torch.float64)


# ------------------------------------------------------------------ metrics
def rel_drift(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (inf on a shape mismatch or a non-finite
    output; 0 when both are zero). Integer tensors (expert ids): the fraction that differ."""
    if tuple(out.shape) != tuple(ref.shape):
        return math.inf
    if not torch.is_floating_point(ref):
        return float((out != ref).double().mean()) if ref.numel() else 0.0
    o, r = out.to(torch.float64), ref.to(torch.float64)
    if not bool(torch.isfinite(o).all()):
        return math.inf
    den = float(r.norm())
    num = float((o - r).norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def call_drift(a: OpCall, b: OpCall) -> float:
    """The worst :func:`rel_drift` over the outputs of two matching op calls."""
    if len(a.outputs) != len(b.outputs):
        return math.inf
    return max((rel_drift(x, y) for x, y in zip(a.outputs, b.outputs)), default=0.0)


def worst_element(out: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Where ``out`` and ``ref`` differ most: index and both values (for reports)."""
    if tuple(out.shape) != tuple(ref.shape) or out.numel() == 0:
        return {"index": None, "a": None, "b": None}
    diff = (out.to(torch.float64) - ref.to(torch.float64)).abs()
    diff = torch.nan_to_num(diff, nan=math.inf)
    flat = int(diff.flatten().argmax())
    index = [int(i) for i in torch.unravel_index(torch.tensor(flat), out.shape)]
    return {"index": index, "a": float(out.flatten()[flat]), "b": float(ref.flatten()[flat])}


@dataclass
class Agreement:
    """Teacher-forced greedy agreement: at each of the N positions after the prompt, does
    the backend's argmax equal the reference's greedy token? Positions where the
    reference's top-1 margin is within what the allowed drift could move are *ambiguous*
    and not counted (a tie on the oracle is no finding)."""

    agreed: int
    decisive: int
    ambiguous: int
    first_mismatch: int | None

    @property
    def value(self) -> float:
        return self.agreed / self.decisive if self.decisive else 1.0


def greedy_reference(model: Any, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The reference model's greedy continuation: ``[1, prompt + steps]`` ids."""
    return model.generate(prompt, steps).cpu()


def ambiguity_basis(logit_drift: float, drift_tol: float) -> float:
    """The relative drift that decides which reference positions are too close to call: the
    measured logit drift, capped by the tolerance (past it, the drift check fails anyway)."""
    return min(drift_tol, logit_drift) if logit_drift == logit_drift else drift_tol


def token_agreement(logits: torch.Tensor, ref_logits: torch.Tensor, prompt_len: int, drift_tol: float) -> Agreement:
    """Compare the argmax of ``logits`` with the reference's at positions ``prompt_len - 1``
    onwards (each predicts the next greedy token). ``drift_tol`` (relative; see
    :func:`ambiguity_basis`) sets the ambiguity margin: ``8 x drift_tol x RMS(row)`` (two
    logits moving apart, 4x margin)."""
    agreed = decisive = ambiguous = 0
    first = None
    for step, pos in enumerate(range(prompt_len - 1, ref_logits.shape[1] - 1)):
        ref_row, row = ref_logits[0, pos], logits[0, pos]
        if too_close_to_call(ref_row, drift_tol):
            ambiguous += 1
            continue
        decisive += 1
        if int(row.argmax()) == int(ref_row.argmax()):
            agreed += 1
        elif first is None:
            first = step
    return Agreement(agreed, decisive, ambiguous, first)


def too_close_to_call(ref_row: torch.Tensor, drift_tol: float) -> bool:
    """Whether the reference's top-1 margin in the logit row ``ref_row [V]`` is within what a
    relative drift of ``drift_tol`` could move: ``8 x drift_tol x RMS(row)``."""
    top = ref_row.topk(2).values
    return float(top[0] - top[1]) <= 8.0 * drift_tol * float(ref_row.pow(2).mean().sqrt())


def selection_margin(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int) -> torch.Tensor:
    """Per token, how far the float64 oracle's choice is from a tie: the smaller of the gap
    between the last kept and first dropped group score, and between the top_k-th and
    next choice score among the kept groups."""
    tokens, experts = logits.shape
    if tokens == 0:
        return torch.zeros(0, dtype=torch.float64)
    choice = torch.sigmoid(logits.to(torch.float64)) + (0 if bias is None else bias.to(torch.float64))
    margin = torch.full((tokens,), float("inf"), dtype=torch.float64)
    if n_group > 1 and topk_group < n_group:
        grouped = choice.view(tokens, n_group, experts // n_group)
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        ranked = group_score.sort(dim=-1, descending=True).values
        margin = ranked[:, topk_group - 1] - ranked[:, topk_group]
        kept = group_score.topk(topk_group, dim=-1).indices
        dropped = torch.ones(tokens, n_group, dtype=torch.bool).scatter_(1, kept, False)
        choice = grouped.masked_fill(dropped[..., None], float("-inf")).view(tokens, experts)
    if top_k < experts:
        ranked = choice.sort(dim=-1, descending=True).values
        gap = ranked[:, top_k - 1] - ranked[:, top_k]
        margin = torch.minimum(margin, torch.nan_to_num(gap, posinf=float("inf")))
    return margin


def routing_too_close_to_call(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int,
                              topk_group: int, drift_tol: float) -> torch.Tensor:
    """Per token of the router's ``logits [T, E]``: whether a relative drift of ``drift_tol``
    could change which experts DeepSeek-V3's router picks. Each logit may move by
    ``delta = 8 x drift_tol x RMS(row)`` (as :func:`too_close_to_call`), so an expert score
    (a sigmoid: slope <= 1/4) by ``delta / 4`` and a group score (two of them) by ``delta / 2``;
    two of either moving apart close a gap of ``delta``: a :func:`selection_margin` within it
    is too close to call."""
    delta = 8.0 * drift_tol * logits.detach().to("cpu", torch.float64).pow(2).mean(dim=-1).sqrt()
    return selection_margin(logits.detach().cpu(), None if bias is None else bias.detach().cpu(), top_k, n_group, topk_group) <= delta


def routed_differently(ids: torch.Tensor, ref_ids: torch.Tensor) -> torch.Tensor:
    """Per token of two routings ``[T, top_k]``: whether their expert sets differ (the order
    within a token's top-k does not matter)."""
    return (ids.detach().cpu().sort(dim=-1).values != ref_ids.detach().cpu().sort(dim=-1).values).any(dim=-1)


@dataclass
class RouterTies:
    """A :data:`RouteHook` for the backend's pass: where its router picks other experts than
    the reference's for a token whose reference scores are too close to call
    (:func:`routing_too_close_to_call` at ``drift_tol``), the model gets the reference's
    ``(weights, ids)`` for that token, and the token counts as ``resolved``.

    A tie on the oracle is no finding, but the other experts change the rest of the pass far
    more than any drift; on random tiny models such ties are common (6 layers: a few tokens
    per layer in the FP8 modes). A token that differs at a decisive margin keeps the
    backend's routing (``mismatched``) and the drift judges it."""

    #: The reference trace's calls; the ``moe_gate`` ones must have their inputs kept.
    reference: list[OpCall]
    drift_tol: float
    resolved: int = 0
    mismatched: int = 0
    tokens: int = 0

    def __post_init__(self) -> None:
        self._gates = {c.key: c for c in self.reference if c.op == "moe_gate"}

    def __call__(self, key: tuple[str, str, int], args: tuple[Any, ...], out: Any) -> Any:
        ref = self._gates.get(key)
        if ref is None or len(ref.args) < 5:  # moe_gate(logits, bias, top_k, n_group, topk_group, ...)
            return out
        weights, ids = out
        ref_weights, ref_ids = ref.outputs
        self.tokens += ids.shape[0]
        if tuple(ids.shape) != tuple(ref_ids.shape):
            return out
        differs = routed_differently(ids, ref_ids)
        if not bool(differs.any()):
            return out
        logits, bias, top_k, n_group, topk_group = ref.args[:5]
        close = routing_too_close_to_call(logits, bias, top_k, n_group, topk_group, self.drift_tol)
        take = differs & close
        self.resolved += int(take.sum())
        self.mismatched += int((differs & ~close).sum())
        if not bool(take.any()):
            return out
        rows = take.nonzero().flatten().to(ids.device)
        weights, ids = weights.clone(), ids.clone()
        weights[rows] = ref_weights.to(weights.device, weights.dtype)[rows]
        ids[rows] = ref_ids.to(ids.device, ids.dtype)[rows]
        return weights, ids

    def summary(self) -> dict[str, int]:
        return {"tokens_routed": self.tokens, "near_ties_given_reference": self.resolved, "decisive_mismatches": self.mismatched}


def layer_drifts(out: Trace, ref: Trace) -> dict[str, float]:
    """Relative drift of every top-level layer's output, in model order."""
    return {name: rel_drift(t, ref.layers[name]) for name, t in out.layers.items() if name in ref.layers}


def first_over(drifts: dict[str, float], tol: float) -> str | None:
    """The first layer whose drift exceeds ``tol`` (None when none does)."""
    return next((name for name, d in drifts.items() if not d <= tol), None)

