"""Start a stage's acoustic token embeddings and output rows from the codec's own code vectors.

A stage learns one embedding per acoustic code id from scratch: 1,024 per RVQ level, each seen a few
dozen times in a small corpus. The codec already knows how its codes relate: code ``j`` of level ``q``
adds the vector ``v[q, j]`` to the latent its decoder plays, and on the demo corpus those latents
carry a frame's pitch class (``benchmarks/bench_codec.py``, "pitch CE") while the ids alone, to a
learner that has seen each a few times, do not. Adding a fixed projection of ``v`` to the randomly
initialised rows gives codes that sound alike similar embeddings (input) and similar logits (output)
from step 0, so what the stage learns about one code (e.g. that the contour asks for pitch class 7)
transfers to the codes near it. The random part keeps every id, and every level, distinct.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from musiclm.models.stages import StageConfig
from musiclm.models.transformer import StageTransformer

__all__ = ["acoustic_code_vectors", "add_code_vectors", "codec_code_vectors"]

INIT_STD = 0.02  # the embedding's own init (StageTransformer._init_weights)


@torch.no_grad()
def acoustic_code_vectors(codec: torch.nn.Module) -> torch.Tensor:
    """``[K, codebook_size, D]``: the latent vector each code of each RVQ level adds (a SoundStream's)."""
    quantizer = getattr(codec, "quantizer", None)
    if quantizer is None or not hasattr(quantizer, "layers"):
        raise ValueError(f"{type(codec).__name__} has no residual quantizer to take code vectors from")
    ids = torch.arange(quantizer.codebook_size, device=quantizer.layers[0].codebook.device)
    return torch.stack([layer.dequantize(ids).float().cpu() for layer in quantizer.layers])  # [K, V, D]


def codec_code_vectors(folder: str, token_info: dict[str, Any] | None) -> torch.Tensor:
    """``acoustic_code_vectors`` of the SoundStream in ``folder/soundstream``, after checking that it is the
    codec the shards were tokenized with (``token_info``'s acoustic id, when the shards record one)."""
    from musiclm.checkpoint import CONFIG_FILE, artifact_id
    from musiclm.tokenizers.backends import load_acoustic

    codec_dir = os.path.join(folder, "soundstream")
    if not os.path.isfile(os.path.join(codec_dir, CONFIG_FILE)):
        raise ValueError(f"codec_init: no trained SoundStream in {codec_dir} (give the folder that holds soundstream/)")
    recorded = ((token_info or {}).get("acoustic") or {}).get("ids", {}).get("soundstream")
    found = artifact_id(codec_dir)
    if recorded is not None and recorded != found:
        raise ValueError(f"codec_init: {codec_dir} holds codec {found}, but the shards were tokenized with {recorded}")
    return acoustic_code_vectors(load_acoustic(folder))


@torch.no_grad()
def add_code_vectors(model: StageTransformer, config: StageConfig, vectors: torch.Tensor, seed: int = 0) -> int:
    """Add ``vectors`` [K, V, D] (``acoustic_code_vectors``), projected to the model width by a fixed random
    orthonormal map and scaled so that level 0's rows have the init's RMS (0.02), to the embedding rows of
    the acoustic ids the stage reads and to the output rows of those it generates. Returns the rows changed."""
    layout, rates = config.layout, config.rates
    if vectors.ndim != 3 or vectors.shape[1] != rates.acoustic_codebook_size:
        raise ValueError(f"code vectors must be [levels, {rates.acoustic_codebook_size}, dim], got {tuple(vectors.shape)}")
    used = [q for q, offset in enumerate(layout.acoustic_offsets) if offset is not None]
    if not used:
        return 0  # the semantic stage reads no acoustic tokens
    if max(used) >= vectors.shape[0]:
        raise ValueError(f"the {config.stage} stage reads acoustic level {max(used)}, the codec has {vectors.shape[0]}")
    width, dim = model.config.dim, vectors.shape[2]
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(max(width, dim), min(width, dim), generator=generator))  # orthonormal columns
    projection = basis.T if dim <= width else basis  # [dim, width]: an isometry when dim <= width
    projected = vectors.float() @ projection  # [K, V, width]
    scale = INIT_STD / projected[0].pow(2).mean().sqrt().clamp_min(1e-12)  # level 0's RMS -> the init's
    projected = projected * scale
    size, rows = rates.acoustic_codebook_size, 0
    embed, head = model.embed.weight, model.head.weight
    for q in used:
        offset = layout.acoustic_offsets[q]
        embed[offset : offset + size] += projected[q].to(embed)
        rows += size
        if offset + size <= head.shape[0]:  # a generated level: its output rows too
            head[offset : offset + size] += projected[q].to(head)
            rows += size
    return rows
