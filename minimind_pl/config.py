"""Model configuration: MiniMind's field names and defaults, plus named presets.

`ModelConfig()` with no arguments is MiniMind-3 (768 hidden x 8 layers, ~64M parameters); the
MiniMind2 family (no q/k norm, MoE with a shared expert) is the same dataclass with other values
(`MINIMIND2_DEFAULTS`, the `minimind2*` presets).
Derived sizes (`head_dim`, `intermediate_size`, `moe_intermediate_size`) and the load-balancing
weight (`router_aux_loss_coef`) may be left as None and are resolved in `__post_init__` exactly as
MiniMind resolves them, so after construction they are always plain numbers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from minimind_pl.errors import UserError

# YaRN settings MiniMind uses when `inference_rope_scaling` is on (see model.py for the formula).
YARN_ROPE_SCALING: dict[str, Any] = {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 16,
    "original_max_position_embeddings": 2048,
    "attention_factor": 1.0,
    "type": "yarn",
}

SUPPORTED_ACTIVATIONS = ("silu",)

# Fields that change no weight's shape or value: a run, an adapter or an exported file may set them
# differently from the weights they start from. Every other field is architecture.
TRAINING_ONLY_FIELDS = frozenset({"dropout", "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "flash_attn",
                                  "inference_rope_scaling", "max_position_embeddings"})
SUPPORTED_SCORING_FUNCS = ("softmax",)
# The weight of MiniMind-3's load-balancing loss when neither router_aux_loss_coef nor aux_loss_alpha is given.
DEFAULT_ROUTER_AUX_LOSS_COEF = 5e-4


def minimind2_intermediate_size(hidden_size: int) -> int:
    """MiniMind2's MLP width: int(hidden * 8/3) rounded up to a multiple of 64 (MiniMind-3 uses pi instead)."""
    return 64 * math.ceil(int(hidden_size * 8 / 3) / 64)


# What MiniMind2 (the architecture before MiniMind-3) sets differently from the dataclass defaults: no q/k
# norm, RMSNorm eps 1e-5, 8 query / 2 key-value heads, and MoE layers routing to 2 of 4 experts plus one
# shared expert, balanced per sequence with weight 0.01. Used by its presets and by the readers of its files.
MINIMIND2_DEFAULTS: dict[str, Any] = {
    "qk_norm": False, "rms_norm_eps": 1e-5, "num_attention_heads": 8, "num_key_value_heads": 2,
    "num_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "aux_loss_alpha": 0.01, "seq_aux": True,
}


def minimind2_config(hidden_size: int, num_hidden_layers: int, use_moe: bool = False) -> dict[str, Any]:
    """Preset overrides of a MiniMind2 model: MINIMIND2_DEFAULTS at the given size (MoE fields only with MoE)."""
    moe_only = ("num_experts", "num_experts_per_tok", "n_shared_experts", "aux_loss_alpha", "seq_aux")
    fields = {k: v for k, v in MINIMIND2_DEFAULTS.items() if use_moe or k not in moe_only}
    return {**fields, "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
            "intermediate_size": minimind2_intermediate_size(hidden_size), **({"use_moe": True} if use_moe else {})}



# Overrides on top of the dataclass defaults (which are minimind-3 itself).
PRESETS: dict[str, dict[str, Any]] = {
    # MiniMind-3: 768 x 8, GQA 8/4, ~64M parameters.
    "minimind-3": {},
    # MiniMind-3-MoE: same trunk, 4 experts, top-1 -> ~198M total, ~64M active.
    "minimind-3-moe": {"use_moe": True, "num_experts": 4, "num_experts_per_tok": 1},
    # The MiniMind2 family (the architecture before MiniMind-3; its released weights load into these):
    # MiniMind2-Small 512 x 8 (~25.8M), MiniMind2 768 x 16 (~104M), MiniMind2-MoE 640 x 8 (~145M total:
    # 4 experts, top-2, one shared expert).
    "minimind2-small": minimind2_config(512, 8),
    "minimind2": minimind2_config(768, 16),
    "minimind2-moe": minimind2_config(640, 8, use_moe=True),
    # Tiny model for tests and smoke runs (~0.5M parameters, most of them the embedding).
    "debug": {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512,
    },
}


@dataclass
class ModelConfig:
    """Hyper-parameters of the MiniMind decoder (field names and defaults as MiniMind's config).

    Args:
        vocab_size: Number of token ids (embedding rows).
        hidden_size: Width of the residual stream.
        num_hidden_layers: Number of transformer blocks.
        num_attention_heads: Query heads per attention layer.
        num_key_value_heads: Key/value heads (grouped-query attention); must divide the query heads.
        head_dim: Width of one head; None means hidden_size // num_attention_heads.
        intermediate_size: SwiGLU hidden width; None means ceil(hidden_size * pi / 64) * 64.
        hidden_act: MLP activation (only "silu" is supported).
        max_position_embeddings: Longest context the RoPE tables are meant for.
        rms_norm_eps: Epsilon of every RMSNorm.
        rope_theta: RoPE base.
        inference_rope_scaling: Turn on YaRN RoPE scaling (MiniMind's settings, factor 16 from 2048).
        dropout: Dropout on embeddings, attention probabilities and attention output.
        flash_attn: Kept for MiniMind compatibility; attention always uses
            `F.scaled_dot_product_attention`, which picks the fastest kernel itself.
        tie_word_embeddings: Share the embedding matrix with the output head.
        bos_token_id: Begin-of-sequence token id.
        eos_token_id: End-of-sequence token id.
        use_moe: Replace every MLP with a mixture of experts.
        num_experts: Experts per MoE layer.
        num_experts_per_tok: Experts each token is routed to (top-k).
        moe_intermediate_size: Hidden width of one expert; None means intermediate_size.
        norm_topk_prob: Renormalise the top-k routing weights to sum to one.
        router_aux_loss_coef: Weight of the load-balancing loss E * coef * sum_e load_e * mean_prob_e
            (MiniMind-3's; load_e = share of tokens routed to expert e). None means 5e-4, or
            aux_loss_alpha / num_experts_per_tok when aux_loss_alpha is given. Training only.
        qk_norm: RMSNorm each query and key head before RoPE (MiniMind-3, Qwen3); False is MiniMind2's
            (and Llama's) attention.
        n_shared_experts: Experts (of width intermediate_size) that every token goes through in addition
            to its routed ones, their outputs added unweighted (MiniMind2-MoE has one; 0 = none).
        scoring_func: How router logits become scores; only "softmax" (MiniMind2's name for the setting).
        aux_loss_alpha: MiniMind2's name and scale for the load-balancing weight: its loss counts routing
            slots (N * k) instead of tokens, so it equals router_aux_loss_coef * num_experts_per_tok.
            None: not given (router_aux_loss_coef decides). Given together, the two must agree.
        seq_aux: Balance the experts within each sequence (the loss per batch row, averaged over rows),
            MiniMind2-MoE's choice, instead of over the whole batch. Training only.
    """

    vocab_size: int = 6400
    hidden_size: int = 768
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: Optional[int] = None
    intermediate_size: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    inference_rope_scaling: bool = False
    dropout: float = 0.0
    flash_attn: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    use_moe: bool = False
    num_experts: int = 4
    num_experts_per_tok: int = 1
    moe_intermediate_size: Optional[int] = None
    norm_topk_prob: bool = True
    router_aux_loss_coef: Optional[float] = None
    qk_norm: bool = True
    n_shared_experts: int = 0
    scoring_func: str = "softmax"
    aux_loss_alpha: Optional[float] = None
    seq_aux: bool = False

    def __post_init__(self) -> None:
        """Resolve derived sizes the way MiniMind does, then validate everything."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            _check_positive_int(name, getattr(self, name))
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise UserError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}), or give head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = math.ceil(self.hidden_size * math.pi / 64) * 64
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        self._resolve_aux_loss_weight()
        self._validate()

    def _resolve_aux_loss_weight(self) -> None:
        """Set router_aux_loss_coef from aux_loss_alpha (or the default); refuse the two disagreeing."""
        if self.aux_loss_alpha is None:
            if self.router_aux_loss_coef is None:
                self.router_aux_loss_coef = DEFAULT_ROUTER_AUX_LOSS_COEF
            return
        _check_positive_int("num_experts_per_tok", self.num_experts_per_tok)
        from_alpha = self.aux_loss_alpha / self.num_experts_per_tok
        if self.router_aux_loss_coef is None:
            self.router_aux_loss_coef = from_alpha
        elif not math.isclose(self.router_aux_loss_coef, from_alpha, rel_tol=1e-9, abs_tol=1e-12):
            raise UserError(
                f"router_aux_loss_coef ({self.router_aux_loss_coef}) and aux_loss_alpha ({self.aux_loss_alpha}) "
                f"set the same load-balancing weight and disagree (aux_loss_alpha = router_aux_loss_coef x "
                f"num_experts_per_tok = {self.router_aux_loss_coef * self.num_experts_per_tok}); give only one "
                "of them (set the other to null)")

    def _validate(self) -> None:
        """Raise ValueError for inconsistent settings (called by __post_init__)."""
        for name in ("head_dim", "intermediate_size", "moe_intermediate_size"):
            _check_positive_int(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise UserError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2 != 0:
            raise UserError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise UserError(f"hidden_act {self.hidden_act!r} is not supported; use one of {SUPPORTED_ACTIVATIONS}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 1:
            raise UserError(f"rms_norm_eps must be > 0 and rope_theta > 1, got {self.rms_norm_eps}, {self.rope_theta}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise UserError(f"{name} ({value}) must be in [0, vocab_size={self.vocab_size})")
        if self.use_moe:
            _check_positive_int("num_experts", self.num_experts)
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise UserError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                                 f"[1, num_experts={self.num_experts}]")
        if self.router_aux_loss_coef < 0:
            raise UserError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if isinstance(self.n_shared_experts, bool) or not isinstance(self.n_shared_experts, int) \
                or self.n_shared_experts < 0:
            raise UserError(f"n_shared_experts must be an integer >= 0, got {self.n_shared_experts!r}")
        if self.scoring_func not in SUPPORTED_SCORING_FUNCS:
            raise UserError(f"scoring_func {self.scoring_func!r} is not supported; use one of {SUPPORTED_SCORING_FUNCS}")

    @property
    def rope_scaling(self) -> Optional[dict[str, Any]]:
        """MiniMind's YaRN settings when `inference_rope_scaling` is on, else None."""
        return dict(YARN_ROPE_SCALING) if self.inference_rope_scaling else None

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """Build a named preset (see `PRESETS`), with field overrides applied on top."""
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (derived sizes resolved); `from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a dict of field values; unknown keys raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown ModelConfig field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**d)

    def num_parameters(self) -> tuple[int, int]:
        """(total, active-per-token) parameter counts computed from the config alone.

        Tied embeddings are counted once. "Active" counts the router, the shared experts and only
        `num_experts_per_tok` routed experts per MoE layer; for a dense model it equals the total.
        """
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads) + (2 * hd if self.qk_norm else 0)
        norms = 2 * h
        if self.use_moe:
            expert = 3 * h * self.moe_intermediate_size
            always = h * self.num_experts + self.n_shared_experts * 3 * h * self.intermediate_size  # router, shared
            mlp_total, mlp_active = always + self.num_experts * expert, always + self.num_experts_per_tok * expert
        else:
            mlp_total = mlp_active = 3 * h * self.intermediate_size
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        rest = embed + h  # embeddings (+ untied head) + final norm
        layers = self.num_hidden_layers
        return rest + layers * (attn + norms + mlp_total), rest + layers * (attn + norms + mlp_active)


def _check_positive_int(name: str, value: Any) -> None:
    """Raise ValueError unless `value` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


def architecture_diff(saved: "ModelConfig | dict[str, Any]", current: "ModelConfig | dict[str, Any]") -> str:
    """Name the architecture fields where two configs differ, e.g. ``hidden_size: 512 != 768`` ('' if none).

    Dicts may hold only some fields (a recorded config); a field missing on either side is not compared.
    """
    a = saved.to_dict() if isinstance(saved, ModelConfig) else dict(saved)
    b = current.to_dict() if isinstance(current, ModelConfig) else dict(current)
    return ", ".join(f"{k}: {a[k]!r} != {b[k]!r}" for k in a
                     if k in b and k not in TRAINING_ONLY_FIELDS and a[k] != b[k])
