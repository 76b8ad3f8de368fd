"""Rates fixed by the MusicLM paper; every preset (tiny included) keeps them so that
token shards, stage layouts and the cascade agree whatever the model sizes are.

They are the *defaults* of ``musiclm.tokenizers.backends.TokenRates``: a pretrained acoustic backend
(EnCodec: 75 Hz x 8 x 1024) makes tokens at other rates, which the shards record and the stage
configs carry; code that handles tokens reads the rates from there, not from these constants."""

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

# 2: token samples record ``token_info`` (backends, versions, rates) and acoustic tokens may be [F, K]
# at the backend's rate; version-1 shards (SoundStream's [F, 12] at 50 Hz, no token_info) still train
SHARD_SCHEMA_VERSION = 2

# melody conditioning (appendix C): one 192-d embedding per 4 s of audio, 3-s hop (10 s -> 3), RVQ 24 x 512
MELODY_DIM = 192
MELODY_WINDOW_SECONDS = 4.0
MELODY_HOP_SECONDS = 3.0
MELODY_CODEBOOKS = 24
MELODY_CODEBOOK_SIZE = 512

# long generation (section 6): 30-s semantic windows advance by 15 s, keeping the last 15 s as prefix
LONG_WINDOW_SECONDS = 30.0
LONG_STRIDE_SECONDS = 15.0
