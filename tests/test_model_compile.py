"""``torch.compile`` around the model core and the cpu backend's ops, as gpt-fast and vLLM
users wrap a model: dynamo's "eager" and "aot_eager" backends (tracing and AOT autograd are
where dshal's code matters; inductor's code is timed in ``benchmarks/compile_decode.py``).

Graphs are counted with a backend that records each one dynamo hands it: a graph break
makes two, a recompilation one more.
"""

from __future__ import annotations

import pytest
import torch

import dshal
from dshal import ops
from dshal.backends.cpu_native import NATIVE_OPS
from dshal.backends.cpu_opaque import NAMESPACE, SCHEMAS
from dshal.errors import ArgumentError
from dshal.kernels import cpu as cpu_kernels
from dshal.model import random_model, tiny_args
from dshal.model.decode import static_decode_step
from dshal.ops.catalogue import SPECS


class Graphs:
    """A dynamo backend that runs each graph as it is (backend "eager") and keeps them."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(gm)
        return gm.forward

    def targets(self) -> set[str]:
        return {str(node.target) for gm in self.graphs for node in gm.graph.nodes if node.op == "call_function"}


@pytest.fixture
def fresh_dynamo():
    """No graph of an earlier test is reused, nor left for a later one."""
    import torch._dynamo  # imported here, not at collection: it imports triton

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(dtype=torch.float32):
    dshal.use(backend="cpu")
    return random_model(tiny_args(num_hidden_layers=2, dtype=dtype), seed=1)  # a dense layer and a MoE layer


def _ids(batch=1, length=5):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(2))


def test_compiled_decode_steps_are_whole_graphs_with_two_compiles_for_every_position(fresh_dynamo):
    """``torch.compile(model, fullgraph=True)`` for decode steps on a growing KV cache: every
    C kernel call was a graph break (fullgraph refused the first), and without fullgraph the
    frames between breaks were compiled per weight shape past dynamo's recompile limit (a
    decode step of 181 graph breaks, 64 graphs, ~10x slower than eager). Now: one graph for
    the first (checked) step and one, dynamic in the position, for every later step; the
    logits are eager's, bit for bit (the same kernels run)."""
    model = _model()
    ids = _ids()
    compiled_cache, eager_cache = model.new_cache(1, 16), model.new_cache(1, 16)
    model(ids, 0, compiled_cache), model(ids, 0, eager_cache)
    graphs = Graphs()
    step = torch.compile(model, backend=graphs, fullgraph=True)
    token = ids[:, -1:]
    for pos in range(5, 9):
        got, want = step(token, pos, compiled_cache), model(token, pos, eager_cache)
        assert torch.equal(got, want), pos
        token = want[:, -1].argmax(-1, keepdim=True)
    assert len(graphs.graphs) == 2
    assert compiled_cache.length == 9


def test_a_cache_made_under_inference_mode_takes_compiled_steps_outside_it(fresh_dynamo):
    """A compiled forward runs under no_grad, where an inference tensor cannot be written: a
    cache made inside ``torch.inference_mode()`` (with the prompt's prefill), then stepped by
    ``torch.compile(model)`` outside it, failed with torch's "Inplace update to inference tensor
    outside InferenceMode" (eager, and the graph-broken compile before the opaque operators,
    took it). Its buffers are never inference tensors now."""
    dshal.use(backend="cpu")
    model = random_model(tiny_args(num_hidden_layers=1), seed=1)  # one layer: the cache's writes are the point
    ids = _ids()
    with torch.inference_mode():
        compiled_cache, eager_cache = model.new_cache(1, 16), model.new_cache(1, 16)
        model(ids, 0, compiled_cache), model(ids, 0, eager_cache)
    step = torch.compile(model, backend="eager", fullgraph=True)
    token = ids[:, -1:]
    got, want = step(token, 5, compiled_cache), model(token, 5, eager_cache)
    assert torch.equal(got, want)


def test_aot_autograd_compiles_a_prefill_whole(fresh_dynamo):
    """The "aot_eager" backend (AOT autograd, as inductor runs it) on a whole prefill graph
    failed with "Cannot set version_counter for inference tensor" (the forward's
    ``torch.inference_mode()`` inside the graph): under compile it is ``no_grad``."""
    from torch._dynamo.backends.common import aot_autograd  # what the "aot_eager" backend is made of

    model = _model(torch.bfloat16)
    ids = _ids(2, 6)
    graphs = Graphs()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=graphs), fullgraph=True)
    assert torch.equal(compiled(ids), model(ids))
    assert len(graphs.graphs) == 1


@pytest.mark.parametrize("kernels", ["c-kernels", "torch-only"])
def test_the_cpu_backend_ops_are_single_nodes_of_the_graph(fresh_dynamo, monkeypatch, kernels):
    """Each native op is one ``torch.ops.dshal_cpu`` node under compile, whichever path it takes
    inside: the C kernels (ctypes: a graph break each) or torch's (the expert loop read ids on
    the host, and ``torch._grouped_mm``'s fake kernel refused the float32 expert GEMMs that its
    CPU kernel runs: compiling a float32 MoE prefill without the C kernels raised)."""
    if kernels == "torch-only":
        monkeypatch.setenv("DSHAL_CPU_KERNELS", "0")
    elif not cpu_kernels.status().available:
        pytest.skip(f"dshal cpu C kernels unavailable here: {cpu_kernels.status().detail}")
    try:
        assert cpu_kernels.reload().available == (kernels == "c-kernels")
        dshal.use(backend="cpu")
        g = torch.Generator().manual_seed(0)
        x, w, w2 = torch.randn(3, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(64, generator=g)
        w13, w_down = torch.randn(8, 64, 64, generator=g) / 8, torch.randn(8, 64, 32, generator=g) / 8
        cos, sin = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
        q, kv = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 1, 9, 16, generator=g)

        def layer(x):
            y, s = ops.rms_norm(x, w2, 1e-6, x)
            weights, ids = ops.moe_gate(ops.linear(y, w[:8].contiguous()), None, 2, 2, 1, 2.5)
            one = ops.moe_experts(y[:1], weights[:1], ids[:1], w13, w_down)  # a decode step's token
            many = ops.moe_experts(y, weights, ids, w13, w_down)  # a prefill's
            rotated = ops.rotary_embedding(y[:, :16], cos, sin)
            return ops.linear(y[:1], w), one, many, rotated, s, ops.attention(q, kv, kv, True)

        with torch.inference_mode():
            want = layer(x)
            graphs = Graphs()
            got = torch.compile(layer, backend=graphs, fullgraph=True)(x)
        for g_, w_ in zip(got, want):
            assert torch.equal(g_, w_)
        ours = {t for t in graphs.targets() if t.startswith("dshal_cpu.")}
        assert ours == {f"dshal_cpu.{op}" for op in
                        ("add_rms_norm", "linear", "moe_gate", "moe_experts", "rotary_embedding", "attention")}
    finally:
        monkeypatch.undo()
        cpu_kernels.reload()


def test_each_opaque_operator_takes_its_ops_parameters_in_order():
    """The operators are called with the op's arguments in the spec's order: a schema out of
    step with its spec (a parameter added or moved) would pass them to the wrong names."""
    dshal.use(backend="cpu")
    assert {name.removeprefix("add_") for name in SCHEMAS} == set(NATIVE_OPS) - {"silu_and_mul"}
    for name in SCHEMAS:
        op = name.removeprefix("add_")
        params = list(SPECS[op].signature.parameters)
        if op == "rms_norm":  # two operators: without the residual, and with it
            params = params[:3] if name == "rms_norm" else params
        schema = getattr(getattr(torch.ops, NAMESPACE), name).default._schema
        assert [a.name for a in schema.arguments] == params, name


def test_the_static_decode_step_compiles_once_for_every_position(fresh_dynamo):
    """gpt-fast's habit: compile the step whose position is a device tensor
    (``static_decode_step``, what ``--graphs`` captures) with fullgraph; one graph serves every
    position, and its logits are the eager static step's."""
    model = _model()
    ids = _ids()
    compiled_cache, eager_cache = (model.new_cache(1, 16, "absorb", static=True) for _ in range(2))
    with torch.inference_mode():
        model(ids, 0, compiled_cache), model(ids, 0, eager_cache)
    graphs = Graphs()
    step = torch.compile(static_decode_step, backend=graphs, fullgraph=True)
    token, position = ids[:, -1:].clone(), torch.tensor([5])
    with torch.inference_mode():
        for _ in range(4):
            got, want = step(model, token, position, compiled_cache), static_decode_step(model, token, position, eager_cache)
            assert torch.equal(got, want)
            token.copy_(want.argmax(-1, keepdim=True))
            position += 1
    assert len(graphs.graphs) == 1


def test_a_position_tensor_is_refused_naming_the_static_step():
    """``model(token, input_pos_tensor, cache)`` (gpt-fast's signature) is refused with the
    step that takes a device position, and without printing the tensor (dynamo cannot trace
    a tensor's repr: under fullgraph the refusal itself was "repr() on tensor")."""
    model = _model()
    cache = model.new_cache(1, 8)
    model(_ids(), 0, cache)
    with pytest.raises(ArgumentError, match=r"'start_pos' is a tensor, expected an int >= 0; .*static_decode_step"):
        model(_ids(1, 1), torch.tensor(5), cache)


def test_bad_input_to_a_compiled_model_is_still_named(fresh_dynamo):
    """Without fullgraph a dshal error met while dynamo traces is raised as itself; token ids
    out of the vocabulary are checked in the graph (a device assert naming the argument: a
    host read there would split the graph)."""
    model = _model()
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(dshal.DTypeError, match="argument 'input_ids' is torch.float32"):
        compiled(_ids().float())
    with pytest.raises(RuntimeError, match=r"argument 'input_ids' holds a token id outside \[0, 512\)"):
        compiled(_ids() + 512)


@pytest.mark.needs_interpreter
def test_an_emulated_plugins_triton_kernels_run_outside_the_graph(fresh_dynamo):
    """Under the Triton interpreter (an emulated GPU plugin) dynamo traced into the
    interpreter's numpy code and failed (InterpreterError); each launch is a graph break now,
    and the compiled answer is eager's."""
    if not any(info.name == "nvidia" for info in dshal.backends()):
        pytest.skip("the dshal-nvidia plugin is not installed")
    dshal.use(backend="nvidia", emulate=True)
    g = torch.Generator().manual_seed(0)
    x, w, res = torch.randn(4, 64, generator=g), torch.randn(64, generator=g), torch.randn(4, 64, generator=g)

    def norm(x):
        return ops.rms_norm(x, w, 1e-6, res)

    with torch.inference_mode():
        want = norm(x)
        got = torch.compile(norm, backend="eager")(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
