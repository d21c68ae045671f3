"""`openai_vlm`: label videos with any OpenAI-compatible chat-completions VLM (GPT-4o, vLLM, SGLang).

One request per video: `num_frames` frames sampled over the temporal cells, each drawn with
the numbered `(Hp, Wp)` grid (set-of-marks) and sent as a base64 PNG data URL, after the
versioned instructions of `prompts.py`. The answer is requested as JSON (structured outputs
with a JSON schema where the endpoint supports it, `json_object` or plain text otherwise),
validated, and re-asked with the validation error up to `max_reasks` times; a video whose
answer is still invalid becomes a `LabelFailure` carrying the raw answer.

Transport: 429, 5xx, 408/409, timeouts and connection errors are retried with exponential
backoff and jitter, honouring `retry-after-ms` / `Retry-After`; a requests-per-minute and a
tokens-per-minute limiter pace the requests; 401/403/404 stop the run (`TeacherFatalError`).
The API key is read from the environment variable named by `api_key_env` when the client is
built; it is never logged, stored or put in an error message (any text that would carry it
is redacted).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email.utils
import io
import json
import math
import os
import random
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image, ImageDraw, ImageFont

from halo_jax.align.patches import cell_bounds, cell_of_index
from halo_jax.config import check_fields
from halo_jax.teachers import prompts as prompts_lib
from halo_jax.teachers.base import (
    DEFAULT_ASPECTS,
    LabelError,
    LabelFailure,
    Teacher,
    TeacherFatalError,
    check_grid,
    make_record,
    score_problems,
    teacher_identity,
    validate_label,
)

RESPONSE_FORMATS = ("json_schema", "json_object", "text")
IMAGE_DETAILS = ("low", "high", "auto")
_RETRY_STATUSES = (408, 409, 429)
_FATAL_STATUSES = (401, 403, 404)


@dataclasses.dataclass(frozen=True)
class OpenAIVLMConfig:
    """Configuration of the OpenAI-compatible VLM teacher (mirrored in the run config's `label.openai`).

    Prices are USD per 1M tokens (GPT-4o list prices by default). `base_url=""` uses the
    OpenAI API; a vLLM/SGLang server is e.g. `http://localhost:8000/v1` with `api_key_env=""`
    (no key) and usually `response_format="json_schema"` (both support it) or "json_object".
    """

    model: str = "gpt-4o"
    base_url: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    prompt_version: str = "v1"
    aspects: tuple[str, ...] = DEFAULT_ASPECTS
    grid: tuple[int, int, int] = (2, 2, 2)
    aspect_descriptions: tuple[tuple[str, str], ...] = ()  # (aspect, description) overrides
    num_frames: int = 8            # frames sent per video, spread over the Tp temporal segments
    image_size: int = 512          # longer side of each rendered frame in pixels (0: keep the frame's size)
    image_detail: str = "low"      # "low" (85 tokens per image on GPT-4o), "high" or "auto"
    response_format: str = "json_schema"
    temperature: float = 0.0
    max_tokens: int = 2048
    timeout_s: float = 120.0
    max_retries: int = 6           # transport retries per request (429/5xx/408/409/timeouts/connection)
    backoff_base_s: float = 1.0    # delay before retry k (0-based): min(max, base * 2**k) * (1 + jitter*U)
    backoff_max_s: float = 60.0
    backoff_jitter: float = 0.5
    retry_after_max_s: float = 300.0   # longest Retry-After honoured (longer ones are clipped)
    max_reasks: int = 2            # re-asks after an invalid answer, each with the validation error
    requests_per_minute: float = 0.0   # 0: no limit
    tokens_per_minute: float = 0.0     # 0: no limit; counts estimated prompt tokens + max_tokens
    price_input_per_1m: float = 2.5
    price_output_per_1m: float = 10.0
    seed: int = 0                  # jitter RNG seed

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"OpenAIVLMConfig.{field}={getattr(self, field)!r}: {why}")

        if not self.model:
            raise bad("model", "name the served model, e.g. 'gpt-4o' or the vLLM --served-model-name")
        if self.response_format not in RESPONSE_FORMATS:
            raise bad("response_format", f"choose one of {RESPONSE_FORMATS}")
        if self.image_detail not in IMAGE_DETAILS:
            raise bad("image_detail", f"choose one of {IMAGE_DETAILS}")
        check_grid(self.grid)
        if not self.aspects or len(set(self.aspects)) != len(self.aspects):
            raise bad("aspects", "give at least one aspect, each once")
        if self.num_frames < self.grid[0]:
            raise bad("num_frames", f"must be >= the grid's {self.grid[0]} temporal segments (one frame each)")
        if self.image_size < 0 or self.max_tokens < 1 or self.timeout_s <= 0:
            raise bad("image_size" if self.image_size < 0 else "max_tokens" if self.max_tokens < 1 else "timeout_s",
                      "must be positive (image_size may be 0)")
        for f in ("max_retries", "max_reasks", "backoff_base_s", "backoff_max_s", "backoff_jitter",
                  "retry_after_max_s", "requests_per_minute", "tokens_per_minute",
                  "price_input_per_1m", "price_output_per_1m"):
            if getattr(self, f) < 0:
                raise bad(f, "must be >= 0")
        prompts_lib.get_prompt(self.prompt_version)
        prompts_lib.aspect_descriptions(self.aspects, dict(self.aspect_descriptions))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> OpenAIVLMConfig:
        """Build from a dict / ml_collections ConfigDict (lists become tuples); unknown keys are an error."""
        check_fields(cls, values)

        def tup(x: Any) -> Any:
            return tuple(tup(v) for v in x) if isinstance(x, (list, tuple)) else x

        return cls(**{k: tup(v) for k, v in values.items()})

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        return (prompt_tokens * self.price_input_per_1m + completion_tokens * self.price_output_per_1m) / 1e6


# ---- frames and set-of-marks ----------------------------------------------------------------

def sample_frames(total_frames: int, num_frames: int, tp: int) -> list[tuple[int, int]]:
    """`(frame index, temporal segment)` of the frames sent: spread evenly inside every segment.

    Segment t covers frames [floor(t*F/Tp), floor((t+1)*F/Tp)) (`align.patches.cell_bounds`);
    it gets floor((t+1)*N/Tp) - floor(t*N/Tp) of the N frames, at the centres of equal
    sub-intervals (duplicates dropped when a segment is shorter than its share).
    """
    bounds = cell_bounds(total_frames, tp)
    share = cell_bounds(num_frames, tp) if num_frames >= tp else None
    if share is None:
        raise ValueError(f"num_frames={num_frames} < {tp} temporal segments: every segment needs a frame")
    out: list[tuple[int, int]] = []
    for t in range(tp):
        lo, hi, k = int(bounds[t]), int(bounds[t + 1]), int(share[t + 1] - share[t])
        picks = sorted({lo + int((j + 0.5) * (hi - lo) / k) for j in range(k)})
        out.extend((f, t) for f in picks)
    return out


def render_size(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(height, width) of a rendered frame: longer side scaled to `image_size` (0: unchanged)."""
    if image_size <= 0:
        return height, width
    s = image_size / max(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


def draw_set_of_marks(frame: np.ndarray, hp: int, wp: int, image_size: int,
                      style: prompts_lib.SetOfMarksStyle) -> Image.Image:
    """The frame resized (nearest when enlarging, Lanczos when shrinking) with the numbered grid.

    Grid lines sit on the cell boundaries of `align.patches` (pixel boundary b maps to
    b * new_size / old_size); cell k = r*Wp + c + 1 is numbered in its top-left corner.
    """
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"a frame must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
    h, w = frame.shape[:2]
    nh, nw = render_size(h, w, image_size)
    img = Image.fromarray(frame, "RGB")
    if (nh, nw) != (h, w):
        resample = Image.Resampling.NEAREST if nh >= h else Image.Resampling.LANCZOS
        img = img.resize((nw, nh), resample)
    draw = ImageDraw.Draw(img)
    ys = [round(b * nh / h) for b in cell_bounds(h, hp)]
    xs = [round(b * nw / w) for b in cell_bounds(w, wp)]
    lw = max(1, round(style.line_width_frac * max(nh, nw)))
    font = ImageFont.load_default(size=max(style.min_font_px, round(style.font_frac * min(nh, nw))))
    pad = max(1, lw)
    for r in range(hp):
        for c in range(wp):
            text = str(r * wp + c + 1)
            x0, y0 = xs[c] + pad + lw // 2, ys[r] + pad + lw // 2
            box = draw.textbbox((x0, y0), text, font=font)
            draw.rectangle([box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad], fill=style.label_bg_rgb)
            draw.text((x0, y0), text, fill=style.label_rgb, font=font)
    for x in xs[1:-1]:  # lines last: a number box never hides a boundary
        draw.line([(x, 0), (x, nh)], fill=style.line_rgb, width=lw)
    for y in ys[1:-1]:
        draw.line([(0, y), (nw, y)], fill=style.line_rgb, width=lw)
    return img


def png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_tokens(height: int, width: int, detail: str) -> int:
    """GPT-4o's image token count: 85 at low detail; at high/auto, 85 + 170 per 512px tile after
    fitting in 2048x2048 and scaling the shorter side down to 768."""
    if detail == "low":
        return 85
    s = min(1.0, 2048 / max(height, width))
    h, w = height * s, width * s
    s = min(1.0, 768 / min(h, w))
    h, w = h * s, w * s
    return 85 + 170 * math.ceil(h / 512) * math.ceil(w / 512)


def text_tokens(text: str) -> int:
    """Rough token count of English/JSON text (about 4 characters per token)."""
    return math.ceil(len(text) / 4)


# ---- answers -------------------------------------------------------------------------------

_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


def parse_answer(text: str | None, aspects: Sequence[str], grid: Sequence[int]) -> tuple[dict, dict]:
    """`(video_scores, patch_scores)` from a VLM answer, or `ValueError` saying what is wrong.

    Accepts the bare JSON object, one fenced in ``` / ```json, or one embedded in prose.
    """
    if text is None or not text.strip():
        raise ValueError("the answer was empty")
    body = text.strip()
    m = _FENCE.match(body)
    if m:
        body = m.group(1)
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        i, j = body.find("{"), body.rfind("}")
        try:
            obj = json.loads(body[i:j + 1]) if 0 <= i < j else None
        except json.JSONDecodeError:
            obj = None
        if obj is None:
            raise ValueError(f"the answer is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"the answer must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("video_scores", "patch_scores") if k not in obj]
    if missing:
        raise ValueError(f"the answer lacks {missing}; it needs both \"video_scores\" and \"patch_scores\"")
    problems = score_problems(obj["video_scores"], obj["patch_scores"], aspects, grid)
    if problems:
        head = "; ".join(problems[:5])
        more = f"; and {len(problems) - 5} more problem(s)" if len(problems) > 5 else ""
        raise ValueError(head + more)
    return obj["video_scores"], obj["patch_scores"]


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from `retry-after-ms`, or `Retry-After` (seconds, possibly fractional, or an HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# ---- pacing --------------------------------------------------------------------------------

class RateLimiter:
    """Requests-per-minute and tokens-per-minute token buckets (0 = unlimited), one event loop.

    `acquire(tokens)` waits until one request and `tokens` tokens are available. A bucket
    holds at most one minute's allowance and refills continuously; a request larger than the
    whole allowance waits for a full bucket and then takes it (it can never be served otherwise).
    """

    def __init__(self, requests_per_minute: float, tokens_per_minute: float, *, clock=time.monotonic,
                 sleep=asyncio.sleep):
        self.rpm, self.tpm = float(requests_per_minute), float(tokens_per_minute)
        self._clock, self._sleep = clock, sleep
        now = clock()
        self._req, self._tok, self._t = self.rpm, self.tpm, now
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        dt = max(0.0, now - self._t)
        self._t = now
        self._req = min(self.rpm, self._req + dt * self.rpm / 60)
        self._tok = min(self.tpm, self._tok + dt * self.tpm / 60)

    async def acquire(self, tokens: float = 0.0) -> None:
        if self.rpm <= 0 and self.tpm <= 0:
            return
        async with self._lock:
            while True:
                self._refill()
                need_t = min(tokens, self.tpm) if self.tpm > 0 else 0.0
                wait = 0.0
                if self.rpm > 0 and self._req < 1:
                    wait = max(wait, (1 - self._req) * 60 / self.rpm)
                if self.tpm > 0 and self._tok < need_t:
                    wait = max(wait, (need_t - self._tok) * 60 / self.tpm)
                if wait <= 0:
                    if self.rpm > 0:
                        self._req -= 1
                    if self.tpm > 0:
                        self._tok -= need_t
                    return
                await self._sleep(wait)


# ---- the teacher ---------------------------------------------------------------------------

class _Session:
    """Client, limiter and RNG bound to one event loop (httpx connection pools cannot cross loops)."""

    def __init__(self, client: Any, limiter: RateLimiter, loop: asyncio.AbstractEventLoop):
        self.client, self.limiter, self.loop = client, limiter, loop


class OpenAIVLMTeacher(Teacher):
    """The `openai_vlm` teacher. `alabel` is the efficient path (the labelling loop awaits it with
    bounded concurrency); `label` runs one video synchronously. `totals` counts requests,
    retries, re-asks, tokens and cost over the teacher's life.

    `client_factory(api_key=, config=)` may build another OpenAI-compatible async client
    (e.g. `openai.AsyncAzureOpenAI`); it must not retry by itself (this class does).
    """

    name = "openai_vlm"

    def __init__(self, config: OpenAIVLMConfig, *, client_factory=None):
        self.config = config
        self.model = config.model
        self.prompt_version = config.prompt_version
        self.aspects = tuple(config.aspects)
        self.grid = check_grid(config.grid)
        self.spec = prompts_lib.get_prompt(config.prompt_version)
        self.descriptions = prompts_lib.aspect_descriptions(self.aspects, dict(config.aspect_descriptions))
        self.schema = prompts_lib.answer_schema(self.aspects, self.grid)
        self._client_factory = client_factory
        self._session: _Session | None = None
        self._secrets: tuple[str, ...] = ()
        self._rng = random.Random(config.seed)
        self.totals = {"videos": 0, "requests": 0, "retries": 0, "reasks": 0, "prompt_tokens": 0,
                       "completion_tokens": 0, "cost_usd": 0.0}

    def __repr__(self) -> str:
        return f"OpenAIVLMTeacher(model={self.model!r}, base_url={self.config.base_url!r})"

    # ---- the request ----------------------------------------------------------------------
    def _texts(self, frames_shape: Sequence[int], prompt: str) -> tuple[str, str, list[tuple[int, str]]]:
        total, h, w = int(frames_shape[0]), int(frames_shape[1]), int(frames_shape[2])
        tp, hp, wp = self.grid
        if h < hp or w < wp:
            raise ValueError(f"frames of {h}x{w} pixels cannot hold a {hp}x{wp} grid")
        picks = sample_frames(total, self.config.num_frames, tp)
        seg_of = cell_of_index(total, tp)
        bounds = cell_bounds(total, tp)
        segments = "\n".join(
            f"- segment {t + 1}: video frames {int(bounds[t]) + 1}-{int(bounds[t + 1])}; shown in frame(s) "
            + ", ".join(str(i + 1) for i, (f, s) in enumerate(picks) if s == t)
            for t in range(tp))
        example = json.dumps(prompts_lib.example_answer(self.aspects, self.grid))
        intro = self.spec.user_intro.format(
            prompt=prompt, num_frames=len(picks), total_frames=total, tp=tp, hp=hp, wp=wp, n_cells=hp * wp,
            n_patches=tp * hp * wp, segments=segments, example=example,
            aspects="\n".join(f"- {a}: {d}" for a, d in self.descriptions.items()))
        captions = [(f, self.spec.frame_caption.format(index=i + 1, num_frames=len(picks), frame=f + 1,
                                                      total_frames=total, segment=int(seg_of[f]) + 1, tp=tp))
                    for i, (f, _) in enumerate(picks)]
        return self.spec.system, intro, captions

    def build_messages(self, frames: np.ndarray, prompt: str) -> list[dict]:
        """The chat messages of one video: instructions, then a caption and a set-of-marks PNG per frame."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
        system, intro, captions = self._texts(frames.shape, prompt)
        content: list[dict] = [{"type": "text", "text": intro}]
        _, hp, wp = self.grid
        for f, caption in captions:
            img = draw_set_of_marks(frames[f], hp, wp, self.config.image_size, self.spec.style)
            content.append({"type": "text", "text": caption})
            content.append({"type": "image_url",
                            "image_url": {"url": png_data_url(img), "detail": self.config.image_detail}})
        return [{"role": "system", "content": system}, {"role": "user", "content": content}]

    def response_format(self) -> dict | None:
        if self.config.response_format == "json_schema":
            return {"type": "json_schema",
                    "json_schema": {"name": "halo_video_label", "schema": self.schema, "strict": True}}
        if self.config.response_format == "json_object":
            return {"type": "json_object"}
        return None

    def estimate(self, frames_shape: Sequence[int], prompt: str) -> dict:
        """One request: its image count, estimated prompt/completion tokens and cost (nothing is sent)."""
        system, intro, captions = self._texts(frames_shape, prompt)
        rh, rw = render_size(int(frames_shape[1]), int(frames_shape[2]), self.config.image_size)
        prompt_tokens = (text_tokens(system) + text_tokens(intro) + sum(text_tokens(c) for _, c in captions)
                         + len(captions) * image_tokens(rh, rw, self.config.image_detail) + 8)
        answer = json.dumps(prompts_lib.example_answer(self.aspects, self.grid))
        completion_tokens = min(self.config.max_tokens, math.ceil(len(answer) / 3))
        return {"requests": 1, "images": len(captions), "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "cost_usd": self.config.cost(prompt_tokens, completion_tokens)}

    # ---- client and secrets ----------------------------------------------------------------
    def _api_key(self) -> str:
        env = self.config.api_key_env
        if not env:
            return "EMPTY"  # local servers (vLLM, SGLang) accept any key
        key = os.environ.get(env, "")
        if not key:
            raise TeacherFatalError(
                f"the API key variable {env} is not set: export {env}=... (the key is read from the environment "
                "only, never from a config file), or set label.openai.api_key_env='' for a server that needs no key")
        return key

    def _redact(self, text: Any) -> str:
        text = str(text)
        for s in self._secrets:
            if s:
                text = text.replace(s, "[redacted]")
        return text

    def _get_session(self) -> _Session:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.loop is not loop:
            key = self._api_key()
            self._secrets = (key,) if len(key) >= 8 else ()  # a real key; not a placeholder like "EMPTY"
            if self._client_factory is not None:
                client = self._client_factory(api_key=key, config=self.config)
            else:
                import openai

                client = openai.AsyncOpenAI(api_key=key, base_url=self.config.base_url or None,
                                            timeout=self.config.timeout_s, max_retries=0)
            self._session = _Session(client, RateLimiter(self.config.requests_per_minute,
                                                         self.config.tokens_per_minute), loop)
        return self._session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and session.loop is asyncio.get_running_loop():
            await session.client.close()

    # ---- labelling -------------------------------------------------------------------------
    def label(self, frames: np.ndarray, prompt: str, video_id: str) -> dict:
        async def once() -> dict:
            try:
                return await self.alabel(frames, prompt, video_id)
            finally:
                await self.aclose()

        return asyncio.run(once())

    async def alabel(self, frames: np.ndarray, prompt: str, video_id: str) -> dict:
        """Label one video: request, validate, re-ask with the error up to `max_reasks`; returns the record.

        Raises `LabelFailure` (kept by the loop in the failures file, raw answer included) or
        `TeacherFatalError`.
        """
        session = self._get_session()
        cfg = self.config
        messages = await asyncio.to_thread(self.build_messages, frames, prompt)
        est = self.estimate(np.shape(frames), prompt)["prompt_tokens"]
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "requests": 0, "reasks": 0}
        self.totals["videos"] += 1
        raw: str | None = None
        error = ""
        for ask in range(cfg.max_reasks + 1):
            if ask:
                usage["reasks"] += 1
                self.totals["reasks"] += 1
                tp, hp, wp = self.grid
                messages = messages + [
                    {"role": "assistant", "content": raw or ""},
                    {"role": "user", "content": self.spec.reask.format(error=error, tp=tp, hp=hp, wp=wp)}]
            response = await self._request(session, messages, est + (text_tokens(raw or "") if ask else 0),
                                           video_id, usage)
            choice = response.choices[0] if response.choices else None
            message = getattr(choice, "message", None)
            raw = getattr(message, "content", None)
            refusal = getattr(message, "refusal", None)
            try:
                if raw is None and refusal:
                    raise ValueError(f"the model refused: {refusal}")
                video_scores, patch_scores = parse_answer(raw, self.aspects, self.grid)
            except ValueError as e:
                error = str(e)
                if getattr(choice, "finish_reason", None) == "length":
                    error += f" (the answer was cut off at max_tokens={cfg.max_tokens})"
                logging.info("openai_vlm: video %s: invalid answer (ask %d of %d): %s", video_id, ask + 1,
                             cfg.max_reasks + 1, self._redact(error)[:300])
                continue
            record = make_record(video_id, prompt, teacher_identity(self), self.aspects, self.grid,
                                 video_scores, patch_scores, usage)
            record["frame_indices"] = [f for f, _ in sample_frames(int(np.shape(frames)[0]), cfg.num_frames,
                                                                  self.grid[0])]
            try:
                validate_label(record, self.aspects, self.grid)
            except LabelError as e:  # parse_answer checks the same; this guards the record layout
                raise LabelFailure(video_id, "invalid_answer", e.reason, raw_answer=self._redact(raw),
                                   usage=usage) from None
            return record
        raise LabelFailure(video_id, "invalid_answer",
                           f"still invalid after {cfg.max_reasks} re-ask(s): {self._redact(error)}",
                           raw_answer=None if raw is None else self._redact(raw), usage=usage)

    async def _request(self, session: _Session, messages: list[dict], prompt_tokens_est: int, video_id: str,
                       usage: dict) -> Any:
        """One chat completion with transport retries; adds its usage to `usage` and `totals`."""
        import openai

        cfg = self.config
        kwargs: dict[str, Any] = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature,
                                  "max_tokens": cfg.max_tokens}
        fmt = self.response_format()
        if fmt is not None:
            kwargs["response_format"] = fmt
        last = ""
        for attempt in range(cfg.max_retries + 1):
            await session.limiter.acquire(prompt_tokens_est + cfg.max_tokens)
            usage["requests"] += 1
            self.totals["requests"] += 1
            if attempt:
                self.totals["retries"] += 1
            retry_after = None
            try:
                response = await session.client.chat.completions.create(**kwargs)
            except openai.APIStatusError as e:
                status = e.status_code
                last = self._redact(f"HTTP {status}: {e.message}")
                if status in _FATAL_STATUSES:
                    raise TeacherFatalError(
                        f"openai_vlm: {last} (model {cfg.model!r}, base_url {cfg.base_url or 'api.openai.com'}); "
                        "check the key, the model name and the URL") from None
                if status not in _RETRY_STATUSES and status < 500:
                    if "response_format" in last or "json_schema" in last:
                        raise TeacherFatalError(
                            f"openai_vlm: the endpoint rejected the response format ({last}); set "
                            "label.openai.response_format='json_object' or 'text'") from None
                    raise LabelFailure(video_id, "rejected", last, raw_answer=None, usage=usage) from None
                retry_after = retry_after_seconds(e.response.headers)
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                last = self._redact(f"{type(e).__name__}: {e}")
            else:
                u = getattr(response, "usage", None)
                pt = int(getattr(u, "prompt_tokens", 0) or 0)
                ct = int(getattr(u, "completion_tokens", 0) or 0)
                cost = cfg.cost(pt, ct)
                for d in (usage, self.totals):
                    d["prompt_tokens"] += pt
                    d["completion_tokens"] += ct
                    d["cost_usd"] += cost
                return response
            if attempt == cfg.max_retries:
                break
            delay = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** attempt)
            if retry_after is not None:
                delay = min(retry_after, cfg.retry_after_max_s)
            delay *= 1 + cfg.backoff_jitter * self._rng.random()
            logging.warning("openai_vlm: video %s: %s; retry %d of %d in %.2fs", video_id, last[:200],
                            attempt + 1, cfg.max_retries, delay)
            await asyncio.sleep(delay)
        raise LabelFailure(video_id, "request_error", f"gave up after {cfg.max_retries + 1} attempt(s): {last}",
                           raw_answer=None, usage=usage)
