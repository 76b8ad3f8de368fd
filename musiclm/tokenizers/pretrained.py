"""Pretrained tokenizer backends: EnCodec, HuBERT, w2v-BERT 2.0 and CLAP through ``transformers``.

Each adapter wraps a model loaded from a *local* folder (``local_files_only=True``, safetensors only:
nothing is downloaded, nothing is unpickled) behind the interface of the component it replaces, so
every caller that names a tokenizer folder can use it through :mod:`musiclm.tokenizers.backends`:

    wav 24 kHz ──EnCodec 24 kHz──▶ codes [B, K, T // 320]        75 Hz × K (8 at 6 kbps) × 1024
               ──16 kHz──HuBERT / w2v-BERT 2.0 layer L──pool 50→25 Hz──▶ [B, T // 960, D]
               ──48 kHz──CLAP audio tower, 10-s windows, 1-s stride, mean──▶ [B, D] (L2-normalised)
    text       ──CLAP text tower──▶ [B, D] (L2-normalised)

Semantic features are then quantized by *our* k-means (``semantic_kmeans/``) and CLAP embeddings by
*our* RVQ (``mulan_rvq/``), exactly as w2v-BERT and MuLan embeddings are.

``save_random_backend`` writes random-weight models in the layout of the released checkpoints
(``config.json``, ``model.safetensors``, feature extractor / tokenizer files) for tests ("tiny") and
for throughput benchmarks of the real architectures without downloads ("full").
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musiclm.audio import window_starts
from musiclm.checkpoint import CheckpointError
from musiclm.constants import (
    MULAN_WINDOW_SECONDS,
    MULAN_WINDOW_STRIDE_SECONDS,
    SAMPLE_RATE,
    SEMANTIC_FRAME_RATE,
    SEMANTIC_HOP,
)

# backend name (as backends.json spells it) -> the config.json model_type of its checkpoints
MODEL_TYPES = {"encodec": "encodec", "hubert": "hubert", "w2v-bert-2.0": "wav2vec2-bert", "clap": "clap"}
SIZES = ("tiny", "full")

SPEECH_RATE = 16_000  # HuBERT and w2v-BERT 2.0 read 16 kHz audio and give 50 frames/s
CLAP_RATE = 48_000
PICKLE_WEIGHTS = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "model.ckpt.index",
    "flax_model.msgpack",
)
# files besides the weights that change what an adapter computes; all of them go into the backend id
PROCESSING_FILES = (
    "config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)
CLAP_TEXT_MAX_LENGTH = 77  # LAION-CLAP's RoBERTa tokenizer length


# --------------------------------------------------------------------------- folders, options, ids


def _check_folder(backend: str, path: str | Path | None) -> tuple[Path, dict[str, Any]]:
    """The folder and its parsed config.json, refusing (one line) anything that is not a safetensors
    checkpoint of ``backend``."""
    if backend not in MODEL_TYPES:
        raise ValueError(f"unknown pretrained backend '{backend}', valid ones are {', '.join(MODEL_TYPES)}")
    if not path:
        raise CheckpointError(f"the '{backend}' backend needs the path of its local model folder")
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"the '{backend}' model folder {folder} does not exist")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no config.json: not a transformers model folder")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {err}") from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != MODEL_TYPES[backend]:
        raise CheckpointError(
            f"backends.json names {backend} but {folder} holds a {model_type or 'untyped'} model"
        )
    if not _weight_files(folder):
        pickled = [name for name in PICKLE_WEIGHTS if (folder / name).exists()]
        if pickled:
            raise CheckpointError(
                f"{folder} has its weights only in pickle form ({pickled[0]}); musiclm loads "
                "safetensors only: "
                "convert them on a trusted machine (save_pretrained(..., safe_serialization=True))"
            )
        raise CheckpointError(f"{folder} has no model.safetensors")
    return folder, config


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


_ID_CACHE: dict[tuple, str] = {}


def folder_id(backend: str, folder: Path) -> str:
    """``backend:sha256[:12]`` of config, weights and processing files: the same files give the same id
    wherever they lie. Cached per (path, sizes, mtimes): hashing 2 GB of weights takes seconds."""
    files = [folder / name for name in PROCESSING_FILES if (folder / name).is_file()] + _weight_files(folder)
    key = (str(folder.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _ID_CACHE:
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode() + b"\0")
            with open(file, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(block)
        _ID_CACHE[key] = f"{backend}:{digest.hexdigest()[:12]}"
    return _ID_CACHE[key]


def _options(backend: str, given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for the '{backend}' backend; "
            f"valid ones are {', '.join(sorted(defaults))}"
        )
    return {**defaults, **given}


def _encodec_settings(folder: Path, config: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Options and token rates of an EnCodec folder, from its config alone (no weights read)."""
    rate = int(config.get("sampling_rate", 0))
    if rate != SAMPLE_RATE:
        raise CheckpointError(
            f"{folder} holds a {rate} Hz EnCodec; only the {SAMPLE_RATE // 1000} kHz model fits"
        )
    if int(config.get("audio_channels", 1)) != 1:
        raise CheckpointError(
            f"{folder} holds a stereo EnCodec; only the mono {SAMPLE_RATE // 1000} kHz model fits"
        )
    if config.get("normalize") or config.get("chunk_length_s"):
        raise CheckpointError(
            f"{folder} holds an EnCodec that normalises or chunks its input: its codes alone do not decode"
        )
    hop = int(np.prod(config.get("upsampling_ratios", (8, 5, 4, 2))))
    if SAMPLE_RATE % hop or (SAMPLE_RATE // hop) % SEMANTIC_FRAME_RATE:
        raise CheckpointError(
            f"{folder}: an EnCodec hop of {hop} samples gives no whole multiple of "
            f"{SEMANTIC_FRAME_RATE} frames/s"
        )
    frame_rate = SAMPLE_RATE // hop
    codebook_size = int(config.get("codebook_size", 1024))
    bandwidths = [float(b) for b in config.get("target_bandwidths", (1.5, 3.0, 6.0, 12.0, 24.0))]
    options = _options("encodec", given, {"bandwidth": 6.0, "coarse_levels": None})
    bandwidth = float(options["bandwidth"])
    if bandwidth not in bandwidths:
        raise ValueError(f"EnCodec bandwidth {bandwidth} kbps is not one of this model's {bandwidths}")
    # the quantizer's own rule (EncodecResidualVectorQuantizer.get_num_quantizers_for_bandwidth)
    codebooks = max(1, math.floor(bandwidth * 1000 / (math.log2(codebook_size) * frame_rate)))
    # the paper's coarse stage models 4 levels (of SoundStream's 12); keep 4 while a fine level remains
    coarse = options["coarse_levels"] if options["coarse_levels"] is not None else min(4, codebooks - 1)
    if codebooks < 2 or not 0 < int(coarse) < codebooks:
        raise ValueError(
            f"EnCodec at {bandwidth} kbps gives {codebooks} codebooks: "
            f"coarse_levels must be in [1, {codebooks - 1}]"
        )
    options = {"bandwidth": bandwidth, "coarse_levels": int(coarse)}
    rates = {
        "acoustic_frame_rate": frame_rate,
        "acoustic_codebooks": codebooks,
        "acoustic_codebook_size": codebook_size,
        "coarse_levels": int(coarse),
    }
    return {"options": options, "rates": rates, "hop_length": hop}


def default_layer(backend: str, num_layers: int) -> int:
    """Which transformer layer's output the semantic features are (1-based).

    HuBERT: the middle layer (6 of 12 for HuBERT Base, whose layer-6 features are the usual k-means input).
    w2v-BERT 2.0: layer 17 of 24 (scaled for other depths), the layer whose k-means tokens MaskGCT uses as
    semantic tokens; MusicLM's own choice, the 7th MLM layer of w2v-BERT XL, is likewise past the middle."""
    if backend == "hubert":
        return max(1, num_layers // 2)
    return max(1, round(num_layers * 17 / 24))


def _semantic_settings(
    backend: str, folder: Path, config: dict[str, Any], given: dict[str, Any]
) -> dict[str, Any]:
    num_layers = int(config.get("num_hidden_layers", 0))
    options = _options(backend, given, {"layer": default_layer(backend, num_layers)})
    layer = options["layer"]
    if not isinstance(layer, int) or not 1 <= layer <= num_layers:
        raise ValueError(
            f"{backend} layer must be an integer in [1, {num_layers}] for {folder}, got {layer!r}"
        )
    if backend == "w2v-bert-2.0" and not (folder / "preprocessor_config.json").is_file():
        raise CheckpointError(
            f"{folder} has no preprocessor_config.json: w2v-BERT 2.0 needs its fbank settings"
        )
    return {"options": options, "feature_dim": int(config.get("hidden_size", 0))}


def _clap_settings(folder: Path, config: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 saves the feature extractor inside processor_config.json, earlier versions (and the
    # released checkpoints) in preprocessor_config.json
    missing = []
    if not any((folder / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")):
        missing.append("preprocessor_config.json")
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if missing:
        raise CheckpointError(
            f"{folder} lacks {', '.join(missing)}: CLAP needs its feature extractor and tokenizer"
        )
    options = _options("clap", given, {"text_max_length": CLAP_TEXT_MAX_LENGTH})
    return {"options": options, "embedding_dim": int(config.get("projection_dim", 512))}


def _settings(spec: Any) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    folder, config = _check_folder(spec.backend, spec.path)
    given = dict(spec.options or {})
    if spec.backend == "encodec":
        settings = _encodec_settings(folder, config, given)
    elif spec.backend == "clap":
        settings = _clap_settings(folder, config, given)
    else:
        settings = _semantic_settings(spec.backend, folder, config, given)
    return folder, config, settings


def backend_info(spec: Any) -> dict[str, Any]:
    """What shard metadata records about a pretrained backend (no weights are loaded): backend,
    ``transformers`` version, model_type, id (hash of config, weights and processing files), the
    resolved options and, for the acoustic role, the :class:`TokenRates` fields it sets (``rates``).
    The folder path is left out: the same files elsewhere make the same tokens."""
    folder, config, settings = _settings(spec)
    info: dict[str, Any] = {
        "backend": spec.backend,
        "version": importlib.metadata.version("transformers"),
        "musiclm": importlib.metadata.version("musiclm"),
        "model_type": config["model_type"],
        "id": folder_id(spec.backend, folder),
        "options": settings["options"],
    }
    if "rates" in settings:
        info["rates"] = settings["rates"]
    if "feature_dim" in settings:
        info["feature_dim"] = settings["feature_dim"]
    if "embedding_dim" in settings:
        info["embedding_dim"] = settings["embedding_dim"]
    return info


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars and no advisory warnings while loading (errors still raise)."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _from_pretrained(cls: type, folder: Path) -> Any:
    """``cls.from_pretrained`` offline, from safetensors, in float32; a checkpoint missing weights the
    architecture needs (which would stay random) is refused."""
    try:
        with _quiet_transformers():
            model, loading = cls.from_pretrained(
                str(folder),
                local_files_only=True,
                use_safetensors=True,
                dtype=torch.float32,
                output_loading_info=True,
            )
    except (OSError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{folder} does not load as a {cls.__name__}: {reason}") from err
    missing = sorted(loading.get("missing_keys") or [])
    mismatched = list(loading.get("mismatched_keys") or [])
    if missing or mismatched:
        example = missing[0] if missing else mismatched[0]
        example = example[0] if isinstance(example, tuple) else example
        raise CheckpointError(
            f"{folder} does not fit {cls.__name__} ({len(missing)} missing and {len(mismatched)} differently "
            f"shaped tensors, e.g. {example})"
        )
    return model.eval()


def resample(wav: torch.Tensor, rate_in: int, rate_out: int) -> torch.Tensor:
    """[B, T] -> [B, T * rate_out // rate_in] float32 on the CPU, with soxr (HQ, as ``musiclm.audio``)."""
    import soxr

    x = wav.detach().to("cpu", torch.float32).numpy()
    length = x.shape[-1] * rate_out // rate_in
    y = soxr.resample(x.T, rate_in, rate_out, quality="HQ").T  # [T', B] -> [B, T']
    y = y[:, :length]
    if y.shape[-1] < length:
        y = np.pad(y, ((0, 0), (0, length - y.shape[-1])))
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))


def _as_batch(wav: torch.Tensor) -> torch.Tensor:
    wav = torch.as_tensor(wav, dtype=torch.float32)
    if wav.dim() != 2:
        raise ValueError(f"expected mono audio [B, T], got shape {tuple(wav.shape)}")
    return wav


# --------------------------------------------------------------------------- EnCodec


class EncodecTokenizer(nn.Module):
    """EnCodec 24 kHz as the acoustic tokenizer: ``encode(wav[B, T]) -> codes[B, K, T // hop]``,
    ``decode(codes) -> wav[B, F * hop]``. Calls the encoder and quantizer directly (what
    ``EncodecModel.encode`` does for the 24 kHz model, without its padding-mask pass) so ``F`` is exactly
    ``T // hop``: the input is cut to whole frames first."""

    sample_rate = SAMPLE_RATE

    def __init__(self, model: nn.Module, settings: dict[str, Any], spec: Any):
        super().__init__()
        self.model = model.eval()
        self.spec = spec
        self.bandwidth = settings["options"]["bandwidth"]
        self.hop_length = settings["hop_length"]
        self.frame_rate = settings["rates"]["acoustic_frame_rate"]
        self.num_codebooks = settings["rates"]["acoustic_codebooks"]
        self.codebook_size = settings["rates"]["acoustic_codebook_size"]
        self.coarse_levels = settings["rates"]["coarse_levels"]

    def train(self, mode: bool = True) -> EncodecTokenizer:
        return super().train(False)  # a frozen pretrained tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        wav = _as_batch(wav)
        frames = wav.shape[-1] // self.hop_length
        if frames == 0:
            raise ValueError(
                f"audio of {wav.shape[-1]} samples is shorter than one EnCodec frame ({self.hop_length})"
            )
        x = wav[:, : frames * self.hop_length].to(self.device).unsqueeze(1)  # [B, 1, F * hop]
        emb = self.model.encoder(x)[..., :frames]  # [B, D, F]
        codes = self.model.quantizer.encode(emb, self.bandwidth)  # [K, B, F]
        return codes.transpose(0, 1).long()  # [B, K, F]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() != 3 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f"expected codes [B, {self.num_codebooks}, F], got shape {tuple(codes.shape)}")
        frames = codes.shape[-1]
        codes = codes.to(self.device).long().transpose(0, 1)  # [K, B, F]
        emb = self.model.quantizer.decode(codes)  # [B, D, F]
        wav = self.model.decoder(emb)[:, 0]  # [B, ~F * hop]
        return wav[:, : frames * self.hop_length]

    def info(self) -> dict[str, Any]:
        return backend_info(self.spec)


# --------------------------------------------------------------------------- HuBERT / w2v-BERT 2.0


class SpeechSSLFeatures(nn.Module):
    """HuBERT or w2v-BERT 2.0 hidden states of one layer as semantic features at 25 Hz:
    ``features(wav[B, T] 24 kHz) -> [B, T // 960, D]``.

    The 24 kHz input is cut to whole semantic frames, resampled to 16 kHz and padded so that the model's
    50 Hz frames are exactly twice ``T // 960`` and centred on them; pairs of frames are averaged to 25 Hz.
    Only the encoder layers up to the chosen one are kept (the rest would be computed and thrown away).
    """

    frame_rate = SEMANTIC_FRAME_RATE

    def __init__(
        self,
        model: nn.Module,
        backend: str,
        layer: int,
        spec: Any,
        feature_extractor: Any = None,
        do_normalize: bool = False,
    ):
        super().__init__()
        self.backend = backend
        self.layer = layer
        self.spec = spec
        self.preset = backend  # recorded by fit_semantic_kmeans in the k-means artifact
        self.feature_extractor = feature_extractor
        self.do_normalize = do_normalize
        self.feature_dim = int(model.config.hidden_size)
        model.encoder.layers = nn.ModuleList(list(model.encoder.layers)[:layer])
        self.model = model.eval()
        self._captured: list[torch.Tensor] = []
        # the raw output of layer L, before any final encoder norm (what hidden_states[L] holds for L < last)
        self.model.encoder.layers[-1].register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._captured.append(output[0] if isinstance(output, tuple) else output)

    def train(self, mode: bool = True) -> SpeechSSLFeatures:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_frames(self, num_samples: int) -> int:
        return num_samples // SEMANTIC_HOP

    def _inputs(self, wav16: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.backend == "hubert":
            # conv front end: 400-sample receptive field, stride 320; 40 samples each side centre frame i
            # on 320 i + 160 and give exactly 2F frames from 640F samples
            x = F.pad(wav16.unsqueeze(1), (40, 40), mode="reflect").squeeze(1)  # [B, 640F + 80]
            if self.do_normalize:
                x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
                    x.var(-1, unbiased=False, keepdim=True) + 1e-7
                )
            return {"input_values": x.to(self.device)}
        # w2v-BERT 2.0: 25-ms fbank every 10 ms, stacked in pairs (50 Hz); 120 samples each side give
        # exactly 4F fbank frames (2F stacked ones), centred like HuBERT's
        x = F.pad(wav16.unsqueeze(1), (120, 120), mode="reflect").squeeze(1)  # [B, 640F + 240]
        batch = self.feature_extractor(
            list(x.numpy()), sampling_rate=SPEECH_RATE, return_tensors="pt", return_attention_mask=True
        )
        return {k: batch[k].to(self.device) for k in ("input_features", "attention_mask")}

    @torch.no_grad()
    def features(self, wav: torch.Tensor) -> torch.Tensor:
        wav = _as_batch(wav)
        frames = self.num_frames(wav.shape[-1])
        if frames == 0:
            raise ValueError(
                f"audio of {wav.shape[-1]} samples is shorter than one semantic frame ({SEMANTIC_HOP})"
            )
        wav16 = resample(wav[:, : frames * SEMANTIC_HOP], SAMPLE_RATE, SPEECH_RATE)  # [B, 640F]
        self._captured.clear()
        try:
            self.model(**self._inputs(wav16))
            hidden = self._captured[-1]  # [B, 2F, D] at 50 Hz
        finally:
            self._captured.clear()
        if hidden.shape[1] != 2 * frames:
            raise RuntimeError(f"{self.backend} gave {hidden.shape[1]} frames for {2 * frames} expected")
        return hidden.view(hidden.shape[0], frames, 2, -1).mean(2)  # [B, F, 2, D] -> [B, F, D] at 25 Hz

    def info(self) -> dict[str, Any]:
        return backend_info(self.spec)


# --------------------------------------------------------------------------- CLAP


class ClapTowers(nn.Module):
    """CLAP's audio and text towers with their projections, as MuLan's: ``embed_audio(wav[B, T] 24 kHz)``
    is the L2-normalised mean of the embeddings of every 10-s window with a 1-s stride (audio of at most
    10 s is one window, which CLAP's processor repeat-pads), ``embed_text(list[str])``; both ``[B, D]``.

    ``is_longer`` is False for every window (none exceeds CLAP's 10 s): the processor would mark a
    random one of a batch for a fused model, which makes embeddings depend on the batch."""

    def __init__(self, model: nn.Module, processor: Any, text_max_length: int, spec: Any):
        super().__init__()
        self.model = model.eval()
        self.processor = processor
        self.text_max_length = text_max_length
        self.spec = spec
        self.preset = "clap"  # recorded by fit_mulan_rvq in the RVQ artifact
        self.embedding_dim = int(model.config.projection_dim)
        self.window = int(round(MULAN_WINDOW_SECONDS * CLAP_RATE))
        self.window_stride = int(round(MULAN_WINDOW_STRIDE_SECONDS * CLAP_RATE))

    def train(self, mode: bool = True) -> ClapTowers:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _embed_windows(self, windows: list[np.ndarray]) -> torch.Tensor:
        extractor = self.processor.feature_extractor
        features = extractor(windows, sampling_rate=CLAP_RATE, return_tensors="pt")["input_features"]
        is_longer = torch.zeros(len(windows), 1, dtype=torch.bool, device=self.device)
        pooled = self.model.audio_model(
            input_features=features.to(self.device), is_longer=is_longer
        ).pooler_output
        return F.normalize(self.model.audio_projection(pooled), dim=-1)  # [N, D]

    @torch.no_grad()
    def embed_audio(self, wav: torch.Tensor, max_windows_per_call: int = 32) -> torch.Tensor:
        wav = _as_batch(wav)
        if wav.shape[-1] == 0:
            raise ValueError("cannot embed empty audio")
        wav48 = resample(wav, SAMPLE_RATE, CLAP_RATE).numpy()  # [B, 2T]
        B, T = wav48.shape
        starts = window_starts(T, self.window, self.window_stride) if T > self.window else [0]
        length = min(T, self.window)
        windows = [wav48[b, s : s + length] for b in range(B) for s in starts]  # B * W arrays, row-major
        emb = torch.cat(
            [
                self._embed_windows(windows[i : i + max_windows_per_call])
                for i in range(0, len(windows), max_windows_per_call)
            ]
        )  # [B * W, D]
        return F.normalize(emb.view(B, len(starts), -1).mean(1), dim=-1)  # [B, D]

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("embed_text takes a list of strings, not one string")
        batch = self.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.text_max_length, return_tensors="pt"
        ).to(self.device)
        pooled = self.model.text_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output
        return F.normalize(self.model.text_projection(pooled), dim=-1)  # [B, D]

    def info(self) -> dict[str, Any]:
        return backend_info(self.spec)


# --------------------------------------------------------------------------- loaders (called by backends.py)


def load_acoustic(spec: Any, device: Any = "cpu") -> EncodecTokenizer:
    folder, _, settings = _settings(spec)
    from transformers import EncodecModel

    return EncodecTokenizer(_from_pretrained(EncodecModel, folder), settings, spec).to(device).eval()


def load_semantic_features(spec: Any, device: Any = "cpu") -> SpeechSSLFeatures:
    folder, config, settings = _settings(spec)
    layer = settings["options"]["layer"]
    if spec.backend == "hubert":
        from transformers import HubertModel, Wav2Vec2FeatureExtractor

        model = _from_pretrained(HubertModel, folder)
        # the models with a layer-norm conv front end were trained on normalised audio (HF's convention)
        do_normalize = config.get("feat_extract_norm") == "layer"
        if (folder / "preprocessor_config.json").is_file():
            with _quiet_transformers():
                extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder), local_files_only=True)
            if extractor.sampling_rate != SPEECH_RATE:
                raise CheckpointError(
                    f"{folder} expects {extractor.sampling_rate} Hz audio, not {SPEECH_RATE}"
                )
            do_normalize = bool(extractor.do_normalize)
        adapter = SpeechSSLFeatures(model, "hubert", layer, spec, do_normalize=do_normalize)
    else:
        from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertModel

        model = _from_pretrained(Wav2Vec2BertModel, folder)
        with _quiet_transformers():
            extractor = SeamlessM4TFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
        if extractor.sampling_rate != SPEECH_RATE or extractor.num_mel_bins * extractor.stride != int(
            config.get("feature_projection_input_dim", 160)
        ):
            raise CheckpointError(f"{folder}: its feature extractor does not match the model's input")
        adapter = SpeechSSLFeatures(model, "w2v-bert-2.0", layer, spec, feature_extractor=extractor)
    return adapter.to(device).eval()


def load_conditioner_towers(spec: Any, device: Any = "cpu") -> ClapTowers:
    folder, _, settings = _settings(spec)
    from transformers import ClapModel, ClapProcessor

    model = _from_pretrained(ClapModel, folder)
    try:
        with _quiet_transformers():
            processor = ClapProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{folder}: CLAP's processor does not load: {str(err).splitlines()[0]}"
        ) from err
    if processor.feature_extractor.sampling_rate != CLAP_RATE:
        raise CheckpointError(
            f"{folder}: CLAP's feature extractor expects {processor.feature_extractor.sampling_rate} Hz"
        )
    return ClapTowers(model, processor, int(settings["options"]["text_max_length"]), spec).to(device).eval()


# --------------------------------------------------------------------------- random-weight folders


def _encodec_config(size: str) -> Any:
    from transformers import EncodecConfig

    if size == "full":
        return EncodecConfig()  # facebook/encodec_24khz
    # the real strides (320 samples, 75 Hz) and codebooks (1024, 8 at 6 kbps), tiny widths
    return EncodecConfig(
        target_bandwidths=[1.5, 3.0, 6.0], hidden_size=16, num_filters=4, num_lstm_layers=1, codebook_dim=16
    )


def _hubert_config(size: str) -> Any:
    from transformers import HubertConfig

    if size == "full":
        return HubertConfig()  # facebook/hubert-base-ls960
    # the real conv strides (320 samples at 16 kHz, 50 Hz), tiny widths
    return HubertConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )


def _w2vbert_config(size: str) -> Any:
    from transformers import Wav2Vec2BertConfig

    if size == "full":
        return Wav2Vec2BertConfig()  # facebook/w2v-bert-2.0
    return Wav2Vec2BertConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        conv_depthwise_kernel_size=5,
    )


def _clap_config(size: str, vocab_size: int) -> Any:
    from transformers import ClapAudioConfig, ClapConfig, ClapTextConfig

    if size == "full":
        return ClapConfig()  # laion/clap-htsat-unfused
    text = ClapTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=CLAP_TEXT_MAX_LENGTH + 3,
        projection_dim=32,
    )
    # HTSAT keeps its 256 × 256 spectrogram image (64 mels × 1024 frames); widths and depths are tiny
    audio = ClapAudioConfig(
        patch_embeds_hidden_size=8,
        hidden_size=64,
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 2, 2],
        projection_dim=32,
    )
    return ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=32)


def _byte_level_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A tiny byte-level BPE vocabulary (RoBERTa's special tokens, the 256 byte symbols, a few merges of
    common English pairs): every string tokenizes, nothing is downloaded."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for symbol in bytes_to_unicode().values():
        vocab.setdefault(symbol, len(vocab))
    merges = []
    for pair in ("Ġ a", "Ġ t", "h e", "i n", "e r", "o n", "Ġt he", "a n", "r e", "Ġ s", "Ġ m", "Ġ p"):
        left, right = pair.split()
        merges.append((left, right))
        vocab.setdefault(left + right, len(vocab))
    vocab["<mask>"] = len(vocab)
    return vocab, merges


@torch.no_grad()
def _init_encodec_codebooks(model: nn.Module) -> None:
    """EnCodec starts its codebooks at zero (its training fills them by k-means, then EMA): draw each
    level's codes from the residuals of the random encoder's frames of noise, so that random weights
    still tokenize audio into many different ids at every level."""
    frames = model.encoder(torch.randn(1, 1, 2 * SAMPLE_RATE) * 0.1)[0].T  # [F, D]
    residual = frames
    for layer in model.quantizer.layers:
        book = layer.codebook
        picks = residual[torch.randint(0, residual.shape[0], (book.embed.shape[0],))]  # [codebook_size, D]
        book.embed.copy_(picks + 0.1 * residual.std() * torch.randn_like(picks))
        book.embed_avg.copy_(book.embed)
        book.cluster_size.fill_(1.0)
        residual = residual - book.embed[torch.cdist(residual, book.embed).argmin(-1)]


def save_random_backend(backend: str, out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """A random-weight ``backend`` model in the layout of its released checkpoint: ``config.json``,
    ``model.safetensors`` and the feature extractor / tokenizer files its adapter reads. ``tiny``: small
    widths with the real rates (tests); ``full``: the released architecture (throughput benchmarks)."""
    if backend not in MODEL_TYPES:
        raise ValueError(f"unknown pretrained backend '{backend}', valid ones are {', '.join(MODEL_TYPES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size '{size}', valid sizes are {', '.join(SIZES)}")
    import transformers as tf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(seed)
        if backend == "encodec":
            model = tf.EncodecModel(_encodec_config(size))
            _init_encodec_codebooks(model)
            processors = [tf.EncodecFeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE)]
        elif backend == "hubert":
            config = _hubert_config(size)
            model = tf.HubertModel(config)
            processors = [
                tf.Wav2Vec2FeatureExtractor(
                    feature_size=1,
                    sampling_rate=SPEECH_RATE,
                    padding_value=0.0,
                    do_normalize=config.feat_extract_norm == "layer",
                    return_attention_mask=config.feat_extract_norm == "layer",
                )
            ]
        elif backend == "w2v-bert-2.0":
            model = tf.Wav2Vec2BertModel(_w2vbert_config(size))
            processors = [tf.SeamlessM4TFeatureExtractor()]
        else:
            vocab, merges = _byte_level_vocab()
            model = tf.ClapModel(_clap_config(size, len(vocab)))
            tokenizer = tf.RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=512)
            extractor = tf.ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad")
            processors = [tf.ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer)]
        model.save_pretrained(str(out), safe_serialization=True)
        for processor in processors:
            processor.save_pretrained(str(out))
    return out


def count_parameters(backend: str, size: str = "full") -> int:
    """Parameters of the ``size`` architecture of ``backend`` (built on the meta device, unallocated)."""
    import transformers as tf

    builders = {
        "encodec": lambda: tf.EncodecModel(_encodec_config(size)),
        "hubert": lambda: tf.HubertModel(_hubert_config(size)),
        "w2v-bert-2.0": lambda: tf.Wav2Vec2BertModel(_w2vbert_config(size)),
        "clap": lambda: tf.ClapModel(_clap_config(size, len(_byte_level_vocab()[0]))),
    }
    if backend not in builders:
        raise ValueError(f"unknown pretrained backend '{backend}', valid ones are {', '.join(builders)}")
    with torch.device("meta"), _quiet_transformers():
        return sum(p.numel() for p in builders[backend]().parameters())
