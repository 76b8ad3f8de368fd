"""The plan executor behind the HTTP layer: requests become specs, specs become calls to the deployments.

:class:`MusicLMService` does not know the algorithm: it *executes*
:func:`musiclm.generation.plan.plan_steps`, the generator that the in-process ``Cascade.stream`` executes
too, sending each ``Call`` to the model deployment of its kind and the result back. A stage call for N
samples becomes N single-row calls (:func:`~musiclm.orchestration.batching.split_rows`), so rows of
concurrent requests share forward passes. It also admits requests (a bounded count per ingress replica,
429 beyond it) and refuses what only the loaded models can refuse, as :class:`ClientError`.

The codec deployment decodes each new chunk with the left context the plan gives, statelessly; the
overlap join of :class:`~musiclm.generation.windows.ChunkDecoder` runs here, per request, on the decoded
audio (:class:`_DecodedAudio`). :class:`LocalHandle` stands in for a ``DeploymentHandle`` in process.
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import torch

from musiclm.constants import SAMPLE_RATE
from musiclm.generation.plan import Call, plan_steps, segment_edges
from musiclm.generation.spec import GenerationSpec, Segment
from musiclm.generation.windows import ChunkDecoder
from musiclm.orchestration.batching import split_rows
from musiclm.orchestration.schemas import STAGES, GenerateRequest
from musiclm.orchestration.serve_config import MODEL_DEPLOYMENTS, ServeConfig
from musiclm.orchestration.serve_metrics import RequestMetrics

RETRY_AFTER_S = 5  # the Retry-After of a 429 / 503 (a full queue, an unavailable stage)


class ClientError(Exception):
    """A request the server refuses: answered as a JSON 4xx naming the field."""

    def __init__(self, status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers


class _DecodedAudio:
    """A 'codec' whose ``decode`` returns audio the Codec deployment already decoded: lets the ingress
    run :class:`ChunkDecoder`'s overlap join (stateful, per request) without holding a codec."""

    def __init__(self) -> None:
        self.audio: np.ndarray | None = None  # [N, T] of one decode call
        self.cursor = 0  # rows handed out (the decoder may ask for all rows at once or one by one)

    def set(self, audio: np.ndarray) -> None:
        self.audio, self.cursor = audio, 0

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        rows = codes.shape[0]
        if self.audio is None or self.cursor + rows > self.audio.shape[0]:
            raise RuntimeError("decode called without the matching decoded audio")
        part = self.audio[self.cursor : self.cursor + rows]
        self.cursor += rows
        return torch.from_numpy(np.ascontiguousarray(part))


class MusicLMService:
    """Validates requests and executes their plans with deployment handles (or local stand-ins).

    ``handles``: name → an object with ``method.remote(...)`` returning an awaitable, for the five model
    deployments (Serve's ``DeploymentHandle``, or :class:`LocalHandle` in process).
    """

    def __init__(self, handles: dict[str, Any], config: ServeConfig) -> None:
        missing = set(MODEL_DEPLOYMENTS) - set(handles)
        if missing:
            raise ValueError(f"MusicLMService needs handles for {sorted(missing)}")
        self.handles = handles
        self.config = config
        self.active = 0  # generations admitted and not finished (this replica)
        self.metrics = RequestMetrics()
        self._configs: dict[str, Any] | None = None
        self._capabilities: dict[str, bool] | None = None

    # ---- what the stages are

    async def stage_configs(self) -> dict[str, Any]:
        if self._configs is None:
            found = await asyncio.gather(*(self.handles[s].stage_config.remote() for s in STAGES))
            self._configs = dict(zip(STAGES, found))
        return self._configs

    async def capabilities(self) -> dict[str, bool]:
        if self._capabilities is None:
            self._capabilities = await self.handles["conditioner"].capabilities.remote()
        return self._capabilities

    # ---- requests -> specs

    async def spec(
        self, request: GenerateRequest, melody_tokens: np.ndarray | None = None, melody_contour: np.ndarray | None = None
    ) -> GenerationSpec:
        """The plan's spec for a validated request (with the melody's tokens and contour, for an upload); a
        ClientError for what only the models can refuse."""
        configs = await self.stage_configs()
        segments = tuple(Segment(prompt, seconds) for prompt, seconds in request.segments)
        try:
            spec = GenerationSpec(
                segments=segments, seed=request.seed, num_samples=request.num_samples,
                temperatures=request.temperatures.model_dump(exclude_none=True) if request.temperatures else None,
                top_k=request.top_k, top_p=request.top_p, guidance_scale=request.guidance_scale,
                melody_tokens=melody_tokens, rerank=request.rerank, melody_contour=melody_contour,
                pitch_guidance=request.pitch_guidance if melody_contour is not None else 0.0,
            )
        except ValueError as exc:
            raise ClientError(422, None, str(exc)) from exc
        if request.pitch_guidance:
            if melody_contour is None:
                raise ClientError(422, "pitch_guidance", "pitch_guidance steers toward a melody: upload one")
            if not configs["coarse"].contour:
                raise ClientError(422, "pitch_guidance", "the coarse stage was trained without the melody contour "
                                                         "(--option contour=true), so it cannot be steered")
            if not await self.handles["coarse"].has_pitch_probe.remote():
                raise ClientError(422, "pitch_guidance", "this deployment has no pitch probe (checkpoints/pitch_probe; "
                                                         "`musiclm train pitch_probe`)")
        try:
            segment_edges(spec, configs["semantic"].rates.semantic_frame_rate)
        except ValueError as exc:
            raise ClientError(422, "story" if request.story is not None else "seconds", str(exc)) from exc
        if request.rerank and not (await self.capabilities())["score"]:
            raise ClientError(422, "rerank", "re-ranking needs a conditioner with an audio and a text tower")
        if request.guidance_scale != 1.0 and not all(hasattr(c.layout, "null") for c in configs.values()):
            raise ClientError(422, "guidance_scale", "these stages have no null id: they cannot be guided")
        try:  # what plan_steps checks before its first call (melody against the stages, configs)
            next(plan_steps(spec, configs))
        except ValueError as exc:
            raise ClientError(422, "melody" if melody_tokens is not None else None, str(exc)) from exc
        return spec

    def total_frames(self, spec: GenerationSpec, configs: dict[str, Any]) -> int:
        """Audio frames per channel the plan produces (whole 40-ms semantic frames)."""
        rate = configs["semantic"].rates.semantic_frame_rate
        return segment_edges(spec, rate)[-1] * SAMPLE_RATE // rate

    async def melody_tokens(self, wav: np.ndarray) -> np.ndarray:
        if not (await self.capabilities())["melody"]:
            raise ClientError(
                422, "melody", "this server's checkpoints have no melody tokenizer (melody/ and melody_rvq/)"
            )
        tokens = await self.handles["conditioner"].melody_tokens.remote({"audio": wav[None].astype(np.float32)})
        return np.asarray(tokens)[0]  # [1, Fm, Q] -> [Fm, Q]

    # ---- admission

    def admit(self) -> None:
        if self.active >= self.config.max_queued_requests:
            raise ClientError(
                429, None,
                f"the server is busy ({self.active} generations queued or running, at most "
                f"{self.config.max_queued_requests}); retry later",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        self.active += 1

    def release(self) -> None:
        self.active = max(0, self.active - 1)

    # ---- execution

    async def _execute(self, call: Call, decoder: ChunkDecoder, decoded: _DecodedAudio, n: int) -> Any:
        kind, kwargs = call.kind, call.kwargs
        if kind == "condition":
            tokens = await asyncio.gather(
                *(self.handles["conditioner"].tokens.remote({"prompt": p}) for p in kwargs["prompts"])
            )
            return np.concatenate(tokens, axis=0)  # [P, Qm]
        if kind in STAGES:
            parts = await asyncio.gather(*(self.handles[kind].generate.remote(row) for row in split_rows(kwargs, n)))
            return np.concatenate(parts, axis=0)
        if kind == "decode":
            codes, context = np.asarray(kwargs["codes"]), kwargs.get("context")
            full = codes if context is None or np.asarray(context).shape[-1] == 0 else np.concatenate(
                [np.asarray(context), codes], axis=-1
            )  # [N, K, c + f]
            rows = [{"codes": np.ascontiguousarray(full[i : i + 1])} for i in range(full.shape[0])]
            audio = await asyncio.gather(*(self.handles["codec"].decode.remote(row) for row in rows))
            decoded.set(np.concatenate(audio, axis=0))  # N x [1, T] -> [N, T]
            return decoder(codes, context, kwargs.get("final", False))
        if kind == "score":
            audio = np.asarray(kwargs["audio"], dtype=np.float32)
            rows = [{"audio": audio[i : i + 1], "prompt": kwargs["prompt"]} for i in range(audio.shape[0])]
            scores = await asyncio.gather(*(self.handles["conditioner"].score.remote(row) for row in rows))
            return np.concatenate(scores)  # [N]
        raise RuntimeError(f"the serve executor has no '{kind}' call")

    async def run(self, spec: GenerationSpec) -> AsyncIterator[dict[str, Any]]:
        """Execute the plan; yield each ``emit`` call's kwargs (``audio`` [N, T_i], and scores after rerank)."""
        configs = await self.stage_configs()
        decoded = _DecodedAudio()
        decoder = ChunkDecoder(decoded)
        steps = plan_steps(spec, configs)
        result = None
        while True:
            try:
                call = steps.send(result)
            except StopIteration:
                return
            if call.kind == "emit":
                result = None
                yield call.kwargs
            else:
                result = await self._execute(call, decoder, decoded, spec.num_samples)

    async def collect(self, spec: GenerationSpec) -> tuple[np.ndarray, dict[str, Any]]:
        """The whole audio [N, T] (and the last emit's extras: scores, order)."""
        chunks, extras = [], {}
        async for emitted in self.run(spec):
            chunks.append(np.asarray(emitted["audio"], dtype=np.float32))
            extras = {k: v for k, v in emitted.items() if k != "audio"}
        return np.concatenate(chunks, axis=1), extras


class LocalHandle:
    """A deployment's object in this process called like a ``DeploymentHandle`` (``handle.method.remote(x)``
    returns an awaitable): the in-process app the fuzz tests, the web test and the benchmark's baseline use."""

    def __init__(self, instance: Any) -> None:
        self._instance = instance

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._instance, name)

        class _Method:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> Any:
                result = method(*args, **kwargs)
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    return result
                future = asyncio.get_running_loop().create_future()
                future.set_result(result)
                return future

        return _Method()
