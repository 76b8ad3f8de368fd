"""A system checkpoint folder of untrained models, for serving tests and benchmarks.

The HTTP layer, batching, streaming and every refusal can be checked against noise: what they need is a
complete folder the cascade loads (tokenizers, three stages, optionally a melody tokenizer), not a
trained one. Saving it takes seconds; training one takes the pipeline.
"""

from pathlib import Path

import torch

from musiclm.orchestration.schemas import STAGES


def save_random_system(ckpt_dir: str | Path, preset: str = "tiny", melody: bool = False, seed: int = 0,
                       pitch_probe: bool = False) -> Path:
    """A complete system checkpoint folder of *untrained* models (tokenizers as
    ``bundle.save_random_tokenizers``, random stages; with ``melody``, a melody tokenizer and stages
    conditioned on it; with ``pitch_probe`` too, a coarse stage with the contour and an untrained pitch probe
    on the codec's code vectors, so that ``pitch_guidance`` runs): for serving tests and benchmarks, where
    noise is all the HTTP layer needs."""
    from musiclm.checkpoint import save_artifact
    from musiclm.models.stages import StageConfig
    from musiclm.models.transformer import StageTransformer
    from musiclm.tokenizers.bundle import save_random_tokenizers
    from musiclm.tokenizers.melody import load_melody_tokenizer, save_random_melody

    root = Path(ckpt_dir)
    save_random_tokenizers(root, preset, seed)
    melody_codebooks = melody_size = 0
    if melody:
        save_random_melody(root, preset, seed)
        tokenizer = load_melody_tokenizer(root, preset)
        melody_codebooks, melody_size = tokenizer.num_codebooks, tokenizer.codebook_size
    torch.manual_seed(seed)
    for stage in STAGES:
        extra = {"melody_codebooks": melody_codebooks, "melody_codebook_size": melody_size} if melody else {}
        if pitch_probe and stage == "coarse":
            extra["contour"] = True
        config = StageConfig.preset(stage, preset, **extra)
        model = StageTransformer(config.transformer)
        save_artifact(root / stage, kind=stage, preset=preset, config=config, state_dict=model.state_dict(),
                      meta={"untrained": True, "seed": seed})
    if pitch_probe:
        if not melody:
            raise ValueError("a pitch probe steers toward a melody: save_random_system(..., melody=True)")
        from musiclm.models.pitch_probe import PitchProbe, PitchProbeConfig
        from musiclm.tokenizers.backends import load_acoustic
        from musiclm.training.code_embeddings import acoustic_code_vectors

        vectors = acoustic_code_vectors(load_acoustic(root))  # [K, V, D]
        coarse = StageConfig.preset("coarse", preset).rates.coarse_levels
        probe = PitchProbe(PitchProbeConfig.preset(preset, coarse, vectors.shape[1], vectors.shape[2]))
        probe.code_vectors.copy_(vectors[:coarse])
        save_artifact(root / "pitch_probe", kind="pitch_probe", preset=preset, config=probe.config,
                      state_dict=probe.state_dict(), meta={"untrained": True, "seed": seed})
    return root
