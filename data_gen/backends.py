"""Where replies come from: an OpenAI-compatible chat-completions server, or a local transformers model.

Both offer `async generate(messages, seed) -> Generation`, raising GenerationFailed when one request
cannot be answered (the job counts it and goes on) and FatalBackendError when no request can be (the job
stops at once). Both are async context managers.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass

from .redact import Redactor, basic_auth_token, split_credentials

log = logging.getLogger("data_gen")


@dataclass
class Generation:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class GenerationFailed(Exception):
    """One request failed for good (after any retries); `reason` is a short counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class FatalBackendError(RuntimeError):
    """A failure every request will share (bad key, unknown model): retrying cannot help."""


# ---------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP server (vLLM, SGLang, TGI, Ollama, hosted APIs)


@dataclass
class HttpConfig:
    # e.g. http://node17:8000/v1; requests go to {base_url}/chat/completions. A user:password@ in it is sent
    # as HTTP basic auth, which excludes an API key: both would be the Authorization header.
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"  # the variable's name; its value is never logged or written
    concurrency: int = 32
    timeout: float = 120.0  # seconds for one request, start to last byte
    max_retries: int = 6
    backoff_base: float = 1.0  # the n-th retry waits about base * 2**n seconds, jittered...
    backoff_max: float = 60.0  # ...but never more than this (a server's Retry-After may ask for more)
    temperature: float = 0.7
    max_tokens: int = 512
    json_mode: bool = False  # send response_format={"type": "json_object"} (vLLM, SGLang, OpenAI, Ollama)


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds: delta-seconds (fractions tolerated) or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None, rng: random.Random) -> float:
    """Exponential backoff with equal jitter (half fixed, half random, so that many clients that failed
    together do not retry together), and never sooner than the server's Retry-After."""
    delay = min(cap, base * 2 ** attempt)
    delay = delay / 2 + rng.uniform(0, delay / 2)
    return max(delay, retry_after or 0.0)


class OpenAIBackend:
    """aiohttp rather than httpx: httpcore's connection pool does work quadratic in the number of open
    connections per request, which caps throughput well below what 64+ requests in flight should give."""

    name = "openai"

    def __init__(self, config: HttpConfig):
        """Checks the credentials (ValueError) and neither logs nor connects: the command builds it before
        it reads the corpus."""
        self.config = config
        base_url, user, password = split_credentials(config.base_url)
        # Without credentials, so that every message may show it; they go in the Authorization header.
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.retries = 0  # retried attempts, for the summary
        self._rng = random.Random()
        self._headers = {}
        api_key = (os.environ.get(config.api_key_env) or "").strip()
        if api_key and user is not None:  # one header cannot carry both, and sending either could be wrong
            raise ValueError(f"{base_url}: credentials in the URL and ${config.api_key_env} both set: both would "
                             f"be the Authorization header")
        if any(c.isspace() or not c.isprintable() for c in api_key):  # e.g. a line break: aiohttp refuses it
            raise ValueError(f"${config.api_key_env} holds spaces or control characters: not an API key")
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        elif user is not None:
            self._headers["Authorization"] = f"Basic {basic_auth_token(user, password)}"
        # Servers echo requests in error bodies; anything of theirs is scrubbed before it is shown.
        self._redact = Redactor(api_key, config.base_url)
        self._session = None

    def _excerpt(self, text: str, limit: int) -> str:
        """Server or library text as it may be shown: scrubbed of secrets (before it is cut, so that no
        part of one is left), on one line, at most `limit` characters."""
        return " ".join(self._redact(text).split())[:limit]

    async def __aenter__(self) -> OpenAIBackend:
        import aiohttp

        self._session = aiohttp.ClientSession(
            headers=self._headers,
            connector=aiohttp.TCPConnector(limit=self.config.concurrency),
            timeout=aiohttp.ClientTimeout(total=self.config.timeout),
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    def _body(self, messages: list[dict], seed: int) -> dict:
        body = {
            "model": self.config.model,
            "messages": messages,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
            "seed": seed,
        }
        if self.config.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    async def _post(self, body: dict) -> tuple[int, str, str | None]:
        """(status, body text, Retry-After header) of one attempt, whole within the timeout."""
        async with asyncio.timeout(self.config.timeout):  # connect, send and every byte of the reply
            async with self._session.post(self.url, json=body) as response:
                text = (await response.read()).decode("utf-8", errors="replace")
                return response.status, text, response.headers.get("Retry-After")

    async def generate(self, messages: list[dict], seed: int) -> Generation:
        import aiohttp

        body = self._body(messages, seed)
        for attempt in range(self.config.max_retries + 1):
            retry_after = None
            try:
                status, text, retry_after_header = await self._post(body)
            except TimeoutError:
                reason, detail = "timeout", f"no complete reply within {self.config.timeout:g} s"
            except aiohttp.ClientError as e:  # refused, reset, cut off mid-body
                reason, detail = "connection", self._excerpt(f"{type(e).__name__}: {e}", 300)
            else:
                if status == 200:
                    try:
                        return _parse_completion(text)
                    except ValueError as e:
                        reason, detail = "malformed_body", f"{e}: {self._excerpt(text, 200)!r}"
                elif status == 429 or status >= 500:
                    reason, detail = f"http_{status}", self._excerpt(text, 200)
                    retry_after = retry_after_seconds(retry_after_header)
                elif status in (401, 403, 404):
                    # Said here rather than at the start: a server without keys (a local vLLM) is the usual case.
                    unauthenticated = (f" (requests carried no credentials: ${self.config.api_key_env} is not set)"
                                       if status in (401, 403) and not self._headers else "")
                    raise FatalBackendError(f"{self.url} answered HTTP {status} for model {self.config.model!r}"
                                            f"{unauthenticated}: {self._excerpt(text, 300)}")
                else:  # another 4xx, e.g. a passage too long for the model's context: this request only
                    raise GenerationFailed(f"http_{status}", self._excerpt(text, 200))
            if attempt == self.config.max_retries:
                raise GenerationFailed(reason, f"{detail} (after {attempt + 1} attempts)")
            self.retries += 1
            await asyncio.sleep(backoff_delay(attempt, self.config.backoff_base, self.config.backoff_max,
                                              retry_after, self._rng))
        raise AssertionError("unreachable")


def _parse_completion(text: str) -> Generation:
    """The first choice's content and the token usage of a chat-completions reply; ValueError if the
    body is not one."""
    try:
        data = json.loads(text)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:  # the caller adds the body, scrubbed
        raise ValueError(f"not a chat-completions body ({type(e).__name__})") from None
    if not isinstance(content, str):
        raise ValueError(f"choices[0].message.content is {type(content).__name__}, not a string")
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    try:
        return Generation(content, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
    except (TypeError, ValueError):  # odd token counts are not worth losing the reply over
        return Generation(content)


# ---------------------------------------------------------------------------------------------------
# Local transformers causal LM


@dataclass
class LocalConfig:
    model_dir: str
    batch_size: int = 16
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy decoding
    device: str | None = None  # default: cuda if available
    dtype: str = "auto"  # "auto": bfloat16 on a GPU that supports it, float32 otherwise
    trust_remote_code: bool = False


class TransformersBackend:
    """Batched, left-padded generation with the model's own chat template.

    Requests arrive one at a time from the job's workers; a batcher gathers up to `batch_size` of them
    and runs one `generate` in a thread, so the event loop keeps writing while the model works. When
    sampling, a batch is seeded with its first request's seed: per-request seeds cannot be honoured
    inside one batched `generate`.
    """

    name = "transformers"

    def __init__(self, config: LocalConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if config.dtype == "auto":
            bf16 = self.device.startswith("cuda") and torch.cuda.is_bf16_supported()
            dtype = torch.bfloat16 if bf16 else torch.float32
        else:
            dtype = getattr(torch, config.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_dir, trust_remote_code=config.trust_remote_code)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{config.model_dir}: the tokenizer has no chat template; use an instruction-tuned "
                             f"model or add a chat_template to its tokenizer_config.json")
        self.tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            config.model_dir, dtype=dtype, trust_remote_code=config.trust_remote_code).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self._queue: asyncio.Queue | None = None
        self._batcher: asyncio.Task | None = None

    def generate_batch(self, messages_list: list[list[dict]], seed: int = 0) -> list[Generation]:
        """One batched `generate` over several conversations."""
        import torch

        prompts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                   for m in messages_list]
        # The chat template already holds any special tokens the model expects.
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        options = {"max_new_tokens": self.config.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if self.config.temperature > 0:  # the model's own top_p / top_k, if it has them, still apply
            options.update(do_sample=True, temperature=self.config.temperature)
            torch.manual_seed(seed)
        else:  # greedy; unset the sampling settings of the model's generation_config, which would warn
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **options)
        prompt_len = inputs["input_ids"].shape[1]
        generations = []
        for row, mask in zip(output[:, prompt_len:].tolist(), inputs["attention_mask"].tolist()):
            new = row
            for i, token in enumerate(row):  # up to and including the first end-of-sequence token
                if token in self._eos_ids:
                    new = row[:i + 1]
                    break
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            generations.append(Generation(text, prompt_tokens=sum(mask), completion_tokens=len(new)))
        return generations

    async def __aenter__(self) -> TransformersBackend:
        self._queue = asyncio.Queue()
        self._batcher = asyncio.create_task(self._serve())
        return self

    async def __aexit__(self, *exc) -> None:
        self._batcher.cancel()
        try:
            await self._batcher
        except asyncio.CancelledError:
            pass

    async def generate(self, messages: list[dict], seed: int) -> Generation:
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((messages, seed, future))
        return await future

    async def _serve(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.config.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await asyncio.to_thread(self.generate_batch, [m for m, _, _ in batch], batch[0][1])
            except Exception as e:  # e.g. out of memory: these requests fail, the job counts them
                results = [GenerationFailed("generate_error", f"{type(e).__name__}: {e}")] * len(batch)
            for (_, _, future), result in zip(batch, results):
                if future.done():  # its worker was cancelled
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
