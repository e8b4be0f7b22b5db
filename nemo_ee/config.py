"""EarlyExitConfig: backbone shape, parallel layout and exits, validated on construction.

The config composes megatron's ``TransformerConfig`` (see :meth:`EarlyExitConfig.transformer_config`)
instead of inheriting its ~200 fields, so a YAML recipe names only what an early-exit GPT needs
and every bad value is caught here, before megatron builds anything.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import torch

Number = Union[int, float]
PerExit = Union[Number, Sequence[Number], None]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WARMUP_STYLES = ("linear", "cosine")


def _choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


def _positive(name: str, value: Number, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} must be a number {bound}")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (HF ``gelu_new`` / ``gelu_pytorch_tanh``), a picklable function."""
    return torch.nn.functional.gelu(x, approximate="tanh")


@dataclass
class EarlyExitConfig:
    """Everything that defines an early-exit GPT: backbone, parallel layout, exits and exit losses."""

    # ---- backbone -------------------------------------------------------------------------
    num_layers: int = 8  # transformer layers L
    hidden_size: int = 256  # model width
    num_attention_heads: int = 8  # query heads
    num_query_groups: Optional[int] = None  # None = multi-head attention (no GQA)
    kv_channels: Optional[int] = None  # per-head q/k/v width (HF head_dim); None = hidden_size / num_attention_heads
    ffn_hidden_size: Optional[int] = None  # None = 4 * hidden_size
    vocab_size: int = 8192  # padded vocabulary (>= the tokenizer's)
    seq_length: int = 256  # training window; also the decoding context
    max_position_embeddings: Optional[int] = None  # None = seq_length
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"  # norm of every layer, the final norm and exit norms
    activation: Literal["gelu", "swiglu"] = "gelu"  # MLP activation (swiglu = gated, llama-style)
    gelu_approximate: Literal["none", "tanh"] = "none"  # F.gelu(approximate=...); "tanh" = HF gelu_new (GPT-2)
    add_bias_linear: bool = True  # biases in every linear layer
    add_qkv_bias: bool = False  # bias on q/k/v only (Qwen2)
    qk_layernorm: bool = False  # a norm (of `normalization`'s type) over each head's query and key, before RoPE (Qwen3)
    position_embedding_type: Literal["learned_absolute", "rope"] = "learned_absolute"  # GPT-2 positions or rotary
    rotary_base: int = 10000  # RoPE theta
    rope_scaling: bool = False  # llama 3.x RoPE frequency scaling (megatron's; low/high freq 1/4, 8192 positions)
    rope_scaling_factor: float = 8.0  # llama 3.x scaling factor (with rope_scaling)
    share_embeddings_and_output_weights: bool = True  # tie the output layer to the word embedding
    hidden_dropout: float = 0.0  # dropout after attention / MLP (training only)
    attention_dropout: float = 0.0  # dropout on attention probabilities (training only)
    init_method_std: float = 0.02  # std of the normal weight init (output layers scaled by megatron)
    layernorm_epsilon: float = 1e-5  # norm epsilon
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # parameter dtype
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"  # auto = transformer-engine when importable, else megatron's local spec

    # ---- parallel layout ------------------------------------------------------------------
    tensor_model_parallel_size: int = 1  # TP: heads and MLP split across ranks
    pipeline_model_parallel_size: int = 1  # PP: layers split into stages (exits live on their layer's stage)
    sequence_parallel: bool = False  # megatron sequence parallelism (needs transformer-engine)

    # ---- exits ----------------------------------------------------------------------------
    exit_layer_nums: list[int] = field(default_factory=list)  # 1-based backbone layer numbers
    exit_position: Literal["post", "pre"] = "post"  # read the layer's output (post) or input (pre)
    exit_norm: bool = True  # exit head = [block] -> [mlp] -> [norm] -> output projection
    exit_mlp: bool = False  # a residual MLP h + MLP(norm(h)) in each exit head
    exit_block: bool = False  # a full transformer layer first in each exit head (own KV cache when decoding)
    tie_exit_output: bool = False  # exit output weight = the word embedding (shared)

    # ---- exit losses, per exit (a scalar applies to every exit) ---------------------------
    exit_loss_weights: PerExit = 1.0  # target weight w_i
    exit_loss_init_weights: PerExit = None  # None = start at the target (no schedule)
    exit_loss_warmup_iters: PerExit = 0  # iterations from the initial to the target weight
    exit_loss_warmup_style: Union[str, Sequence[str]] = "linear"  # linear | cosine
    exit_logit_temperature: PerExit = 1.0  # training only
    exit_dynamic_token_weight: Union[bool, Sequence[bool]] = False  # each token's exit CE times the exit's max prob (no gradient)

    def __post_init__(self) -> None:
        self._validate_backbone()
        self._validate_exits()

    # ------------------------------------------------------------------ validation
    def _validate_backbone(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length",
                     "tensor_model_parallel_size", "pipeline_model_parallel_size", "rotary_base"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value!r} is outside [0, 1)")
        _positive("init_method_std", self.init_method_std)
        _positive("layernorm_epsilon", self.layernorm_epsilon)
        _choice("normalization", self.normalization, ("LayerNorm", "RMSNorm"))
        _choice("activation", self.activation, ("gelu", "swiglu"))
        _choice("position_embedding_type", self.position_embedding_type, ("learned_absolute", "rope"))
        _choice("gelu_approximate", self.gelu_approximate, ("none", "tanh"))
        if self.gelu_approximate != "none" and self.activation != "gelu":
            raise ValueError(
                f"gelu_approximate={self.gelu_approximate!r} needs activation='gelu', got {self.activation!r}"
            )
        if not isinstance(self.rope_scaling, bool):
            raise ValueError(f"rope_scaling={self.rope_scaling!r} must be true or false")
        _positive("rope_scaling_factor", self.rope_scaling_factor)
        if self.rope_scaling and self.position_embedding_type != "rope":
            raise ValueError(
                f"rope_scaling=True needs position_embedding_type='rope', got {self.position_embedding_type!r}"
            )
        _choice("params_dtype", self.params_dtype, tuple(_DTYPES))
        _choice("transformer_impl", self.transformer_impl, ("auto", "local", "transformer_engine"))
        if self.kv_channels is not None and (
            isinstance(self.kv_channels, bool) or not isinstance(self.kv_channels, int) or self.kv_channels < 1
        ):
            raise ValueError(f"kv_channels={self.kv_channels!r} must be an integer >= 1 or None "
                             "(None = hidden_size / num_attention_heads)")
        if not isinstance(self.qk_layernorm, bool):
            raise ValueError(f"qk_layernorm={self.qk_layernorm!r} must be true or false")
        # Only the default head width divides the model width; an explicit kv_channels decouples the two
        # (megatron projects hidden_size -> heads * kv_channels and back).
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads} "
                "(set kv_channels to give the head width explicitly)"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_query_groups is not None and (groups < 1 or self.num_attention_heads % groups):
            raise ValueError(
                f"num_query_groups={self.num_query_groups} must divide num_attention_heads="
                f"{self.num_attention_heads}"
            )
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if self.num_attention_heads % tp:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"tensor_model_parallel_size={tp}"
            )
        if self.vocab_size % tp:
            raise ValueError(f"vocab_size={self.vocab_size} is not divisible by tensor_model_parallel_size={tp}")
        if groups % tp:
            raise ValueError(f"num_query_groups={groups} is not divisible by tensor_model_parallel_size={tp}")
        if self.ffn_hidden_size is not None and (self.ffn_hidden_size < 1 or self.ffn_hidden_size % tp):
            raise ValueError(
                f"ffn_hidden_size={self.ffn_hidden_size} must be >= 1 and divisible by "
                f"tensor_model_parallel_size={tp}"
            )
        if self.num_layers % pp:
            raise ValueError(
                f"num_layers={self.num_layers} is not divisible by pipeline_model_parallel_size={pp}"
            )
        if self.sequence_parallel and tp == 1:
            raise ValueError(f"sequence_parallel=True needs tensor_model_parallel_size > 1, got {tp}")
        if self.max_position_embeddings is not None and self.max_position_embeddings < self.seq_length:
            raise ValueError(
                f"max_position_embeddings={self.max_position_embeddings} is smaller than "
                f"seq_length={self.seq_length}"
            )

    def _validate_exits(self) -> None:
        layers = list(self.exit_layer_nums or [])
        for num in layers:
            if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= self.num_layers:
                raise ValueError(f"exit layer {num!r} is outside 1..{self.num_layers}")
        if len(set(layers)) != len(layers):
            dup = sorted({n for n in layers if layers.count(n) > 1})
            raise ValueError(f"exit_layer_nums={layers} repeats layer(s) {dup}")
        _choice("exit_position", self.exit_position, ("post", "pre"))
        if sorted(layers) != layers:
            raise ValueError(f"exit_layer_nums={layers} must be in increasing order")
        self.exit_layer_nums = layers
        n = len(layers)
        weights = self.per_exit("exit_loss_weights")
        for w in weights:
            _positive("exit_loss_weights", w, allow_zero=True)
        init = self.per_exit("exit_loss_init_weights")
        for w in init:
            if w is not None:
                _positive("exit_loss_init_weights", w, allow_zero=True)
        for it in self.per_exit("exit_loss_warmup_iters"):
            if isinstance(it, bool) or not isinstance(it, int) or it < 0:
                raise ValueError(f"exit_loss_warmup_iters={it!r} must be an integer >= 0")
        for style in self.per_exit("exit_loss_warmup_style"):
            _choice("exit_loss_warmup_style", style, _WARMUP_STYLES)
        for t in self.per_exit("exit_logit_temperature"):
            _positive("exit_logit_temperature", t)
        for d in self.per_exit("exit_dynamic_token_weight"):
            if not isinstance(d, bool):
                raise ValueError(f"exit_dynamic_token_weight={d!r} must be true or false")
        if n and self.tie_exit_output and not self.share_embeddings_and_output_weights:
            raise ValueError(
                "tie_exit_output=True needs share_embeddings_and_output_weights=True: tied exits use "
                "megatron's shared word-embedding weight, which an untied backbone does not have"
            )

    # ------------------------------------------------------------------ derived values
    @property
    def num_exits(self) -> int:
        return len(self.exit_layer_nums)

    def per_exit(self, name: str) -> list:
        """The value of a per-exit field as one entry per exit; a scalar is broadcast."""
        value = getattr(self, name)
        n = len(self.exit_layer_nums)
        if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, str)):
            value = list(value)
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries but there are {n} exits {self.exit_layer_nums}")
            return value
        return [value] * n

    def exit_point(self, layer: int) -> int:
        """Number of backbone layers the exit at ``layer`` reads after (``pre`` at L == ``post`` at L-1)."""
        return layer if self.exit_position == "post" else layer - 1

    def exit_stage(self, layer: int) -> int:
        """Pipeline stage that owns the exit at ``layer``: the stage computing its input."""
        point = self.exit_point(layer)
        per_stage = self.num_layers // self.pipeline_model_parallel_size
        return 0 if point == 0 else (point - 1) // per_stage

    @property
    def embedding_stages(self) -> list[int]:
        """Pipeline stages holding a copy of the word embedding: first, last, and those with tied exits."""
        last = self.pipeline_model_parallel_size - 1
        stages = {0, last}
        if self.tie_exit_output:
            stages |= {self.exit_stage(layer) for layer in self.exit_layer_nums}
        return sorted(stages)

    @property
    def head_dim(self) -> int:
        """Per-head q/k/v width: ``kv_channels``, or hidden_size / num_attention_heads."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def use_transformer_engine(self) -> bool:
        if self.transformer_impl == "local":
            return False
        try:
            import transformer_engine  # noqa: F401
        except ImportError:
            if self.transformer_impl == "transformer_engine":
                raise ValueError("transformer_impl='transformer_engine' but transformer_engine is not installed")
            return False
        return True

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EarlyExitConfig":
        """Build from a plain mapping (e.g. a YAML ``model`` section); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown EarlyExitConfig key(s) {unknown}; allowed: {sorted(names)}")
        return cls(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def transformer_config(self, **overrides: Any):
        """The megatron-core ``TransformerConfig`` for this backbone (composition, not inheritance)."""
        from megatron.core.transformer.transformer_config import TransformerConfig
        import torch.nn.functional as F

        dtype = _DTYPES[self.params_dtype]
        gated = self.activation == "swiglu"
        kwargs: dict[str, Any] = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            qk_layernorm=self.qk_layernorm,
            ffn_hidden_size=self.ffn_size,
            normalization=self.normalization,
            layernorm_epsilon=self.layernorm_epsilon,
            add_bias_linear=self.add_bias_linear,
            add_qkv_bias=self.add_qkv_bias,
            gated_linear_unit=gated,
            activation_func=F.silu if gated else (gelu_tanh if self.gelu_approximate == "tanh" else F.gelu),
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            init_method_std=self.init_method_std,
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            sequence_parallel=self.sequence_parallel,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            fp16=dtype == torch.float16,
            bf16=dtype == torch.bfloat16,
            use_cpu_initialization=not torch.cuda.is_available(),
        )
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)

    def parameter_count(self) -> int:
        """Analytical parameter count of the whole model (all stages, TP=1), exits included."""
        h, f, v, L = self.hidden_size, self.ffn_size, self.vocab_size, self.num_layers
        d = self.head_dim
        q, kv = self.num_attention_heads * d, (self.num_query_groups or self.num_attention_heads) * d
        bias = self.add_bias_linear
        layernorm = self.normalization == "LayerNorm"
        norm = 2 * h if layernorm else h
        fc1_out = 2 * f if self.activation == "swiglu" else f
        qk_norm = 2 * (2 * d if layernorm else d) * self.qk_layernorm  # one norm of width d each for q and k
        attn = h * (q + 2 * kv) + (q + 2 * kv) * (bias or self.add_qkv_bias) + q * h + h * bias + qk_norm
        mlp = h * fc1_out + fc1_out * bias + f * h + h * bias
        layer = attn + mlp + 2 * norm
        pos = self.max_positions * h if self.position_embedding_type == "learned_absolute" else 0
        total = v * h + pos + L * layer + norm
        if not self.share_embeddings_and_output_weights:
            total += v * h
        head = norm * self.exit_norm + (mlp + norm) * self.exit_mlp + layer * self.exit_block
        head += 0 if self.tie_exit_output else v * h
        return total + self.num_exits * head

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length
