"""Rates fixed by the MusicLM paper; every preset (tiny included) keeps them so that
token shards, stage layouts and the cascade agree whatever the model sizes are."""

SAMPLE_RATE = 24_000  # Hz, SoundStream's and therefore the whole system's rate

ACOUSTIC_HOP = 480  # samples per SoundStream frame (total encoder stride)
ACOUSTIC_FRAME_RATE = SAMPLE_RATE // ACOUSTIC_HOP  # 50 Hz
ACOUSTIC_CODEBOOKS = 12  # RVQ levels
ACOUSTIC_CODEBOOK_SIZE = 1024
COARSE_LEVELS = 4  # the coarse stage models levels [0, 4), the fine stage [4, 12)

SEMANTIC_HOP = 960  # samples per semantic frame
SEMANTIC_FRAME_RATE = SAMPLE_RATE // SEMANTIC_HOP  # 25 Hz
SEMANTIC_CODEBOOK_SIZE = 1024

MULAN_DIM = 128
MULAN_CODEBOOKS = 12
MULAN_CODEBOOK_SIZE = 1024
MULAN_WINDOW_SECONDS = 10.0  # MuLan sees 10-s windows ...
MULAN_WINDOW_STRIDE_SECONDS = 1.0  # ... averaged with a 1-s stride over longer audio

SAMPLING_TEMPERATURES = {"semantic": 1.0, "coarse": 0.95, "fine": 0.4}

SHARD_SCHEMA_VERSION = 1
