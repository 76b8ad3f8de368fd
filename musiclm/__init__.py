"""MusicLM as a data pipeline: Beam tokenization, Ray Train stages, Ray Serve endpoint."""

__version__ = "0.1.0"
