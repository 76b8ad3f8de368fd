"""``musiclm describe``: every component of a preset, its configuration, parameter count and token rate.

Models are built on the ``meta`` device, so describing the ``paper`` preset (≈ 2 B parameters in all)
allocates no weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from musiclm import constants as C


def _count(build) -> int:
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def _mulan_parameter_counts(config: Any) -> dict[str, int]:
    """MuLan's towers counted apart: the audio tower is trained here, the text tower is pretrained."""
    from transformers import AutoConfig, AutoModel

    from musiclm.tokenizers.mulan import AudioTower, default_text_model_path

    audio = _count(lambda: AudioTower(config))
    text_config = AutoConfig.from_pretrained(config.text_model or default_text_model_path(), local_files_only=True)
    text = _count(lambda: AutoModel.from_config(text_config))
    projection = text_config.hidden_size * config.embed_dim + config.embed_dim + 1  # text_proj + logit scale
    return {"audio_tower": audio, "text_tower": text, "text_projection": projection, "total": audio + text + projection}


def _config(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def describe(preset: str) -> dict[str, Any]:
    """A JSON-able description of every component at ``preset``."""
    from musiclm.models.stages import StageConfig
    from musiclm.models.transformer import StageTransformer
    from musiclm.tokenizers.mulan import MuLanConfig
    from musiclm.tokenizers.semantic import W2VBert, W2VBertConfig
    from musiclm.tokenizers.soundstream import SoundStream, SoundStreamConfig

    components: dict[str, Any] = {}

    ss = SoundStreamConfig.preset(preset)
    components["soundstream"] = {
        "role": "acoustic tokens A",
        "parameters": _count(lambda: SoundStream(ss)),
        "tokens": {
            "frame_rate_hz": C.ACOUSTIC_FRAME_RATE,
            "codebooks": C.ACOUSTIC_CODEBOOKS,
            "codebook_size": C.ACOUSTIC_CODEBOOK_SIZE,
            "tokens_per_second": C.ACOUSTIC_FRAME_RATE * C.ACOUSTIC_CODEBOOKS,
            "bitrate_bps": C.ACOUSTIC_FRAME_RATE * C.ACOUSTIC_CODEBOOKS * 10,
        },
        "config": _config(ss),
    }

    wb = W2VBertConfig.preset(preset)
    components["w2vbert"] = {
        "role": "semantic features → k-means → semantic tokens S",
        "parameters": _count(lambda: W2VBert(wb)),
        "tokens": {"frame_rate_hz": C.SEMANTIC_FRAME_RATE, "codebook_size": C.SEMANTIC_CODEBOOK_SIZE,
                   "tokens_per_second": C.SEMANTIC_FRAME_RATE},
        "config": _config(wb),
    }

    mc = MuLanConfig.preset(preset)
    counts = _mulan_parameter_counts(mc)
    components["mulan"] = {
        "role": "conditioning tokens M_A (audio) / M_T (text)",
        "parameters": counts["total"],
        "parameters_by_tower": counts,
        "tokens": {"embedding_dim": C.MULAN_DIM, "codebooks": C.MULAN_CODEBOOKS,
                   "codebook_size": C.MULAN_CODEBOOK_SIZE, "tokens_per_clip": C.MULAN_CODEBOOKS,
                   "window_seconds": C.MULAN_WINDOW_SECONDS, "window_stride_seconds": C.MULAN_WINDOW_STRIDE_SECONDS},
        "config": _config(mc),
    }

    for stage in ("semantic", "coarse", "fine"):
        sc = StageConfig.preset(stage, preset)
        components[f"stage_{stage}"] = {
            "role": {"semantic": "p(S | M_A)", "coarse": "p(A levels 0-3 | S, M_A)",
                     "fine": "p(A levels 4-11 | A levels 0-3, M_A)"}[stage],
            "parameters": _count(lambda sc=sc: StageTransformer(sc.transformer)),
            "crop_seconds": sc.crop_seconds,
            "sampling_temperature": C.SAMPLING_TEMPERATURES[stage],
            "config": _config(sc),
        }
    return {"preset": preset, "sample_rate": C.SAMPLE_RATE, "components": components}


def format_description(info: dict[str, Any]) -> str:
    """The human-readable table printed by ``musiclm describe``."""
    lines = [f"preset {info['preset']}  (audio {info['sample_rate']} Hz mono)", ""]
    lines.append(f"{'component':<16} {'parameters':>14}  tokens / role")
    for name, comp in info["components"].items():
        tokens = comp.get("tokens")
        if tokens and "frame_rate_hz" in tokens:
            rate = f"{tokens['frame_rate_hz']} Hz"
            if "codebooks" in tokens:
                rate += f" × {tokens['codebooks']}"
            rate += f" × {tokens['codebook_size']} codes"
        elif tokens:
            rate = f"{tokens['codebooks']} × {tokens['codebook_size']} codes per clip"
        else:
            rate = f"crop {comp['crop_seconds']:g} s, temperature {comp['sampling_temperature']}"
        lines.append(f"{name:<16} {comp['parameters']:>14,}  {rate}  — {comp['role']}")
    lines.append("")
    lines.append("full configurations: musiclm describe --preset " + info["preset"] + " --json")
    return "\n".join(lines)
