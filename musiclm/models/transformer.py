"""The decoder-only Transformer shared by MusicLM's three stages (nanoGPT / gpt-fast style).

The paper: "decoder-only Transformers, 24 layers, 16 heads, embedding dimension 1024, feed-forward
4096, dropout 0.1, relative positional embeddings" (T5 style), about 430M parameters per stage.
The feed-forward is T5 v1.1's gated GELU (GEGLU); with it and the stage vocabularies the paper
config has ~430M parameters, where an ungated GELU block would give ~330M.

Two ways to run the model:

* ``forward(tokens)``: the whole causal sequence at once (training, and the reference for tests);
* ``setup_cache`` / ``prefill`` / ``decode_one_token``: incremental decoding with preallocated
  key/value buffers. The relative bias of every distance is precomputed once, so decoding one
  token uses a *slice* of a buffer as the attention mask, and writes keys/values in place.

At batch 1 on a CPU a decoding step is memory- and dispatch-bound, not compute-bound: each op is a
few microseconds of work, so the step reads its weights from tuples gathered once per cache (no
``nn.Module`` attribute look-ups), and ``decode_one_token(..., outputs=(lo, hi))`` multiplies only
the head rows of the ids a position may take (an acoustic position: 1024 of the fine stage's 8192;
the head was the costliest matmul of a step). The arithmetic of every op is unchanged, so the
logits are bit-for-bit those of the unrestricted step, sliced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# decoding one token on CUDA: every backend but cuDNN's (see ``decode_one_token``)
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class TransformerConfig:
    """Sizes of one stage Transformer; the defaults are the paper's (T5 bias defaults)."""

    vocab_size: int = 25_600
    dim: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    ff_dim: int = 4096
    dropout: float = 0.1  # embeddings, residual branches
    attn_dropout: float = 0.1  # attention probabilities (forces SDPA's math path in training)
    max_seq_len: int = 2304
    rel_buckets: int = 32
    rel_max_distance: int = 128
    gated_ff: bool = True  # T5 v1.1 GEGLU; False = the original single-matrix GELU block
    output_size: int | None = None  # logits over token ids [0, output_size); None = the whole vocabulary
    frame_classes: int = 0  # > 0: a per-position class (the melody contour) embedded and added; 0: none

    @property
    def num_outputs(self) -> int:
        return self.vocab_size if self.output_size is None else self.output_size

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.vocab_size <= 0 or self.max_seq_len <= 0:
            raise ValueError("vocab_size and max_seq_len must be positive")
        if self.output_size is not None and not 0 < self.output_size <= self.vocab_size:
            raise ValueError(f"output_size {self.output_size} must be in (0, vocab_size={self.vocab_size}]")
        if not isinstance(self.frame_classes, int) or self.frame_classes < 0:
            raise ValueError(f"frame_classes must be an int >= 0, got {self.frame_classes!r}")

    @property
    def frame_null(self) -> int:
        """The frame class of a position without one (the last row of the frame embedding)."""
        return self.frame_classes

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def relative_position_bucket(distance: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """T5's causal bucketing of a non-negative distance ``query_pos - key_pos``.

    Half of the buckets hold exact distances 0..num_buckets/2-1; the other half are
    logarithmically spaced up to ``max_distance``; farther distances share the last bucket.
    """
    distance = distance.clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # clamp inside the log so that distance 0 does not produce -inf (is_small picks it anyway)
    scaled = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (scaled * (num_buckets - max_exact)).to(torch.long)
    large = large.clamp(max=num_buckets - 1)
    return torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head), added to attention logits; shared by all layers as in T5.

    ``bucket_rev[j]`` is the bucket of distance ``max_seq_len - 1 - j``: the keys 0..p of a query at
    position p have distances p..0, i.e. exactly the slice ``bucket_rev[max_seq_len-1-p:]``.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.max_seq_len = config.max_seq_len
        self.table = nn.Embedding(config.rel_buckets, config.n_heads)
        distance = torch.arange(config.max_seq_len - 1, -1, -1)
        self.register_buffer(
            "bucket_rev", relative_position_bucket(distance, config.rel_buckets, config.rel_max_distance), persistent=False
        )

    def full(self, length: int) -> torch.Tensor:
        """Additive causal mask with bias for a whole sequence: [1, H, L, L] (-inf above the diagonal)."""
        if length > self.max_seq_len:
            raise ValueError(f"sequence of {length} tokens exceeds max_seq_len {self.max_seq_len}")
        # a Toeplitz matrix: look up only the L distances, then slide a window over them
        values = self.table(self.bucket_rev[self.max_seq_len - length :])  # distances L-1..0: [L, H]
        future = values.new_full((length - 1, values.shape[1]), float("-inf"))  # distances -1..-(L-1)
        line = torch.cat([values, future]).t()  # [2L-1, H] -> [H, 2L-1]; index i is distance L-1-i
        windows = line.unfold(1, length, 1)  # [H, L, L]: window s, key k has distance L-1-s-k
        return windows.flip(1).unsqueeze(0)  # row q is window L-1-q: [1, H, L, L]

    def reversed_values(self) -> torch.Tensor:
        """Bias of every distance, reversed, detached: [H, max_seq_len] (for decoding)."""
        return self.table(self.bucket_rev).t().detach().contiguous()  # [max_len, H] -> [H, max_len]


class KVCache(nn.Module):
    """Preallocated keys and values of one layer: [B, H, max_len, Dh]; writes happen in place."""

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        shape = (batch, n_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, n, Dh] at positions start..start+n-1; return the keys/values 0..start+n-1 (views)."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Multi-head causal self-attention; the relative bias arrives as the additive ``attn_mask``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)  # one matmul for q, k and v
        self.proj = nn.Linear(config.dim, config.dim, bias=False)
        self.dropout = config.attn_dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor, start: int | None = None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, Dh]
        if start is not None:  # incremental decoding: attend to everything cached so far
            k, v = self.cache.update(start, k, v)
        dropout = self.dropout if self.training else 0.0
        # T5 does not scale by 1/sqrt(Dh) but folds it into init; we keep SDPA's standard scaling
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # [B, H, L, Dh]
        y = y.transpose(1, 2).reshape(B, L, D)  # [B, H, L, Dh] -> [B, L, D]
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """Position-wise feed-forward: GELU, gated (T5 v1.1 GEGLU) by default."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.gated = config.gated_ff
        self.up = nn.Linear(config.dim, (2 if self.gated else 1) * config.ff_dim, bias=False)
        self.down = nn.Linear(config.ff_dim, config.dim, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, h = h.chunk(2, dim=-1)  # [B, L, 2F] -> 2 x [B, L, F]
            h = F.gelu(gate, approximate="tanh") * h
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.down(h))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, bias=False)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.dim, bias=False)
        self.ff = FeedForward(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, start: int | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask, start)
        return x + self.ff(self.norm2(x))

    def step_weights(self) -> StepWeights:
        """What ``step`` reads, gathered into one tuple (the cache must be set up)."""
        attn, ff = self.attn, self.ff
        if attn.cache is None:
            raise RuntimeError("call setup_cache(batch, max_len) before decoding")
        return StepWeights(self.norm1.weight, attn.qkv.weight, attn.proj.weight, self.norm2.weight, ff.up.weight,
                           ff.down.weight, ff.gated, attn.n_heads, attn.head_dim, attn.cache.k, attn.cache.v)

    def step(self, x: torch.Tensor, mask: torch.Tensor, pos: int) -> torch.Tensor:
        """``forward`` for one cached position, inference only: x [B, 1, D] -> [B, 1, D] (see ``block_step``)."""
        return block_step(self.step_weights(), x, mask, pos)


class StepWeights(NamedTuple):
    """One block's weights and KV buffers for decoding, gathered once per cache: reading them through
    ``nn.Module.__getattr__`` costs about a microsecond per look-up, ~15 per block and step."""

    norm1: torch.Tensor
    qkv: torch.Tensor
    proj: torch.Tensor
    norm2: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gated: bool
    n_heads: int
    head_dim: int
    k: torch.Tensor  # [B, H, max_len, Dh]
    v: torch.Tensor


def block_step(w: StepWeights, x: torch.Tensor, mask: torch.Tensor | None, pos: int) -> torch.Tensor:
    """``Block.forward`` for one cached position, inference only: x [B, 1, D] -> [B, 1, D].

    The same ops as ``forward`` on the same weights (so the same bits), written with ATen calls: at
    batch 1 a decoding step is a few microseconds of work per op, and the ~10 nested ``nn.Module``
    calls per block (dropouts included) and Python wrappers (``F.layer_norm``) would cost as much again.
    """
    B, _, D = x.shape
    h = torch.layer_norm(x, (D,), w.norm1)
    q, k, v = F.linear(h, w.qkv).view(B, 3, w.n_heads, 1, w.head_dim).unbind(1)  # [B, 1, 3D] -> 3 x [B, H, 1, Dh]
    w.k.narrow(2, pos, 1).copy_(k)
    w.v.narrow(2, pos, 1).copy_(v)
    y = F.scaled_dot_product_attention(q, w.k.narrow(2, 0, pos + 1), w.v.narrow(2, 0, pos + 1), attn_mask=mask)
    x = x + F.linear(y.reshape(B, 1, D), w.proj)  # [B, H, 1, Dh] -> [B, 1, D]
    h = F.linear(torch.layer_norm(x, (D,), w.norm2), w.up)
    if w.gated:
        gate, h = h.chunk(2, dim=-1)  # [B, 1, 2F] -> 2 x [B, 1, F]
        h = F.gelu(gate, approximate="tanh") * h
    else:
        h = F.gelu(h, approximate="tanh")
    return x + F.linear(h, w.down)


class StageTransformer(nn.Module):
    """Token embedding, blocks sharing one relative position bias, final norm, untied output head.

    Logits cover token ids ``[0, config.num_outputs)``: logit j is the score of token id j.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        # the melody contour (issue 4): one class per position, added to its token's embedding; aligned with
        # the frame each position predicts, it tells the stage the pitch of that frame directly
        self.frame_embed = nn.Embedding(config.frame_classes + 1, config.dim) if config.frame_classes else None
        self.drop = nn.Dropout(config.dropout)
        self.rel_bias = RelativePositionBias(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.dim, bias=False)
        # the head predicts only the first ``num_outputs`` ids: a stage lays out the tokens it generates
        # first, so conditioning-only ids (MuLan, semantic for coarse) cost no output matmul
        self.head = nn.Linear(config.dim, config.num_outputs, bias=False)
        self._bias_rev: torch.Tensor | None = None  # [1, H, 1, max_len] while a cache is set up
        self._steps: list[StepWeights] = []  # each block's decoding weights while a cache is set up
        self._ends: tuple[torch.Tensor, ...] = ()  # embedding, final norm and head weights, likewise
        self._frame_rows: torch.Tensor | None = None  # the frame embedding's weight, likewise
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight") or name.endswith("down.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))
        if self.frame_embed is not None:
            nn.init.zeros_(self.frame_embed.weight)  # starts as the model without contour

    def _embed(self, tokens: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings [B, L, D], plus the frame classes' (``frames`` [B, L]; None: NULL everywhere)."""
        x = self.embed(tokens)
        if self.frame_embed is None:
            if frames is not None:
                raise ValueError("this model has no frame conditioning (frame_classes=0): it takes no frames")
            return x
        if frames is None:
            return x + self.frame_embed.weight[self.config.frame_null]  # [D] broadcast
        if frames.shape != tokens.shape:
            raise ValueError(f"frames {tuple(frames.shape)} must match tokens {tuple(tokens.shape)}")
        return x + self.frame_embed(frames)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, tokens: torch.Tensor, select: torch.Tensor | None = None, frames: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Causal logits of a whole sequence: tokens [B, L] -> logits [B, L, V_out].

        ``select`` (bool [B, L]) returns only the logits of the selected positions, [N, V_out]:
        training needs them only where there is a target, and the head is the costliest matmul.
        ``frames`` [B, L]: each position's frame class (a model with ``frame_classes``; None: NULL).
        """
        mask = self.rel_bias.full(tokens.shape[1]).to(self.embed.weight.dtype)  # [1, H, L, L]
        x = self.drop(self._embed(tokens, frames))  # [B, L, D]
        for block in self.blocks:
            x = block(x, mask)
        if select is not None:
            x = x[select]  # [B, L, D] -> [N, D]
        return self.head(self.norm(x))

    # ---- incremental decoding -------------------------------------------------------------

    def setup_cache(self, batch: int, max_len: int | None = None) -> None:
        """Allocate the KV buffers and freeze the bias of every distance (call again after training)."""
        max_len = max_len or self.config.max_seq_len
        if max_len > self.config.max_seq_len:
            raise ValueError(f"cache of {max_len} positions exceeds max_seq_len {self.config.max_seq_len}")
        weight = self.embed.weight
        for block in self.blocks:
            block.attn.cache = KVCache(batch, self.config.n_heads, max_len, self.config.head_dim, weight.dtype, weight.device)
        with torch.no_grad():
            self._bias_rev = self.rel_bias.reversed_values().to(weight.dtype)[None, :, None, :]  # [1, H, 1, max_seq_len]
        self._cache_len = max_len
        self._steps = [block.step_weights() for block in self.blocks]
        self._ends = (self.embed.weight, self.norm.weight, self.head.weight)  # what a step reads besides the blocks
        self._frame_rows = None if self.frame_embed is None else self.frame_embed.weight

    def prefill(self, tokens: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """Run a prefix [B, L] (with its frame classes [B, L], if any) into a fresh cache (positions 0..L-1);
        return the logits of its last position [B, V_out]."""
        if self._bias_rev is None:
            raise RuntimeError("call setup_cache(batch, max_len) before prefill")
        L = tokens.shape[1]
        if L > self._cache_len:
            raise ValueError(f"prefix of {L} tokens exceeds the cache of {self._cache_len}")
        mask = self.rel_bias.full(L).to(self.embed.weight.dtype)  # [1, H, L, L]
        x = self._embed(tokens, frames)  # [B, L, D]
        for block in self.blocks:
            x = block(x, mask, 0)
        return self.head(self.norm(x[:, -1]))

    def decode_one_token(
        self, token: torch.Tensor, pos: int, outputs: tuple[int, int] | None = None, frames: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One step: token [B, 1] at position ``pos`` (all earlier positions cached) -> logits [B, V_out].

        ``frames`` [B, 1]: the position's frame class (a model with ``frame_classes``; None: NULL).
        ``outputs`` = (lo, hi): only the logits of ids [lo, hi), [B, hi - lo] (the head's rows lo..hi-1;
        each logit is the same dot product, so this equals the full logits sliced, bit for bit).
        """
        if self._bias_rev is None:
            raise RuntimeError("call setup_cache(batch, max_len) before decode_one_token")
        if pos >= self._cache_len:
            raise ValueError(f"position {pos} is outside the cache of {self._cache_len}")
        embed, norm, head = self._ends
        if outputs is not None:
            if not 0 <= outputs[0] < outputs[1] <= head.shape[0]:
                raise ValueError(f"outputs {tuple(outputs)} are not inside the model's {head.shape[0]} outputs")
            head = head.narrow(0, outputs[0], outputs[1] - outputs[0])  # [n, D]: rows lo..hi-1 of the head
        # keys 0..pos have distances pos..0: a slice of the reversed bias, no recomputation
        mask = self._bias_rev.narrow(3, self._bias_rev.shape[3] - 1 - pos, pos + 1)  # [1, H, 1, pos+1]
        x = torch.embedding(embed, token)  # [B, 1, D]
        if self._frame_rows is not None:
            x = x + (self._frame_rows[self.config.frame_null] if frames is None else torch.embedding(self._frame_rows, frames))
        elif frames is not None:
            raise ValueError("this model has no frame conditioning (frame_classes=0): it takes no frames")
        if mask.is_cuda:
            # the memory-efficient kernel reads the mask with aligned vector loads: a view at an arbitrary
            # offset faults ("misaligned address"); and cuDNN's SDPA plans a graph for every new key length,
            # 2 ms of CPU per call, so bf16 decoding (which picks cuDNN) ran 10x slower than fp32 (H200, torch 2.11)
            mask = mask.contiguous()
            with sdpa_kernel(DECODE_SDPA_BACKENDS):
                x = self._blocks_step(x, mask, pos)
        else:
            x = self._blocks_step(x, mask, pos)
        return F.linear(torch.layer_norm(x[:, 0], (x.shape[-1],), norm), head)

    def _blocks_step(self, x: torch.Tensor, mask: torch.Tensor, pos: int) -> torch.Tensor:
        for weights in self._steps:
            x = block_step(weights, x, mask, pos)
        return x

    def clear_cache(self) -> None:
        """Free the KV buffers."""
        for block in self.blocks:
            block.attn.cache = None
        self._bias_rev = None
        self._steps, self._ends, self._frame_rows = [], (), None
