"""``ModelArgs``: the DeepSeek-V3 hyper-parameters, read from a Hugging Face ``config.json``.

Field names follow the ``config.json`` keys (``model_type: deepseek_v3``, or ``deepseek_v32``:
DeepSeek-V3.2, whose ``index_*`` keys size its lightning indexer) so a reader can put the two
side by side. RoPE scaling is read from ``rope_scaling`` (the official
DeepSeek-V3 ``config.json``) or from ``rope_parameters`` (what transformers >= 5 writes).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from dshal.config import os_error_reason, read_text_file
from dshal.errors import ConfigError
from dshal.hub import resolve_checkpoint

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Largest ``max_position_embeddings`` accepted: the rotary tables are built for every
#: position up front (DeepSeek-V3 uses 163840; 2**21 positions already take ~0.5 GB).
MAX_POSITIONS = 1 << 21
#: Largest ``num_hidden_layers``: every layer is built (on the meta device) before a weight is
#: read, so a config claiming 10**6 layers took minutes and gigabytes to fail (V3 has 61).
MAX_LAYERS = 4096
#: Largest ``max_position_embeddings x qk_rope_head_dim``: the float32 rotary tables hold as
#: many values (1 GiB at this bound; DeepSeek-V3: 163840 x 64 = 10.5M).
MAX_ROPE_VALUES = 1 << 28
#: Largest element count of one weight a config may imply (torch's storage size overflows
#: past ~2**63 bytes; DeepSeek-V3's largest, its stacked routed experts, hold ~7.5e9 per layer).
MAX_WEIGHT_ELEMENTS = 1 << 40
#: config.json's ``model_type`` of DeepSeek-V3, and the transformers class of its architecture.
MODEL_TYPE = "deepseek_v3"
ARCHITECTURE = "DeepseekV3ForCausalLM"
#: The same for DeepSeek-V3.2: DeepSeek-V3 plus DeepSeek Sparse Attention (the ``index_*`` keys).
SPARSE_MODEL_TYPE = "deepseek_v32"
SPARSE_ARCHITECTURE = "DeepseekV32ForCausalLM"
#: config.json keys of DeepSeek-V3.2's lightning indexer, each required in such a config.
INDEX_KEYS = ("index_n_heads", "index_head_dim", "index_topk")
#: GLM-4.7-Flash / GLM-4.5-lite: DeepSeek-V3's MLA and MoE under GLM's own model_type, with a
#: per-layer ``mlp_layer_types`` list in place of ``first_k_dense_replace``.
GLM_LITE_MODEL_TYPE = "glm4_moe_lite"
GLM_LITE_ARCHITECTURE = "Glm4MoeLiteForCausalLM"
#: transformers' ``Glm4MoeLiteConfig`` defaults (5.25) that differ from DeepSeek-V3's and change numbers:
#: a GLM config.json without the key means these, not ModelArgs' defaults.
GLM_LITE_DEFAULTS = {
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.8,
    "rms_norm_eps": 1e-5,
    "q_lora_rank": 768,
    "max_position_embeddings": 202752,
}
#: GLM-5 (``glm_moe_dsa``): DeepSeek-V3.2 with an interleaved-RoPE indexer and layers that reuse the
#: previous full layer's selection (``indexer_types``); GlmMoeDsaConfig's defaults that change numbers.
GLM_DSA_MODEL_TYPE = "glm_moe_dsa"
GLM_DSA_ARCHITECTURE = "GlmMoeDsaForCausalLM"
GLM_DSA_DEFAULTS = {
    "n_group": 1,
    "topk_group": 1,
    "rms_norm_eps": 1e-5,
    "q_lora_rank": 2048,
    "max_position_embeddings": 202752,
    "index_topk": 2048,
    "index_head_dim": 128,
    "index_n_heads": 32,
}
#: Largest size of any dimension (int32 indexing in the kernels).
MAX_DIM = (1 << 31) - 1


@dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension (``rope_scaling: {type: yarn, ...}``); ``None`` on ModelArgs = plain RoPE."""

    #: Context extension factor (``factor``).
    factor: float
    #: Context length the model was pre-trained with (``original_max_position_embeddings``).
    original_max_position_embeddings: int
    #: Boundaries of the interpolation ramp, in rotations (``beta_fast`` / ``beta_slow``).
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    #: ``mscale`` / ``mscale_all_dim``: YaRN's attention temperature terms. DeepSeek-V3 uses 1.0 / 1.0,
    #: which leaves cos/sin unscaled and multiplies the softmax scale by ``mscale(factor)**2``.
    mscale: float | None = None
    mscale_all_dim: float | None = None
    #: Explicit cos/sin scale; derived from ``factor`` and the mscales when absent.
    attention_factor: float | None = None
    #: Round the ramp boundaries to whole dimensions (transformers' default).
    truncate: bool = True


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a DeepSeek-V3 model (one ``config.json``).

    Shapes below use: ``H`` heads, ``D`` hidden size, ``r`` kv_lora_rank, ``E`` routed experts.
    """

    vocab_size: int = 129280
    #: Model width ``D``.
    hidden_size: int = 7168
    #: Intermediate size of the dense SwiGLU MLPs (the first ``first_k_dense_replace`` layers).
    intermediate_size: int = 18432
    #: Intermediate size of each routed expert; a shared expert is ``n_shared_experts`` times wider.
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    #: Leading layers with a dense MLP instead of the MoE.
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    # --- MLA (multi-head latent attention)
    #: Rank of the query LoRA (``q_a_proj`` -> norm -> ``q_b_proj``); ``None`` = one ``q_proj``.
    q_lora_rank: int | None = 1536
    #: Rank ``r`` of the compressed key/value latent (what the absorbed KV cache stores).
    kv_lora_rank: int = 512
    #: Per-head query/key dims without and with rotary position: ``qk_head_dim = nope + rope``.
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    # --- DeepSeekMoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    #: Routed experts per token (top-k).
    num_experts_per_tok: int = 8
    #: Expert groups, and how many groups a token may route into (group-limited top-k).
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # --- position, norm, head
    rope_theta: float = 10000.0
    #: DeepSeek rotates adjacent pairs (x0, x1), (x2, x3), ... (``rope_interleave``).
    rope_interleave: bool = True
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    #: Epsilon of the two latent norms (``q_a_layernorm``, ``kv_a_layernorm``). DeepSeek's
    #: ``inference/model.py`` and HF's DeepseekV3 build them with 1e-6 whatever
    #: ``rms_norm_eps`` says (the config's only sets the layer and final norms).
    latent_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    #: Multi-token-prediction layers stored after the last layer (loaded only when
    #: ``mtp_layers`` asks for them).
    num_nextn_predict_layers: int = 0
    #: Dtype of the high-precision weights and activations.
    dtype: torch.dtype = torch.bfloat16
    #: FP8 checkpoint: weight block (``quantization_config.weight_block_size``); None = not FP8.
    weight_block_size: tuple[int, int] | None = None
    #: FP8 format of the checkpoint's weights (``quantization_config.fmt``).
    fp8_format: str = "e4m3fn"
    #: Activation scale format the FP8 checkpoint was made for (``quantization_config.scale_fmt``):
    #: None = float32 scales; "ue8m0" = powers of two (DeepSeek-V3.1's reference inference).
    #: Kept and reported: ``linear`` / ``moe_experts`` quantize activations with float32 scales.
    scale_fmt: str | None = None
    # --- runtime settings (from the dshal config, not from config.json)
    #: Dynamic attention: keys kept per query besides the global ones (None = all).
    attention_window: int | None = None
    #: Leading tokens every query keeps seeing when ``attention_window`` is set.
    attention_global_tokens: int = 0
    #: KV cache layout: "absorb" caches the latent + rope key (decode absorbs kv_b_proj),
    #: "naive" caches per-head keys and values.
    mla_mode: str = "absorb"
    #: Multi-token-prediction layers to build and load (the first ``mtp_layers`` of the
    #: checkpoint's ``num_nextn_predict_layers``): the draft of speculative decoding
    #: (:mod:`dshal.model.speculative`). 0: none, the checkpoint's are skipped.
    mtp_layers: int = 0
    # --- DeepSeek Sparse Attention (DeepSeek-V3.2, ``model_type: deepseek_v32``); 0 = none (V3)
    #: Heads of each layer's lightning indexer (``index_n_heads``; 64 in V3.2).
    index_n_heads: int = 0
    #: Width of the indexer's query heads and of its one cached key per token (``index_head_dim``; 128).
    index_head_dim: int = 0
    #: Keys each query attends to, the indexer's top-scoring ones (``index_topk``; 2048): a query
    #: with at most this many keys before it sees all of them, as in DeepSeek-V3.
    index_topk: int = 0
    #: GLM-5 (``model_type: glm_moe_dsa``): the indexer rotates interleaved pairs (DeepSeek-V3.2's: half-split).
    index_rope_interleave: bool = False
    #: GLM-5's per-layer indexer: "full" runs the layer's own, "shared" reuses the previous full
    #: layer's selection (and has no indexer weights). None: every layer "full" (DeepSeek-V3.2).
    indexer_types: tuple[str, ...] | None = None

    # ------------------------------------------------------------ derived
    @property
    def sparse_attention(self) -> bool:
        """Whether the layers have DeepSeek-V3.2's lightning indexer (``index_n_heads`` > 0)."""
        return self.index_n_heads > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim ** -0.5``, times YaRN's ``mscale(factor, mscale_all_dim) ** 2``."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            scale *= yarn_mscale(rs.factor, rs.mscale_all_dim) ** 2
        return scale

    def shares_selection(self, layer_id: int) -> bool:
        """Whether layer ``layer_id`` attends to the previous full layer's top-k keys (GLM-5's
        ``indexer_types`` "shared") instead of running an indexer of its own."""
        types = self.indexer_types
        return types is not None and layer_id < len(types) and types[layer_id] == "shared"

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.first_k_dense_replace and self.n_routed_experts > 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError when the numbers cannot describe a DeepSeek-V3 model."""
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "v_head_dim",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config.json: {name} is {value!r}, expected a positive integer")
        if not isinstance(self.max_position_embeddings, int) or not 0 < self.max_position_embeddings <= MAX_POSITIONS:
            raise ConfigError(
                f"config.json: max_position_embeddings is {self.max_position_embeddings!r}, "
                f"expected an integer in [1, {MAX_POSITIONS}]"
            )
        if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"config.json: qk_rope_head_dim is {self.qk_rope_head_dim!r}, expected a positive even integer"
            )
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"config.json: q_lora_rank is {self.q_lora_rank!r}, expected null or a positive integer")
        if self.n_routed_experts and self.first_k_dense_replace < self.num_hidden_layers:
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                raise ConfigError(
                    f"config.json: n_group is {self.n_group!r}, "
                    f"expected a positive divisor of n_routed_experts ({self.n_routed_experts})"
                )
            if not 0 < self.topk_group <= self.n_group:
                raise ConfigError(
                    f"config.json: topk_group is {self.topk_group!r}, expected 1..n_group ({self.n_group})"
                )
            per_group = self.n_routed_experts // self.n_group
            if not 0 < self.num_experts_per_tok <= self.topk_group * per_group:
                raise ConfigError(
                    f"config.json: num_experts_per_tok is {self.num_experts_per_tok!r}, "
                    f"expected 1..topk_group * experts per group ({self.topk_group * per_group})"
                )
        if self.scale_fmt not in (None, "ue8m0"):
            raise ConfigError(f"config.json: quantization_config.scale_fmt is {self.scale_fmt!r}, expected null or 'ue8m0'")
        if self.mla_mode not in ("absorb", "naive"):
            raise ConfigError(f"mla_mode is {self.mla_mode!r}, expected 'absorb' or 'naive'")
        if not isinstance(self.num_nextn_predict_layers, int) or self.num_nextn_predict_layers < 0:
            raise ConfigError(
                f"config.json: num_nextn_predict_layers is {self.num_nextn_predict_layers!r}, expected an integer >= 0"
            )
        if not isinstance(self.mtp_layers, int) or not 0 <= self.mtp_layers <= self.num_nextn_predict_layers:
            raise ConfigError(
                f"mtp_layers is {self.mtp_layers!r}, expected an integer in [0, {self.num_nextn_predict_layers}]: "
                f"the checkpoint has {self.num_nextn_predict_layers} multi-token-prediction layer(s) "
                "(config.json num_nextn_predict_layers)"
            )
        for name in ("intermediate_size", "moe_intermediate_size", "qk_nope_head_dim", "n_shared_experts",
                     "n_routed_experts", "first_k_dense_replace", "attention_global_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} is {value!r}, expected an integer >= 0")
        for name in ("rope_theta", "rms_norm_eps", "latent_norm_eps", "routed_scaling_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{name} is {value!r}, expected a finite number > 0")
        window = self.attention_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ConfigError(f"attention.window is {window!r}, expected null or an integer >= 1")
        if self.attention_window is not None and self.attention_global_tokens >= self.attention_window:
            raise ConfigError(
                f"attention.global_tokens is {self.attention_global_tokens}, "
                f"expected fewer than attention.window ({self.attention_window})"
            )
        self._check_indexer()
        self._check_sizes_together()

    def _check_indexer(self) -> None:
        """DeepSeek-V3.2's indexer sizes: all 0 (DeepSeek-V3) or all positive, with what the
        indexer reads (the q LoRA latent, a rotary part) and without an attention window."""
        values = {name: getattr(self, name) for name in INDEX_KEYS}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"config.json: {name} is {value!r}, expected an integer >= 0 (0: no sparse attention)")
        if not any(values.values()):
            if self.indexer_types is not None or self.index_rope_interleave:
                raise ConfigError("config.json: indexer_types / index_rope_interleave set, expected "
                                  f"{', '.join(INDEX_KEYS)} too (they describe DeepSeek Sparse Attention's indexer)")
            return
        for name, value in values.items():
            if value == 0:
                raise ConfigError(
                    f"config.json: {name} is 0, expected a positive integer: DeepSeek Sparse Attention needs all of "
                    f"{', '.join(INDEX_KEYS)} ({', '.join(f'{k}={v}' for k, v in values.items())})"
                )
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ConfigError(
                f"config.json: index_head_dim is {self.index_head_dim}, expected at least qk_rope_head_dim "
                f"({self.qk_rope_head_dim}): the indexer rotates its first qk_rope_head_dim dims"
            )
        if self.q_lora_rank is None:
            raise ConfigError(
                "config.json: q_lora_rank is null, expected a positive integer: DeepSeek-V3.2's indexer reads the "
                "query LoRA latent (index_n_heads is set)"
            )
        if not self.rope_interleave:
            raise ConfigError(
                "config.json: rope_interleave is false, expected true (or no such key) for a DeepSeek-V3.2 model "
                "(index_n_heads set): its attention rotates interleaved pairs, as transformers' DeepseekV32 does"
            )
        types = self.indexer_types
        if types is not None:
            ok = isinstance(types, tuple) and len(types) == self.num_hidden_layers
            if not (ok and all(t in ("full", "shared") for t in types) and types[0] == "full"):
                raise ConfigError(
                    f"config.json: indexer_types is {list(types) if isinstance(types, tuple) else types!r}, expected "
                    f"num_hidden_layers ({self.num_hidden_layers}) entries 'full' or 'shared', the first 'full' (a "
                    "shared layer reuses the previous full layer's top-k selection)"
                )
            if "shared" in types and self.mtp_layers:
                raise ConfigError(
                    f"mtp_layers is {self.mtp_layers}, expected 0 for a GLM-5 model with shared-selection layers "
                    "(indexer_types): its multi-token-prediction layer's selection is not checked against a reference"
                )
        if self.attention_window is not None:
            raise ConfigError(
                f"attention.window is {self.attention_window}, expected null for a DeepSeek-V3.2 model (sparse "
                "attention, index_topk set): dshal does not combine an attention window with the indexer's selection"
            )

    def _check_sizes_together(self) -> None:
        """Sizes each in range can still multiply past what can be built: a tiny config.json
        hung a load for minutes (10**6 layers), asked for 17 GB of rotary tables, or crashed in
        torch ("Storage size calculation overflowed")."""
        if self.num_hidden_layers > MAX_LAYERS:
            raise ConfigError(f"config.json: num_hidden_layers is {self.num_hidden_layers}, expected at most {MAX_LAYERS} "
                              "(every layer is built before a weight is read; DeepSeek-V3 has 61)")
        rope = self.max_position_embeddings * self.qk_rope_head_dim
        if rope > MAX_ROPE_VALUES:
            raise ConfigError(
                f"config.json: max_position_embeddings x qk_rope_head_dim is {self.max_position_embeddings} x "
                f"{self.qk_rope_head_dim} = {rope}, expected at most 2**28 (the rotary tables hold that many float32 "
                "values; DeepSeek-V3: 163840 x 64)"
            )
        weights = {
            "vocab_size x hidden_size (the embedding)": self.vocab_size * self.hidden_size,
            "intermediate_size x hidden_size (a dense MLP)": self.intermediate_size * self.hidden_size,
            "n_routed_experts x 2 x moe_intermediate_size x hidden_size (the routed experts)":
                self.n_routed_experts * 2 * self.moe_intermediate_size * self.hidden_size,
            "num_attention_heads x (qk_nope_head_dim + v_head_dim) x kv_lora_rank (kv_b_proj)":
                self.num_attention_heads * (self.qk_nope_head_dim + self.v_head_dim) * self.kv_lora_rank,
        }
        for what, elements in weights.items():
            if elements > MAX_WEIGHT_ELEMENTS:
                raise ConfigError(f"config.json: {what} is {elements} elements, expected at most 2**40")

    # ------------------------------------------------------------ config.json
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], **overrides: Any) -> ModelArgs:
        """Read a HF ``config.json`` dict (``model_type: deepseek_v3``, or ``architectures``
        listing ``DeepseekV3ForCausalLM``; ``deepseek_v32``; GLM-4.7-Flash's ``glm4_moe_lite``, read
        as the DeepSeek-V3 config it equals); ``overrides`` win.

        The dict is validated first (:func:`validate_hf_config`): types, ranges and the
        required size keys; each error names the key, the value and what was expected."""
        return cls._from_checked(validate_hf_config(cfg, "config.json"), **overrides)

    @classmethod
    def _from_checked(cls, cfg: dict[str, Any], **overrides: Any) -> ModelArgs:
        model_type = cfg.get("model_type")
        architectures = cfg.get("architectures") or []
        glm5 = model_type == GLM_DSA_MODEL_TYPE or GLM_DSA_ARCHITECTURE in architectures
        if glm5:
            cfg = _glm_dsa_as_v32(_layer_types_as_v3(cfg, GLM_DSA_DEFAULTS, 3))
            model_type, architectures = SPARSE_MODEL_TYPE, [SPARSE_ARCHITECTURE]
        elif model_type == GLM_LITE_MODEL_TYPE or GLM_LITE_ARCHITECTURE in architectures:
            cfg = _layer_types_as_v3(cfg, GLM_LITE_DEFAULTS, 1)  # Glm4MoeLiteConfig: the first layer dense
            model_type, architectures = MODEL_TYPE, [ARCHITECTURE]
        elif cfg.get("mlp_layer_types") is not None:  # transformers' DeepseekV32Config writes it too
            cfg = _layer_types_as_v3(cfg, {}, ModelArgs.first_k_dense_replace)
        # Models built on DeepSeek-V3's architecture under their own model_type (Kimi-K2's
        # "kimi_k2") name its class in `architectures`, as transformers and vLLM read it.
        sparse = model_type == SPARSE_MODEL_TYPE or SPARSE_ARCHITECTURE in architectures
        if model_type not in (MODEL_TYPE, None) and ARCHITECTURE not in architectures and not sparse:
            raise ConfigError(
                f"config.json: model_type is {model_type!r} (architectures {architectures}), expected "
                f"{MODEL_TYPE!r} or {SPARSE_MODEL_TYPE!r}, or architectures listing {ARCHITECTURE!r} (as Kimi-K2's "
                f"'kimi_k2' does) or {SPARSE_ARCHITECTURE!r}; or GLM-4.7-Flash's {GLM_LITE_MODEL_TYPE!r}"
            )
        if sparse:
            missing = [key for key in INDEX_KEYS if cfg.get(key) is None]
            if missing:
                raise ConfigError(
                    f"config.json: model_type is {model_type!r} (architectures {architectures}) but {', '.join(missing)} "
                    f"is missing, expected every one of {', '.join(INDEX_KEYS)} (the sizes of DeepSeek-V3.2's indexer)"
                )
        if cfg.get("scoring_func", "sigmoid") != "sigmoid":
            raise ConfigError(
                f"config.json: scoring_func is {cfg['scoring_func']!r}, expected 'sigmoid' (DeepSeek-V3 routing)"
            )
        if cfg.get("topk_method", "noaux_tc") != "noaux_tc":  # V2's "greedy" / "group_limited_greedy": other routing
            raise ConfigError(
                f"config.json: topk_method is {cfg['topk_method']!r}, expected 'noaux_tc' (DeepSeek-V3 routing: "
                "group-limited top-k of the bias-corrected sigmoid scores)"
            )
        if cfg.get("moe_layer_freq", 1) != 1:
            # DeepSeek's remote code makes every moe_layer_freq-th layer past first_k_dense_replace
            # MoE; DeepSeek-V3 (and HF's DeepseekV3, which ignores the key) use 1.
            raise ConfigError(
                f"config.json: moe_layer_freq is {cfg['moe_layer_freq']!r}, expected 1 (every layer from "
                "first_k_dense_replace on is MoE, as in DeepSeek-V3)"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: hidden_act is {cfg['hidden_act']!r}, expected 'silu' (SwiGLU)")
        kv_heads = cfg.get("num_key_value_heads")
        if kv_heads not in (None, cfg.get("num_attention_heads")):
            raise ConfigError(
                f"config.json: num_key_value_heads is {kv_heads!r}, expected num_attention_heads "
                f"({cfg.get('num_attention_heads')}): MLA has one key/value head per query head"
            )
        known = {f.name for f in fields(cls)} - {"index_rope_interleave", "indexer_types"}  # GLM-5's: set below
        plain = {
            k: cfg[k]
            for k in known
            if k in cfg and k not in ("rope_scaling", "dtype", "fp8_format", "weight_block_size")
            and (sparse or k not in INDEX_KEYS)  # a DeepSeek-V3 config's index_* keys (if any) describe no layer
        }
        if glm5:
            plain["index_rope_interleave"] = True
            plain["indexer_types"] = cfg["indexer_types"]
        rope_theta, rope_scaling = _rope_from_config(cfg)
        plain["rope_theta"] = rope_theta
        plain["rope_scaling"] = rope_scaling
        dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
        if dtype_name not in _DTYPES:
            raise ConfigError(f"config.json: dtype is {dtype_name!r}, expected one of {', '.join(_DTYPES)}")
        plain["dtype"] = _DTYPES[dtype_name]
        quant = cfg.get("quantization_config")
        if quant:  # validate_hf_config allows quant_method 'fp8' only
            block = quant.get("weight_block_size") or [128, 128]
            plain["weight_block_size"] = (block[0], block[1])
            fmt = quant.get("fmt", "e4m3")
            plain["fp8_format"] = "e4m3fn" if fmt == "e4m3" else fmt
            plain["scale_fmt"] = quant.get("scale_fmt")
        if plain.get("q_lora_rank") == 0:
            plain["q_lora_rank"] = None
        for key in ("n_group", "topk_group", "num_experts_per_tok", "n_shared_experts", "n_routed_experts"):
            if key in plain and plain[key] is None:
                plain[key] = 1 if key in ("n_group", "topk_group") else 0
        plain.update(overrides)
        return cls(**plain)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> ModelArgs:
        """Read ``path`` (a checkpoint folder holding ``config.json``, or that file itself).
        Every problem is a ConfigError naming the file: unreadable (missing, permission,
        symlink loop, not UTF-8), invalid JSON, or a key with a wrong type or value."""
        config_path = checkpoint_config_path(path)
        _, text = read_text_file(config_path, "model config")
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"invalid JSON: {err.msg}", file=str(config_path), line=err.lineno) from None
        except RecursionError:  # "[[[[..." past the decoder's recursion limit
            raise ConfigError("JSON nested too deeply to read", file=str(config_path)) from None
        try:
            return cls._from_checked(validate_hf_config(cfg, str(config_path), text), **overrides)
        except ConfigError as err:
            if err.file is not None:
                raise
            # A cross-key check of ModelArgs.validate (e.g. n_group must divide n_routed_experts).
            raise ConfigError(str(err).removeprefix("config.json: "), file=str(config_path)) from None

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' ``DeepseekV3Config`` (``DeepseekV32Config`` with
        :attr:`sparse_attention`; ``GlmMoeDsaConfig`` with GLM-5's indexer fields) and
        :meth:`from_hf_config` read back."""
        glm5 = self.index_rope_interleave or self.indexer_types is not None
        cfg: dict[str, Any] = {
            "architectures": [GLM_DSA_ARCHITECTURE if glm5 else SPARSE_ARCHITECTURE if self.sparse_attention else ARCHITECTURE],
            "model_type": GLM_DSA_MODEL_TYPE if glm5 else SPARSE_MODEL_TYPE if self.sparse_attention else MODEL_TYPE,
            "num_key_value_heads": self.num_attention_heads,
            "hidden_act": "silu",
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
        }
        runtime_only = {
            "latent_norm_eps",  # fixed by the architecture, not a config.json key
            "attention_window",
            "attention_global_tokens",
            "mla_mode",
            "mtp_layers",
            "rope_scaling",
            "dtype",
            "fp8_format",
            "weight_block_size",
            "scale_fmt",
            "index_rope_interleave",  # GLM-5's model_type says it
            "indexer_types",  # written as a list below
        }
        if self.indexer_types is not None:
            cfg["indexer_types"] = list(self.indexer_types)
        if self.sparse_attention:  # transformers' DeepseekV32Config has no such key: always interleaved
            runtime_only.add("rope_interleave")
        else:
            runtime_only.update(INDEX_KEYS)
        for f in fields(self):
            if f.name not in runtime_only:
                cfg[f.name] = getattr(self, f.name)
        cfg["dtype"] = cfg["torch_dtype"] = str(self.dtype).replace("torch.", "")
        if self.rope_scaling is not None:
            rs = {k: v for k, v in asdict(self.rope_scaling).items() if v is not None}
            cfg["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", **rs}
        if self.weight_block_size is not None:
            cfg["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3" if self.fp8_format == "e4m3fn" else self.fp8_format,
                "activation_scheme": "dynamic",
                "weight_block_size": list(self.weight_block_size),
            }
            if self.scale_fmt is not None:
                cfg["quantization_config"]["scale_fmt"] = self.scale_fmt
        return cfg

    def with_(self, **changes: Any) -> ModelArgs:
        """A copy with ``changes`` applied (validated)."""
        return replace(self, **changes)


def _layer_types_as_v3(cfg: dict[str, Any], defaults: dict[str, Any], dense_default: int) -> dict[str, Any]:
    """A config.json with transformers' per-layer ``mlp_layer_types`` (GLM's, DeepseekV32Config's) as
    the DeepSeek-V3 one it equals: ``defaults`` (the model type's transformers defaults) for absent
    keys, ``mlp_layer_types`` as ``first_k_dense_replace`` (dense layers first, then MoE: the only
    pattern dshal builds; absent: ``first_k_dense_replace``, else ``dense_default``), a partial rotary
    factor other than 1 refused."""
    out = {**{k: v for k, v in defaults.items() if k not in cfg}, **cfg}
    types = cfg.get("mlp_layer_types")
    layers = cfg["num_hidden_layers"]  # validate_hf_config: present, an integer
    if types is None:
        dense = cfg.get("first_k_dense_replace", dense_default)
    else:
        if not (isinstance(types, list) and len(types) == layers and all(t in ("dense", "sparse") for t in types)):
            raise ConfigError(f"config.json: mlp_layer_types is {types!r}, expected a list of num_hidden_layers "
                              f"({layers}) entries, each 'dense' or 'sparse'")
        dense = types.index("sparse") if "sparse" in types else layers
        if "dense" in types[dense:]:
            raise ConfigError(f"config.json: mlp_layer_types is {types!r}, expected 'dense' layers first and "
                              "'sparse' (MoE) ones after them: dshal builds the MoE from one layer on, as DeepSeek-V3's "
                              "first_k_dense_replace says")
        if cfg.get("first_k_dense_replace", dense) != dense:
            raise ConfigError(f"config.json: first_k_dense_replace is {cfg['first_k_dense_replace']!r}, expected "
                              f"{dense}: mlp_layer_types (what transformers reads) makes that many leading layers dense")
    out["first_k_dense_replace"] = dense
    for key, where in (("rope_parameters", cfg.get("rope_parameters")), ("rope_scaling", cfg.get("rope_scaling")), ("", cfg)):
        factor = (where or {}).get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise ConfigError(f"config.json: {key + '.' if key else ''}partial_rotary_factor is {factor!r}, expected "
                              "1.0: MLA rotates all qk_rope_head_dim dimensions of its rotary part")
    return out


def _glm_dsa_as_v32(cfg: dict[str, Any]) -> dict[str, Any]:
    """GLM-5's config.json (``glm_moe_dsa``) as DeepSeek-V3.2's plus its per-layer ``indexer_types``
    (a tuple), derived as transformers' GlmMoeDsaConfig does when absent: from
    ``index_topk_pattern`` ("F"/"S" letters or a list), else ``index_topk_freq`` /
    ``index_skip_topk_offset``. Its MLA always rotates interleaved pairs (``rope_interleave`` is not read)."""
    layers = cfg["num_hidden_layers"]
    types, key = cfg.get("indexer_types"), "indexer_types"
    if types is None and cfg.get("index_topk_pattern") is not None:
        pattern, key = cfg["index_topk_pattern"], "index_topk_pattern"
        letters = {"F": "full", "S": "shared"}
        if isinstance(pattern, str) and set(pattern) <= set(letters):
            types = [letters[c] for c in pattern]
        else:
            types = pattern
    elif types is None:
        freq, offset = cfg.get("index_topk_freq", 1), cfg.get("index_skip_topk_offset", 2)
        for name, value in (("index_topk_freq", freq), ("index_skip_topk_offset", offset)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"config.json: {name} is {value!r}, expected an integer")
        freq = max(freq, 1)
        types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(layers)]
    if not (isinstance(types, list) and len(types) == layers and all(t in ("full", "shared") for t in types)
            and types[:1] == ["full"]):
        raise ConfigError(f"config.json: {key} is {types!r}, expected num_hidden_layers ({layers}) entries 'full' or "
                          "'shared' ('F' / 'S' letters), the first 'full' (a shared layer reuses the previous full "
                          "layer's top-k selection)")
    return {**cfg, "indexer_types": tuple(types), "rope_interleave": True}


def _rope_from_config(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, yarn or None)`` from ``rope_parameters`` (transformers >= 5) or
    ``rope_theta`` + ``rope_scaling`` (official config.json)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    source = params if (params.get("rope_type") or params.get("type")) not in (None, "default") else scaling
    kind = source.get("rope_type") or source.get("type") or "default"
    if kind == "default":
        return float(theta), None
    if kind != "yarn":
        raise ConfigError(f"config.json: rope type is {kind!r}, expected 'yarn' or 'default' (DeepSeek-V3 uses YaRN)")
    factor = float(source["factor"])  # validate_hf_config: present and finite for a YaRN entry
    original = source.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 4096)
    opt = lambda key: None if source.get(key) is None else float(source[key])  # noqa: E731
    return float(theta), RopeScaling(
        factor=factor,
        original_max_position_embeddings=int(original),
        beta_fast=float(source.get("beta_fast") or 32),
        beta_slow=float(source.get("beta_slow") or 1),
        mscale=opt("mscale"),
        mscale_all_dim=opt("mscale_all_dim"),
        attention_factor=opt("attention_factor"),
        truncate=bool(source.get("truncate", True)),
    )


def checkpoint_config_path(path: Any, argument: str | None = None) -> Path:
    """``path/config.json`` for a checkpoint folder, ``path`` for a ``.json`` file, and for a
    Hugging Face model id (``org/name[@revision]``) that is no path here, its snapshot folder's
    in the local Hugging Face cache (:func:`dshal.hub.resolve_checkpoint`); a ConfigError that
    says what is wrong otherwise (a file that is no config, a symlink loop, a missing folder, no
    permission, an id not in the cache). ``argument``: the flag that gave ``path``
    (``--checkpoint``), named by the error."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise ConfigError(f"{argument or 'checkpoint'}: got {path!r} ({type(path).__name__}), expected a folder path")
    path = Path(resolve_checkpoint(path, argument or "checkpoint"))
    try:
        is_dir = path.stat().st_mode & 0o170000 == 0o040000
    except OSError as err:
        if argument:  # the flag first: "--checkpoint /x: cannot read model config: no such file"
            raise ConfigError(f"{argument} {path}: cannot read model config: {os_error_reason(path, err)}") from None
        raise ConfigError(f"cannot read model config: {os_error_reason(path, err)}", file=str(path)) from None
    if is_dir:
        return path / "config.json"
    if path.suffix == ".json":
        return path
    yaml_note = (": a .yaml is a dshal runtime config (dshal.yaml), not a model's config"
                 if path.suffix in (".yaml", ".yml") else "")
    message = ("checkpoint path is a file, expected a folder holding config.json and *.safetensors "
               f"(or the config.json itself){yaml_note}")
    if argument:  # the flag first, as for a missing path
        raise ConfigError(f"{argument} {path}: {message}")
    raise ConfigError(message, file=str(path))


def checkpoint_folder(path: Any, argument: str | None = None) -> Path:
    """The checkpoint folder ``path`` names: itself, the folder of a ``config.json`` given
    instead, or a Hugging Face model id's snapshot folder in the local cache
    (:func:`checkpoint_config_path` says these forms are accepted; the weights, tokenizer and
    generation_config.json are read beside it)."""
    return checkpoint_config_path(path, argument).parent


class _HfCheck:
    """Raises ConfigErrors about one config.json: key, value, expectation, file[:line]."""

    def __init__(self, file: str, text: str | None):
        self.file, self.text = file, text

    def fail(self, key: str, value: Any, expected: str) -> ConfigError:
        line = None
        if self.text is not None:  # JSON has no line marks: the first line that spells the key
            # a missing key ("rope_scaling.factor") is not in the text: the object's line instead
            for part in reversed(key.split(".")):
                at = self.text.find(f'"{part.split("[", 1)[0]}"')
                if at >= 0:
                    line = self.text.count("\n", 0, at) + 1
                    break
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return ConfigError(f"{key}: got {shown}, expected {expected}", file=self.file, line=line, key=key)

    def integer(self, key: str, v: Any, low: int, high: int = MAX_DIM) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise self.fail(key, v, f"an integer in [{low}, {high}]")
        return v

    def number(self, key: str, v: Any, low: float, high: float = math.inf, *, open_low: bool = True) -> float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or (v <= low if open_low else v < low) or v > high:
            bound = f"> {low:g}" if open_low else f">= {low:g}"
            raise self.fail(key, v, f"a finite number {bound}" + (f" and <= {high:g}" if high < math.inf else ""))
        return float(v)

    def boolean(self, key: str, v: Any) -> bool:
        if not isinstance(v, bool):
            raise self.fail(key, v, "true or false")
        return v

    def mapping(self, key: str, v: Any) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(key, v, "a JSON object")
        return v

    def string(self, key: str, v: Any, allowed: tuple[str, ...]) -> str:
        if not isinstance(v, str) or v not in allowed:
            raise self.fail(key, v, "one of " + ", ".join(repr(a) for a in allowed))
        return v


#: config.json keys that must be present: without them the model's shapes are guesses.
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)
#: Required too when the model has routed experts (``n_routed_experts`` > 0).
REQUIRED_MOE_KEYS = ("n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")
_SIZE_KEYS = {  # key -> smallest value
    **dict.fromkeys(REQUIRED_KEYS, 1),
    "moe_intermediate_size": 1,
    "num_experts_per_tok": 1,
    "n_routed_experts": 0,
    "n_shared_experts": 0,
    "first_k_dense_replace": 0,
    "num_nextn_predict_layers": 0,
    "num_key_value_heads": 1,
    **dict.fromkeys(INDEX_KEYS, 1),
}
_OPTIONAL_SIZE_KEYS = {"q_lora_rank": 0, "n_group": 1, "topk_group": 1}  # null allowed
_BOOL_KEYS = ("attention_bias", "norm_topk_prob", "tie_word_embeddings", "rope_interleave")


def validate_hf_config(cfg: Any, file: str = "config.json", text: str | None = None) -> dict[str, Any]:
    """Check a DeepSeek-V3 ``config.json`` dict before it is read: the required size keys
    are present, every known key has the right type and a possible value (sizes, YaRN,
    ``max_position_embeddings`` up to :data:`MAX_POSITIONS`, ``quantization_config``, DeepSeek-V3.2's
    ``index_*`` sizes).
    Returns ``cfg``; raises ConfigError naming key, value, expectation and ``file``."""
    c = _HfCheck(file, text)
    if not isinstance(cfg, dict):
        raise ConfigError(
            f"got a JSON {type(cfg).__name__}, expected a JSON object of model settings", file=file
        )
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if not missing and isinstance(cfg.get("n_routed_experts", 1), int) and cfg.get("n_routed_experts", 1):
        missing = [k for k in REQUIRED_MOE_KEYS if k not in cfg]
    if missing:
        raise ConfigError(
            f"missing required key(s) {', '.join(missing)}: a DeepSeek-V3 config.json states every size "
            "(dshal does not guess them)",
            file=file,
            key=missing[0],
        )
    for key, low in _SIZE_KEYS.items():
        if key in cfg:
            c.integer(key, cfg[key], low)
    for key, low in _OPTIONAL_SIZE_KEYS.items():
        if cfg.get(key) is not None:
            c.integer(key, cfg[key], low)
    for key in _BOOL_KEYS:
        if key in cfg:
            c.boolean(key, cfg[key])
    if "max_position_embeddings" in cfg:
        c.integer("max_position_embeddings", cfg["max_position_embeddings"], 1, MAX_POSITIONS)
    if "rope_theta" in cfg:
        c.number("rope_theta", cfg["rope_theta"], 0)
    if "rms_norm_eps" in cfg:
        c.number("rms_norm_eps", cfg["rms_norm_eps"], 0, 1)
    if "routed_scaling_factor" in cfg:
        c.number("routed_scaling_factor", cfg["routed_scaling_factor"], 0)
    for key in ("model_type", "scoring_func", "topk_method", "hidden_act", "dtype", "torch_dtype"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise c.fail(key, cfg[key], "a string")
    architectures = cfg.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        raise c.fail("architectures", architectures, "a list of class names, e.g. ['DeepseekV3ForCausalLM']")
    for key in ("rope_scaling", "rope_parameters"):
        if cfg.get(key) is not None:
            _check_rope(c, key, c.mapping(key, cfg[key]))
    if cfg.get("quantization_config") is not None:
        quant = c.mapping("quantization_config", cfg["quantization_config"])
        if "quant_method" in quant:
            c.string("quantization_config.quant_method", quant["quant_method"], ("fp8",))
        if "fmt" in quant:
            c.string("quantization_config.fmt", quant["fmt"], ("e4m3", "e4m3fn", "e4m3fnuz", "e5m2"))
        if quant.get("scale_fmt") is not None:
            c.string("quantization_config.scale_fmt", quant["scale_fmt"], ("ue8m0",))
        if quant.get("activation_scheme") is not None:
            # Static scales come as `input_scale` tensors, which dshal does not read.
            c.string("quantization_config.activation_scheme", quant["activation_scheme"], ("dynamic",))
        block = quant.get("weight_block_size")
        if block is not None:
            ok = isinstance(block, list) and len(block) == 2
            ok = ok and all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 4096 for b in block)
            if not ok:
                raise c.fail(
                    "quantization_config.weight_block_size", block, "two positive integers [rows, cols], e.g. [128, 128]"
                )
    return cfg


def _check_rope(c: _HfCheck, key: str, rope: dict[str, Any]) -> None:
    for name in ("rope_type", "type"):
        if rope.get(name) is not None and not isinstance(rope[name], str):
            raise c.fail(f"{key}.{name}", rope[name], "a string ('yarn' or 'default')")
    kind = rope.get("rope_type") or rope.get("type")  # as _rope_from_config reads it
    if "rope_theta" in rope:
        c.number(f"{key}.rope_theta", rope["rope_theta"], 0)
    if kind in (None, "default"):
        return
    if "factor" not in rope:
        raise c.fail(f"{key}.factor", None, "a finite number > 0 (YaRN's context extension factor)")
    c.number(f"{key}.factor", rope["factor"], 0)
    if rope.get("original_max_position_embeddings") is not None:
        c.integer(f"{key}.original_max_position_embeddings", rope["original_max_position_embeddings"], 1, MAX_POSITIONS)
    for name in ("beta_fast", "beta_slow"):
        if rope.get(name) is not None:
            c.number(f"{key}.{name}", rope[name], 0)
    for name in ("mscale", "mscale_all_dim"):
        if rope.get(name) is not None:
            c.number(f"{key}.{name}", rope[name], 0, open_low=False)
    if rope.get("attention_factor") is not None:
        c.number(f"{key}.attention_factor", rope["attention_factor"], 0)
    if "truncate" in rope:
        c.boolean(f"{key}.truncate", rope["truncate"])


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: ``0.1 * mscale * ln(scale) + 1`` (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


#: The dtypes the tiny model may be built in (``dshal run --dtype``).
TINY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_run_args(mla_mode: str | None, mtp_layers: int, dtype: str | None) -> ModelArgs:
    """The tiny model ``dshal run`` builds (one process or each rank): ``mla_mode`` (None:
    absorb), ``mtp_layers`` MTP layers, ``dtype`` a ``TINY_DTYPES`` name (None: float32)."""
    return tiny_args(mla_mode=mla_mode or "absorb", num_nextn_predict_layers=mtp_layers, mtp_layers=mtp_layers,
                     **({} if dtype is None else {"dtype": TINY_DTYPES[dtype]}))


def tiny_args(**changes: Any) -> ModelArgs:
    """A tiny DeepSeek-V3-shaped model (first layer dense, grouped MoE with a correction
    bias, q LoRA, YaRN) for ``dshal run`` and the tests; ``changes`` override fields."""
    base = ModelArgs(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=1024, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=4096,
        dtype=torch.float32,
    )
    return replace(base, **changes)


__all__ = [
    "MAX_POSITIONS",
    "ModelArgs",
    "RopeScaling",
    "checkpoint_config_path",
    "checkpoint_folder",
    "tiny_args",
    "validate_hf_config",
    "yarn_mscale",
]
