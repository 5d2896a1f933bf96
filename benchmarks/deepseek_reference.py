"""dshal's model core against DeepSeek-V3's own inference code, run on CPU.

Usage (not part of CI: DeepSeek's code is not vendored and cannot be fetched there):

    python benchmarks/deepseek_reference.py --inference-dir PATH/TO/DeepSeek-V3/inference [--seeds 0,1,2,3]

It builds a tiny random DeepSeek-V3-shaped checkpoint in the Hugging Face layout with FP8
128x128 block weights (``weight_scale_inv``), converts it with DeepSeek's ``convert.py``,
and runs DeepSeek's ``model.py`` as ``gemm_impl="fp8"``, ``attn_impl="absorb"`` with float32
activations, its Triton kernels (``fp8_gemm``, ``weight_dequant``) under TRITON_INTERPRET=1.
dshal runs the same checkpoint with the defaults (``gemm: auto`` -> fp8-block) on the cpu
backend. Per seed it prints the worst relative logit difference over the prefill and each
decode step (max |dlogit| / max |logit|, last position) and whether the greedy tokens agree.

Two adjustments, both runtime settings of DeepSeek's objects, no change to its files:
- ``act_quant`` runs as the same math in torch: the interpreter's float32 -> float8 cast does
  not round to nearest even as the GPU's ``cvt.rn`` does (0.4 absolute off on randn inputs);
- its gate has the correction bias only when dim == 7168 (V3's size); the tiny model's gate
  gets one (loaded from the checkpoint), and its fp8_gemm autotuner keeps one tile config
  (the interpreter has no benchmarker; BLOCK_K is 128 in every config, so numerics agree).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before DeepSeek's kernels are decorated

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import dshal  # noqa: E402
from dshal.model import from_pretrained, tiny_args  # noqa: E402
from dshal.model.checkpoint import quantize_checkpoint_fp8, random_checkpoint, save_checkpoint  # noqa: E402


def compare(inference_dir: str, seed: int, steps: int, root: str) -> dict:
    sys.path.insert(0, inference_dir)
    import convert
    import kernel as dsk
    import model as ds

    args = tiny_args(q_lora_rank=128, moe_intermediate_size=128, rope_scaling=None, rope_interleave=True,
                     num_hidden_layers=3, max_position_embeddings=4096)
    tensors = random_checkpoint(args, seed=seed)
    for k in list(tensors):
        if k.endswith("e_score_correction_bias"):
            gen = torch.Generator().manual_seed(seed)
            tensors[k] = torch.randn(tensors[k].shape, generator=gen) * 0.1  # a real correction bias
    fp8 = quantize_checkpoint_fp8(tensors)
    save_checkpoint(f"{root}/hf", args, fp8)
    convert.main(f"{root}/hf", f"{root}/ds", args.n_routed_experts, 1)

    ds.gemm_impl, ds.attn_impl = "fp8", "absorb"
    dsk.fp8_gemm_kernel.configs = dsk.fp8_gemm_kernel.configs[:1]

    def act_quant_rne(x, block_size=128, scale_fmt=None):
        b = x.float().unflatten(-1, (-1, block_size))
        s = b.abs().amax(-1) / 448.0
        return (b / s.unsqueeze(-1)).to(torch.float8_e4m3fn).flatten(-2).contiguous(), s.contiguous()

    ds.act_quant = act_quant_rne
    torch.set_default_dtype(torch.float32)
    margs = ds.ModelArgs(
        max_batch_size=2, max_seq_len=64, dtype="fp8", vocab_size=args.vocab_size, dim=args.hidden_size,
        inter_dim=args.intermediate_size, moe_inter_dim=args.moe_intermediate_size, n_layers=args.num_hidden_layers,
        n_dense_layers=args.first_k_dense_replace, n_heads=args.num_attention_heads,
        n_routed_experts=args.n_routed_experts, n_shared_experts=args.n_shared_experts,
        n_activated_experts=args.num_experts_per_tok, n_expert_groups=args.n_group, n_limited_groups=args.topk_group,
        score_func="sigmoid", route_scale=args.routed_scaling_factor, q_lora_rank=args.q_lora_rank,
        kv_lora_rank=args.kv_lora_rank, qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim, v_head_dim=args.v_head_dim, rope_theta=args.rope_theta,
    )
    deepseek = ds.Transformer(margs)
    for layer in deepseek.layers:
        gate = getattr(layer.ffn, "gate", None)
        if gate is not None and gate.bias is None:
            gate.bias = torch.nn.Parameter(torch.zeros(margs.n_routed_experts))
    missing, unexpected = deepseek.load_state_dict(load_file(f"{root}/ds/model0-mp1.safetensors"), strict=False)
    if unexpected or [m for m in missing if "freqs" not in m]:
        raise SystemExit(f"DeepSeek checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    deepseek.eval()

    ours = from_pretrained(f"{root}/hf", {"backend": "cpu"}, dtype=torch.float32)
    mode = ours.describe()["precision"]["mode"]
    ids = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    cache = ours.new_cache(2, ids.shape[1] + steps)
    worst, agree, pos, cur = 0.0, True, 0, ids
    start = time.time()
    with torch.inference_mode():
        for _ in range(steps + 1):
            a = ours(cur, pos, cache)[:, -1].float()
            b = deepseek(cur, pos).float()
            worst = max(worst, float((a - b).abs().max() / b.abs().max()))
            agree &= bool(torch.equal(a.argmax(-1), b.argmax(-1)))
            pos += cur.shape[1]
            cur = b.argmax(-1)[:, None]  # both continue from DeepSeek's token
    return {"seed": seed, "dshal_mode": mode, "steps": steps, "worst_rel_logits": worst, "greedy_agree": agree,
            "seconds": round(time.time() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "\n").splitlines()[0])
    parser.add_argument("--inference-dir", required=True, help="DeepSeek-V3's inference/ folder (model.py, kernel.py, convert.py)")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--steps", type=int, default=6, help="decode steps after the prefill")
    opts = parser.parse_args()
    missing = [f for f in ("model.py", "kernel.py", "convert.py") if not (Path(opts.inference_dir) / f).is_file()]
    if missing:
        parser.error(f"--inference-dir {opts.inference_dir}: no {', '.join(missing)} there; expected DeepSeek-V3's "
                     "inference/ folder (git clone https://github.com/deepseek-ai/DeepSeek-V3)")
    dshal.use(backend="cpu")
    for seed in (int(s) for s in opts.seeds.split(",")):
        with tempfile.TemporaryDirectory() as root:
            print(json.dumps(compare(opts.inference_dir, seed, opts.steps, root)))


if __name__ == "__main__":
    main()
