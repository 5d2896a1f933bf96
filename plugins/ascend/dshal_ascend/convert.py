"""DeepSeek-V3 checkpoint (FP8 block or bf16) -> W8A8 int8 (per output channel), for 910B.

DeepSeek-V3 ships its linear weights as FP8 (e4m3fn) with one float32 ``weight_scale_inv``
per 128 x 128 block (the name is historical: it *multiplies*). 910B has no FP8 but a native
int8 GEMM, so each such weight is dequantized (in float32) and requantized symmetric int8
with one scale per output channel (row): ``weight`` int8 ``[N, K]`` + ``weight_scale``
float32 ``[N, 1]``, which ``dshal.ops.linear`` runs as W8A8 (activations are quantized
per token at run time). A bf16/fp32 checkpoint is converted the same way: every projection
weight (``*_proj.weight``, ``kv_a_proj_with_mqa.weight``; routed experts in the Hugging Face
per-expert layout ``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`` included) is
quantized per output channel; the embedding, ``lm_head``, the router ``mlp.gate.weight`` and
the norms stay as they are. Every other tensor is copied unchanged.

Command line: ``dshal-ascend-convert SRC_DIR DST_DIR`` (or ``python -m dshal_ascend.convert``);
SRC may be a Hugging Face model id in the local cache (``deepseek-ai/DeepSeek-V3``: ``dshal.hub``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from dshal.plugin import (
    FP8_DTYPE_LIST,
    ConfigError,
    DshalError,
    DTypeError,
    ShapeError,
    fp8_block_to_int8_rows,
    quantize_int8,
    resolve_checkpoint,
)
from dshal_ascend.tool import run_tool

#: Suffix of DeepSeek-V3's block scales and of the per-channel scales written instead.
FP8_SCALE_SUFFIX = "weight_scale_inv"
INT8_SCALE_SUFFIX = "weight_scale"


def fp8_block_to_int8(weight: torch.Tensor, scale_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One FP8 weight ``[N, K]`` with block scales ``[ceil(N/128), ceil(K/128)]`` -> ``(int8
    [N, K], float32 [N, 1])`` with ``int8 * scale ~= fp8 * block_scale`` (error <= half an
    int8 step of the row's amax)."""
    if weight.dtype not in FP8_DTYPE_LIST:
        raise DTypeError(f"fp8_block_to_int8: argument 'weight' has dtype {weight.dtype}, expected an FP8 dtype")
    if weight.dim() != 2:
        raise ShapeError(f"fp8_block_to_int8: argument 'weight' must be 2-D [N, K], got shape {list(weight.shape)}")
    return fp8_block_to_int8_rows(weight, scale_inv)  # the references' bits, in slabs; checks the scale too


#: Float weights quantized to int8: the linear projections (attention, MLPs, shared and routed experts).
PROJECTION_SUFFIXES = ("_proj.weight", "kv_a_proj_with_mqa.weight")


def is_projection(name: str, t: torch.Tensor) -> bool:
    """A high-precision linear weight the W8A8 checkpoint stores as int8."""
    return name.endswith(PROJECTION_SUFFIXES) and t.dim() == 2 and t.is_floating_point() and t.dtype not in FP8_DTYPE_LIST


def convert_state_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert every ``X.weight`` that has an ``X.weight_scale_inv`` beside it, and every
    high-precision projection weight (:func:`is_projection`); keep the rest.

    Raises ShapeError when an FP8 weight has no block scale (or a scale has no weight), since
    silently copying it would leave a weight the int8 path cannot read.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(FP8_SCALE_SUFFIX):
            owner = name[: -len(FP8_SCALE_SUFFIX)] + "weight"
            if owner not in tensors:
                raise ShapeError(f"convert: {name!r} has no weight {owner!r} beside it")
            continue
        scale_name = name[: -len("weight")] + FP8_SCALE_SUFFIX if name.endswith("weight") else None
        if scale_name is not None and scale_name in tensors:
            q, s = fp8_block_to_int8(t, tensors[scale_name])
            out[name] = q
            out[name[: -len("weight")] + INT8_SCALE_SUFFIX] = s
        elif t.dtype in FP8_DTYPE_LIST:
            raise ShapeError(f"convert: FP8 tensor {name!r} has no block scale {name}_scale_inv beside it")
        elif is_projection(name, t):
            q, s = quantize_int8(t.to(torch.float32))
            out[name] = q
            out[name[: -len("weight")] + INT8_SCALE_SUFFIX] = s
        else:
            out[name] = t
    return out


def _shards(src: Path) -> Iterator[Path]:
    found = sorted(src.glob("*.safetensors"))
    if not found:
        raise DshalError(f"convert: no *.safetensors files in {src}")
    yield from found


@dataclass(frozen=True)
class ShardDone:
    """One converted shard, for progress reports: its position, name, weights converted and
    seconds taken, and the seconds all shards so far took."""

    index: int
    total: int
    name: str
    converted: int
    seconds: float
    elapsed: float

    def line(self) -> str:
        """``[i/N] name: k weights -> int8 in t s; ~T left`` (the estimate: the mean shard so far)."""
        left = self.elapsed / self.index * (self.total - self.index)
        eta = f"; ~{_duration(left)} left" if self.index < self.total else f"; {_duration(self.elapsed)} in all"
        return f"[{self.index}/{self.total}] {self.name}: {self.converted} weights -> int8 in {self.seconds:.1f} s{eta}"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def convert_checkpoint(
    src: str | Path, dst: str | Path, on_shard: Callable[[ShardDone], None] | None = None
) -> dict[str, int]:
    """Convert a Hugging Face ``deepseek_v3`` checkpoint directory (or a model id already in the
    local Hugging Face cache: ``dshal.plugin.resolve_checkpoint``) shard by shard (a weight's
    ``weight_scale_inv`` lives in the same shard in DeepSeek's releases). Non-tensor files
    are copied; ``config.json`` loses its FP8 ``quantization_config`` and records the int8
    scheme; the safetensors index maps the new ``weight_scale`` names. ``on_shard`` is
    called after each shard (DeepSeek-V3 has 163, and the whole conversion takes about an hour
    on two threads: benchmarks/RESULTS.md). Returns counts."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(resolve_checkpoint(src, "src")), Path(dst)  # a Hub id: its snapshot in the local cache
    if src.resolve() == dst.resolve():
        raise DshalError(f"convert: destination {dst} is the source; choose another directory")
    shards = list(_shards(src))
    # read before the shards (an hour for DeepSeek-V3): a bad one must not fail at the end
    config_path, index_path = src / "config.json", src / "model.safetensors.index.json"
    config = _json_object(config_path) if config_path.exists() else None
    index_json = _json_object(index_path) if index_path.exists() else None
    dst.mkdir(parents=True, exist_ok=True)
    converted = 0
    weight_map: dict[str, str] = {}
    start = time.monotonic()
    for index, shard in enumerate(shards, start=1):
        began = time.monotonic()
        tensors = load_file(str(shard))
        result = convert_state_dict(tensors)
        here = sum(1 for n in result if n.endswith(INT8_SCALE_SUFFIX) and n not in tensors)
        converted += here
        save_file(result, str(dst / shard.name), metadata={"format": "pt"})
        weight_map.update({n: shard.name for n in result})
        if on_shard is not None:
            now = time.monotonic()
            on_shard(ShardDone(index, len(shards), shard.name, here, now - began, now - start))
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(path, dst / path.name)
    if config is not None:
        config.pop("quantization_config", None)
        config["dshal_quantization"] = {"scheme": "w8a8-int8", "weight": "per-output-channel", "activation": "per-token-dynamic"}
        (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if index_json is not None:
        index_json["weight_map"] = weight_map
        (dst / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    return {"converted_weights": converted, "tensors": len(weight_map)}


def _json_object(path: Path) -> dict:
    """``path``'s JSON object; ConfigError naming the file when it is unreadable, not JSON or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ConfigError(f"convert: {path}: not a readable JSON file ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"convert: {path}: a JSON {type(value).__name__}, expected an object")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dshal-ascend-convert", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("src", help="DeepSeek-V3 checkpoint directory, FP8 or bf16 (config.json + *.safetensors), or "
                        "its Hugging Face model id (org/name, org/name@REVISION) already in the local Hugging Face "
                        "cache (never downloaded: `hf download ID` fetches it)")
    parser.add_argument("dst", help="output directory for the W8A8 int8 checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no line per converted shard")
    args = parser.parse_args(argv)

    def report(done: ShardDone) -> None:
        print(done.line(), flush=True)

    def convert() -> int:
        try:
            counts = convert_checkpoint(args.src, args.dst, on_shard=None if args.quiet else report)
        except DshalError as err:  # on stderr: stdout holds the progress lines
            print(f"dshal-ascend-convert: error: {err}", file=sys.stderr)
            return 1
        print(f"converted {counts['converted_weights']} weights to int8; {counts['tensors']} tensors written to {args.dst}")
        return 0

    return run_tool("dshal-ascend-convert", convert)


if __name__ == "__main__":
    raise SystemExit(main())
