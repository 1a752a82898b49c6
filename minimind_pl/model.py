"""The MiniMind transformer: a plain `nn.Module`, no Lightning, no transformers.

Decoder-only, pre-norm (RMSNorm), rotary positions (optionally YaRN-scaled), grouped-query
attention with per-head q/k RMSNorm, SwiGLU MLP or a mixture of SwiGLU experts.
The math and the parameter names are MiniMind-3's (which are Hugging Face Qwen3's), so a
MiniMind state dict loads with strict=True and gives the same logits. The same modules are
MiniMind2 (the generation before) with `qk_norm=False` (then the attention is Llama's) and, for
MiniMind2-MoE, top-2 routing, shared experts and the per-sequence balancing loss (`seq_aux`).

Read top to bottom: leaf modules, the attention function, attention / MLP / MoE, the block,
the backbone (`MiniMindModel`) and the causal LM (`MiniMindForCausalLM`).

Shape letters: B batch, T new tokens, S keys (cached + new), H query heads, K key/value heads,
D head_dim, C hidden_size, E experts, N = B*T tokens, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from minimind_pl.config import ModelConfig
from minimind_pl.errors import UserError

# One (key, value) pair per layer, each (B, K, S, D), RoPE already applied.
KVCache = list[tuple[Tensor, Tensor]]
# What every layer's attention is told about visibility: None (plain causal), a dense boolean
# (B or 1, 1, T, S) mask for scaled_dot_product_attention, or a FlexAttention BlockMask.
AttentionMask = Union[None, Tensor, BlockMask]


class CausalLMOutput(NamedTuple):
    """What `MiniMindForCausalLM.forward` returns.

    Attributes:
        logits: (B, T, V) next-token logits (T = `logits_to_keep` when that is > 0).
        aux_loss: 0-d float32 tensor, the MoE load-balancing loss summed over layers
            (training mode only; 0 for dense models and in eval mode).
        past_key_values: the updated KV cache when `use_cache=True`, else None.
    """

    logits: Tensor
    aux_loss: Tensor
    past_key_values: Optional[KVCache]


# ----------------------------------------------------------------------------- leaf modules


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back (MiniMind's order of ops)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        """Create a norm over the last dimension of size `dim`."""
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise x (..., dim)."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).type_as(x)


def rope_frequencies(config: ModelConfig) -> tuple[Tensor, float]:
    """Inverse RoPE frequencies (D/2,) in float32 and the cos/sin scale, MiniMind's formulas.

    With `inference_rope_scaling` (YaRN, applied only when max_position_embeddings exceeds the
    original 2048): f'(i) = f(i) * ((1 - r(i)) + r(i) / factor), where the ramp r(i) is 0 up to
    dimension pair `low` (high frequencies, kept as they are) and 1 from `high` on (low
    frequencies, interpolated by `factor`). This is applied to every position, so unlike
    "dynamic" schemes it also changes short-context logits, through the slow dimensions only.
    """
    dim, base = config.head_dim, config.rope_theta
    # explicit CPU device: stays real even under `with torch.device("meta")` initialisation
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device="cpu").float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    orig, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    if config.max_position_embeddings / orig > 1.0:
        low, high = yarn_ramp_bounds(dim, base, orig, scaling["beta_fast"], scaling["beta_slow"])
        ramp = ((torch.arange(dim // 2, device="cpu").float() - low) / max(high - low, 0.001)).clamp(0, 1)
        inv_freq = inv_freq * (1 - ramp + ramp / factor)
    return inv_freq, float(scaling["attention_factor"])


def yarn_ramp_bounds(dim: int, base: float, orig_max: int, beta_fast: float, beta_slow: float) -> tuple[int, int]:
    """Dimension-pair indices (low, high) where YaRN's interpolation ramp starts and ends."""

    def pair_index(rotations: float) -> float:
        # the dimension pair that turns `rotations` times over `orig_max` positions
        return dim * math.log(orig_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(pair_index(beta_fast)), 0)
    high = min(math.ceil(pair_index(beta_slow)), dim // 2 - 1)
    return low, high


class RotaryEmbedding(nn.Module):
    """Turns position ids into (cos, sin) tables, computed on the fly in float32.

    The inverse frequencies are a plain float32 attribute, not a buffer: `model.to(bfloat16)`
    cannot round them, meta-device initialisation cannot lose them, and the state dict stays
    MiniMind's (whose RoPE tables are non-persistent as well).
    """

    def __init__(self, config: ModelConfig) -> None:
        """Precompute the inverse frequencies for `config` (on the CPU)."""
        super().__init__()
        self.inv_freq, self.attention_factor = rope_frequencies(config)

    def _apply(self, fn: Any, recurse: bool = True) -> "RotaryEmbedding":
        """Follow the module's device moves (`.to`, `.cuda`), never its dtype: the frequencies stay float32.

        Moving them here, not lazily in `forward`, keeps a compiled forward free of attribute
        mutation (which would recompile it once after the first step).
        """
        device = fn(torch.zeros((), dtype=torch.float32)).device
        if device.type != "meta":
            self.inv_freq = self.inv_freq.to(device)
        return super()._apply(fn, recurse)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """position_ids (B, T) -> cos, sin, each (B, T, D) float32."""
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids.float()[..., None] * self.inv_freq  # (B, T, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, D)
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension (Qwen3 / MiniMind)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, heads, T, D) by cos/sin (B, T, D); math in float32, result in x's dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


# ----------------------------------------------------------------------------- attention


def build_attention_mask(
    q_len: int, kv_len: int, doc_ids: Optional[Tensor], key_padding: Optional[Tensor], device: torch.device,
) -> Optional[Tensor]:
    """Boolean mask (B or 1, 1, T, S), True = may attend; None when plain causality is enough.

    Query t sits at absolute position kv_len - q_len + t. It sees keys at or before itself,
    with the same doc id (packed documents) and not padding. Every query may always see
    itself, so a padding query never has an all-masked row (which would give NaN); real tokens
    are unaffected because they see themselves anyway.
    """
    if doc_ids is None and key_padding is None and (q_len == 1 or q_len == kv_len):
        return None  # the attention function uses is_causal (or no mask for a single query)
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(kv_len, device=device)[None, :]  # (1, S)
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if doc_ids is not None:  # only without a cache, so T == S
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    if key_padding is not None:
        mask = mask & key_padding.bool()[:, None, None, :]
    return mask | (k_pos == q_pos)


def document_block_mask(doc_ids: Tensor) -> BlockMask:
    """FlexAttention mask for packed rows: a token sees earlier tokens of its own document only.

    doc_ids (B, T). Built once per batch and shared by every layer; FlexAttention then skips the
    128x128 tiles that are wholly masked (above the diagonal or across documents), which the dense
    mask of `build_attention_mask` cannot. On CUDA the mask is built by a compiled kernel (shapes
    stay fixed from batch to batch, so it compiles once); on the CPU eagerly.
    """
    b, t = doc_ids.shape

    def same_document_causal(batch: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx <= q_idx) & (doc_ids[batch, q_idx] == doc_ids[batch, kv_idx])

    return create_block_mask(same_document_causal, b, None, t, t, device=doc_ids.device,
                             _compile=doc_ids.device.type == "cuda")


def attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask = None, dropout_p: float = 0.0) -> Tensor:
    """Scaled dot-product attention, the single place every layer's attention goes through.

    q (B, H, T, D), k/v (B, K, S, D) with K dividing H (grouped-query: query head h uses
    key/value head h // (H / K)). mask None means causal when T > 1 (then T must equal S,
    which `build_attention_mask` guarantees) and "see everything" for a single query; a
    BlockMask runs FlexAttention (fused only under torch.compile; no dropout).
    Returns (B, H, T, D).
    """
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    cpu = q.device.type == "cpu"
    backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if gqa and ((mask is not None and not cpu) or (cpu and backward)):
        # On CUDA, K/V heads are broadcast (enable_gqa) only by the flash kernel, which takes no dense mask:
        # the memory-efficient kernel, the one for masks, has no broadcast (SDPA would fall back to the math
        # kernel). The CPU kernels broadcast them bit for bit as repeated heads in the forward (3-10x faster
        # attention at a decode step), but sum the K/V gradients in another order: training repeats them.
        n_rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1), False
    is_causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                          enable_gqa=gqa)


class Attention(nn.Module):
    """Grouped-query self-attention with per-head q/k RMSNorm (before RoPE; unless `qk_norm` is off) and a KV cache."""

    def __init__(self, config: ModelConfig) -> None:
        """Build the projections for `config` (no biases)."""
        super().__init__()
        c, d = config.hidden_size, config.head_dim
        self.head_dim = d
        self.q_proj = nn.Linear(c, config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(c, config.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(c, config.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * d, c, bias=False)
        # MiniMind2 has no q/k norm: an identity keeps one forward and adds no parameter names
        self.q_norm = RMSNorm(d, eps=config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(d, eps=config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask,
        past_kv: Optional[tuple[Tensor, Tensor]] = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, T, C) -> output (B, T, C) and this layer's (k, v) including the past."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, -1, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(b, t, -1, self.head_dim)).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)  # (B, K, S, D)
        out = attention(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(b, t, -1)  # (B, T, H*D)
        return self.resid_dropout(self.o_proj(out)), (k, v)


class FeedForward(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        """Build the three bias-free projections."""
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., C) -> (..., C)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """Mixture of SwiGLU experts: softmax router, top-k, optionally renormalised weights, plus
    `n_shared_experts` plain SwiGLU MLPs every token goes through (MiniMind2-MoE; none in MiniMind-3).

    The routed experts run as one grouped matmul over their stacked weights, so every
    expert takes part in every step (an expert no token chose gets a zero gradient) and DDP needs
    no `find_unused_parameters`. Where the grouped matmul does not apply (unaligned sizes), the
    experts run one after the other and unused ones get no gradient.
    """

    def __init__(self, config: ModelConfig) -> None:
        """Build the router (`gate`), `num_experts` routed experts and `n_shared_experts` shared ones."""
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_loss_coef = config.router_aux_loss_coef
        self.seq_aux = config.seq_aux
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            FeedForward(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_experts))
        self.shared_experts = nn.ModuleList(
            FeedForward(config.hidden_size, config.intermediate_size) for _ in range(config.n_shared_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """x (B, T, C) -> (output (B, T, C), aux loss 0-d tensor in training mode else None)."""
        b, t, c = x.shape
        x_flat = x.reshape(-1, c)  # (N, C)
        probs = F.softmax(self.gate(x_flat).float(), dim=-1)  # (N, E) float32
        top_w, top_idx = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
        y = self._dispatch(x_flat, top_w, top_idx)  # (N, C)
        for shared in self.shared_experts:  # unweighted, for every token
            y = y + shared(x_flat)
        aux = None
        if self.training and self.aux_loss_coef > 0:
            aux = self._aux_loss(probs, top_idx, groups=b if self.seq_aux else 1)
        return y.view(b, t, c), aux

    def _dispatch(self, x_flat: Tensor, top_w: Tensor, top_idx: Tensor) -> Tensor:
        """Run each expert on its tokens and add the weighted outputs back: (N, C).

        Sync-free: the (token, slot) pairs are sorted by expert and all experts run as one grouped
        matmul whose group offsets stay on the device (no `.tolist()`, no graph break under compile).
        Where the grouped matmul does not apply, `_experts_loop` (the reference) runs instead.
        """
        n, k = top_idx.shape
        flat_expert = top_idx.flatten()  # (N*k,) expert of each (token, slot)
        order = flat_expert.argsort(stable=True)  # slots grouped by expert
        x_sorted = x_flat[order // k]  # (N*k, C)
        counts = torch.zeros(len(self.experts), dtype=torch.int32, device=x_flat.device)
        counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert, dtype=torch.int32))  # (E,)
        if grouped_matmul_applies(x_flat, self.experts):
            out_sorted = self._experts_grouped(x_sorted, counts.cumsum(0, dtype=torch.int32))
        else:
            out_sorted = self._experts_loop(x_sorted, counts)
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted  # (N*k, C) back in (token, slot) order
        return (out.view(n, k, -1) * top_w[..., None]).sum(1).to(x_flat.dtype)  # weighted in float32

    def _experts_grouped(self, x_sorted: Tensor, offsets: Tensor) -> Tensor:
        """All experts' SwiGLU in three grouped matmuls; rows offsets[e-1]:offsets[e] belong to expert e."""
        dtype = matmul_dtype(x_sorted)
        x = x_sorted.to(dtype)

        def stacked(name: str) -> Tensor:  # (E, in, out): each expert's Linear weight, transposed
            return torch.stack([getattr(e, name).weight for e in self.experts]).to(dtype).transpose(-2, -1)

        gate = torch._grouped_mm(x, stacked("gate_proj"), offs=offsets)  # (N*k, I)
        up = torch._grouped_mm(x, stacked("up_proj"), offs=offsets)
        return torch._grouped_mm(F.silu(gate) * up, stacked("down_proj"), offs=offsets)  # (N*k, C)

    def _experts_loop(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        """The reference: one expert after the other on its rows (one host sync for the counts)."""
        chunks = x_sorted.split(counts.tolist())
        return torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])

    def _aux_loss(self, probs: Tensor, top_idx: Tensor, groups: int) -> Tensor:
        """MiniMind's load-balancing loss: E * coef * sum_e load_e * mean_prob_e, averaged over groups.

        probs (N, E), top_idx (N, k); the N tokens split into `groups` equal groups (1: the batch,
        MiniMind-3; B: each sequence, MiniMind2's `seq_aux`). Within a group, load_e is the fraction of
        tokens that have expert e among their top-k (so the loads sum to k) and mean_prob_e the router
        probability of e averaged over its tokens. MiniMind2's own form, alpha * sum_e P_e * f_e with
        f_e = E * (share of the N*k routing slots), is this with coef = alpha / k.
        """
        num_experts, k = probs.shape[-1], top_idx.shape[-1]
        chosen = F.one_hot(top_idx.view(groups, -1, k), num_experts).float()  # (G, N/G, k, E)
        load = chosen.sum(2).mean(1)  # (G, E)
        mean_prob = probs.view(groups, -1, num_experts).mean(1)  # (G, E)
        return num_experts * self.aux_loss_coef * (load * mean_prob).sum(-1).mean()


def matmul_dtype(x: Tensor) -> Tensor:
    """The dtype a matmul on x runs in: the autocast dtype when autocast is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


#: Device types `torch._grouped_mm` runs on in this torch: it appeared in torch 2.8 for CUDA only (on the CPU it
#: raises NotImplementedError there); 2.9 added the CPU kernel. Elsewhere the experts loop.
GROUPED_MM_DEVICES = (("cuda", "cpu") if torch.__version__ >= "2.9" else ("cuda",)) if hasattr(torch, "_grouped_mm") else ()


def grouped_matmul_applies(x: Tensor, experts: nn.ModuleList) -> bool:
    """Whether `torch._grouped_mm` serves these experts: it runs on x's device type in this torch
    (`GROUPED_MM_DEVICES`), and every row is a multiple of 16 bytes."""
    if x.device.type not in GROUPED_MM_DEVICES:
        return False
    expert = experts[0]
    row_bytes = torch.finfo(matmul_dtype(x)).bits // 8
    return all(size * row_bytes % 16 == 0 for size in expert.gate_proj.weight.shape)


# ----------------------------------------------------------------------------- block and model


class MiniMindBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        """Build attention, MLP (dense or MoE) and the two norms."""
        super().__init__()
        self.self_attn = Attention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.use_moe:
            self.mlp: nn.Module = MoEFeedForward(config)
        else:
            self.mlp = FeedForward(config.hidden_size, config.intermediate_size)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask,
        past_kv: Optional[tuple[Tensor, Tensor]] = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], Optional[Tensor]]:
        """x (B, T, C) -> (x (B, T, C), (k, v), aux loss or None)."""
        attn_out, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_kv)
        x = x + attn_out
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoEFeedForward):
            mlp_out, aux = self.mlp(h)
        else:
            mlp_out, aux = self.mlp(h), None
        return x + mlp_out, kv, aux


class MiniMindModel(nn.Module):
    """The backbone: embeddings, blocks, final norm (the `model.` prefix of parameter names)."""

    def __init__(self, config: ModelConfig) -> None:
        """Build the backbone for `config`."""
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(MiniMindBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    def forward(
        self, input_ids: Tensor, position_ids: Tensor, doc_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None, past_key_values: Optional[KVCache] = None,
        use_cache: bool = False, block_mask: Optional[BlockMask] = None, inputs_embeds: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor, Optional[KVCache]]:
        """input_ids (B, T) -> (hidden (B, T, C), aux loss 0-d float32, new cache or None).
        ``inputs_embeds`` (B, T, C), when given, stands for ``embed_tokens(input_ids)`` (a VLM's merged rows)."""
        t = input_ids.shape[1]
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        mask: AttentionMask = block_mask
        if block_mask is None:
            mask = build_attention_mask(t, past_len + t, doc_ids, attention_mask, input_ids.device)
        cos, sin = self.rotary(position_ids)  # (B, T, D) each
        x = self.dropout(self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds)  # (B, T, C)
        aux_loss = torch.zeros((), dtype=torch.float32, device=x.device)
        cache: Optional[KVCache] = [] if use_cache else None
        for i, layer in enumerate(self.layers):
            x, kv, aux = layer(x, cos, sin, mask, past_key_values[i] if past_key_values else None)
            if cache is not None:
                cache.append(kv)
            if aux is not None:
                aux_loss = aux_loss + aux
        return self.norm(x), aux_loss, cache


class MiniMindForCausalLM(nn.Module):
    """MiniMind causal language model: `self.model` (backbone) + `self.lm_head`.

    Parameter names are MiniMind's; with `tie_word_embeddings` the head's weight IS the
    embedding matrix (`lm_head.weight is model.embed_tokens.weight`), and the state dict
    holds it under both names, as MiniMind's .pth files do.
    """

    def __init__(self, config: ModelConfig) -> None:
        """Build the model and initialise it (normal(0, 0.02) for linear/embedding weights)."""
        super().__init__()
        self.config = config
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Hugging Face's default init, which MiniMind inherits (std 0.02, norms at one)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Optional[Tensor] = None,
        doc_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        block_mask: Optional[BlockMask] = None,
        inputs_embeds: Optional[Tensor] = None,
    ) -> CausalLMOutput:
        """Next-token logits for `input_ids` (B, T).

        Args:
            input_ids: (B, T) token ids in [0, vocab_size).
            position_ids: (B, T) RoPE positions; default past length + arange(T). Packed rows
                restart at 0 for every document; left-padded rows count from their first real token.
            doc_ids: (B, T) document ids: a token attends only to earlier tokens with the same id.
                Not supported together with `past_key_values`.
            attention_mask: (B, S) 1 for real tokens, 0 for padding, S = cached + new length.
            past_key_values: cache returned by a previous call with `use_cache=True`.
            use_cache: return the updated cache in the output.
            logits_to_keep: if > 0, compute logits only for the last that many positions
                (generation needs only the last one).
            block_mask: a FlexAttention mask to use instead of the dense one (e.g.
                `document_block_mask(doc_ids)`, built once per batch outside a compiled forward).
                Training only: no cache, no padding mask, no attention dropout.
            inputs_embeds: (B, T, C) input embeddings to use instead of ``embed_tokens(input_ids)``
                (a vision-language model's rows with image features merged in); ``input_ids`` still
                gives the shape and is checked.
        """
        past_len = self._check_inputs(input_ids, position_ids, doc_ids, attention_mask, past_key_values)
        if block_mask is not None:
            self._check_block_mask(block_mask, input_ids, attention_mask, past_key_values)
        if position_ids is None:
            t = input_ids.shape[1]
            position_ids = torch.arange(past_len, past_len + t, device=input_ids.device).expand_as(input_ids)
        if inputs_embeds is not None and tuple(inputs_embeds.shape) != (*input_ids.shape, self.config.hidden_size):
            raise ValueError(f"inputs_embeds shape {tuple(inputs_embeds.shape)} != (*input_ids.shape, hidden_size) "
                             f"= {(*input_ids.shape, self.config.hidden_size)}")
        hidden, aux_loss, cache = self.model(
            input_ids, position_ids, doc_ids, attention_mask, past_key_values, use_cache, block_mask, inputs_embeds)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutput(self.lm_head(hidden), aux_loss, cache)

    def _check_inputs(
        self, input_ids: Tensor, position_ids: Optional[Tensor], doc_ids: Optional[Tensor],
        attention_mask: Optional[Tensor], past_key_values: Optional[KVCache],
    ) -> int:
        """Raise ValueError for malformed inputs; return the cached length."""
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be a 2-D integer tensor (B, T), got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        self._check_token_range(input_ids)
        for name, tensor in (("position_ids", position_ids), ("doc_ids", doc_ids)):
            if tensor is not None and tensor.shape != input_ids.shape:
                raise ValueError(f"{name} shape {tuple(tensor.shape)} != input_ids shape {tuple(input_ids.shape)}")
        past_len = 0
        if past_key_values:
            if len(past_key_values) != len(self.model.layers):
                raise ValueError(f"past_key_values has {len(past_key_values)} layers, the model "
                                 f"{len(self.model.layers)}")
            if doc_ids is not None:
                raise ValueError("doc_ids cannot be combined with past_key_values")
            past_len = past_key_values[0][0].shape[2]
        expected = (input_ids.shape[0], past_len + input_ids.shape[1])
        if attention_mask is not None and tuple(attention_mask.shape) != expected:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != (batch, cached + new) "
                             f"= {expected}")
        return past_len

    def _check_block_mask(self, block_mask: BlockMask, input_ids: Tensor, attention_mask: Optional[Tensor],
                          past_key_values: Optional[KVCache]) -> None:
        """Raise ValueError where a FlexAttention mask cannot stand in for the dense one."""
        b, t = input_ids.shape
        if past_key_values or attention_mask is not None:
            raise ValueError("block_mask cannot be combined with past_key_values or attention_mask")
        if block_mask.shape[0] not in (1, b) or tuple(block_mask.shape[-2:]) != (t, t):
            raise ValueError(f"block_mask shape {tuple(block_mask.shape)} does not fit input_ids {(b, t)}")
        if self.training and self.config.dropout > 0:
            raise ValueError("block_mask (FlexAttention) has no attention dropout; train with dropout 0 "
                             "or without block_mask")

    def _check_token_range(self, input_ids: Tensor) -> None:
        """Raise ValueError for ids outside [0, vocab_size).

        On the CPU the check is free, so it always runs (an out-of-range id there would only give
        an IndexError from the embedding). On an accelerator `.min()/.max()` force a host sync that
        would stall the asynchronous training loop every step, so there it runs only outside
        training (generation, evaluation), and never while compiling. Training data is already
        checked against the tokenizer's vocabulary when it is tokenized.
        """
        if torch.compiler.is_compiling() or input_ids.numel() == 0:
            return
        if input_ids.device.type != "cpu" and self.training:
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got min {low}, max {high}")

    # ------------------------------------------------------------------------- weights

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load weights; with strict=True, missing/unexpected/mis-shaped keys raise ValueError naming them.

        With tied embeddings either `model.embed_tokens.weight` or `lm_head.weight` may stand for
        both (Hugging Face files drop one); if both are given they must be equal.
        """
        state_dict = self._complete_tied(dict(state_dict))
        if strict:
            self._check_keys(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def load_weights(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
        """Load a MiniMind-format state dict (any float dtype, e.g. fp16 .pth) into this model."""
        return self.load_state_dict(state_dict, strict=strict)

    def _complete_tied(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Fill in the missing one of the two tied keys and check agreement when both exist."""
        if not self.config.tie_word_embeddings:
            return state_dict
        embed, head = "model.embed_tokens.weight", "lm_head.weight"
        if embed in state_dict and head in state_dict:
            a, b = state_dict[embed], state_dict[head]
            if a is not b and (a.shape != b.shape or not torch.equal(a, b.to(a.dtype))):
                raise UserError(f"tie_word_embeddings=True but {embed} and {head} differ in the state dict")
        elif embed in state_dict or head in state_dict:
            present = embed if embed in state_dict else head
            state_dict[head if present == embed else embed] = state_dict[present]
        return state_dict

    def _check_keys(self, state_dict: Mapping[str, Any]) -> None:
        """Raise ValueError naming missing, unexpected and wrongly-shaped keys."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        shapes = sorted(f"{k}: got {tuple(state_dict[k].shape)}, model has {tuple(own[k].shape)}"
                        for k in set(own) & set(state_dict) if tuple(state_dict[k].shape) != tuple(own[k].shape))
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if shapes:
            problems.append(f"shape mismatches {shapes}")
        if problems:
            raise UserError("state dict does not match the model: " + "; ".join(problems))
