"""The `openai` backend: any OpenAI-compatible `POST {base_url}/chat/completions` server.

`generate` sends one request per (image, prompt): the image
re-encoded on the client (`image_format`, `jpeg_quality`) and downscaled so its longer side is at most
`max_side` (never upscaled), as a data-URL `image_url` content part, then the prompt as a text part. An
image of None sends the prompt alone (a text-only chat message, for text LM endpoints: alt-text rewriting).
`score` asks the VQAScore question (`score_question`) per (image, candidate) and reads the first answer
token's log p("Yes") from `logprobs`.
Requests run `concurrency` at a time, each with `timeout_s`, retried on 429, 5xx, timeouts and connection
errors (`backoff_s * 2**attempt`, or the server's Retry-After) up to `max_retries` times. A failed item gives
"" (generate) or log(1e-9) (score) and is counted by reason in `client.counts`; a call whose every request
fails to connect raises a UserError. With `cache_dir`, answers are cached on disk (one JSON file each),
keyed by model, image bytes, prompt and answer-changing parameters (never base_url or the key).

Server differences are config: `server_kind` says how `schema` is asked for (openai/vllm/sglang:
`response_format` json_schema with the schema nested under `json_schema`; llamacpp: json_schema with the
schema at the top level; ollama: JSON mode, the schema described in the prompt), `structured_output=False`
sends plain text, and a server that answers 400 to `response_format` is asked again in plain text for the rest
of the client's life; `max_side`/`image_format`/`jpeg_quality` keep bodies under servers' size and prompt
limits; `model=""` omits the field (single-model servers); `api_key_env` names the environment variable whose
key goes in the `Authorization: Bearer` header only.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import email.utils
import hashlib
import http.client
import io
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from vlm_jax.config_lib import ConfigError
from vlm_jax.errors import UserError
from vlm_jax.files import write_atomic
from vlm_jax.mllm.protocol import check_candidates
from vlm_jax.mllm.config import MLLMConfig

FLOOR = math.log(1e-9)
"""The score of a candidate whose first answer token lists neither Yes nor No, or whose request failed."""
_TOKEN_MARKS = " \t\n\u2581\u0120"  # whitespace and the SentencePiece / byte-level BPE word-start marks


class _Failure(Exception):
    """One request's failure; `reason` names its count (`failed/<reason>`, or `refusal`)."""

    def __init__(self, reason: str, detail: str, *, retry: bool = False, status: int = 0,
                 retry_after: float | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.retry, self.status, self.retry_after = reason, detail, retry, status, retry_after


@dataclasses.dataclass(frozen=True)
class _Image:
    url: str  # data:image/<format>;base64,...
    sha: str  # sha256 of the encoded bytes


class _Call:
    """What the requests of one generate/score call share: whether the server ever answered, and whether a
    request already gave up connecting before any answer (the rest then fail without trying)."""

    def __init__(self):
        self.answered = False
        self.unreachable = threading.Event()


class OpenAIClient:
    """`MLLM` over an OpenAI-compatible chat-completions server (see the module docstring).

    `counts` (dict[str, int], cumulative over the client's life): requests (HTTP requests sent, retries
    included), retries, cache_hits, failed/<reason> (timeout, connection, image_rejected (400/413),
    malformed_response, no_logprobs, http_<status>), refusal, structured_output_unsupported (requests
    re-sent without `response_format` after a 400), score/neither_yes_no.
    """

    def __init__(self, config: MLLMConfig):
        if not config.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"mllm.base_url={config.base_url!r} is not an http(s) URL; pass "
                              "--config.mllm.base_url=http://HOST:PORT/v1.")
        self._config = config
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self._key = ""
        if config.api_key_env:
            self._key = os.environ.get(config.api_key_env, "")
            if not self._key:
                raise UserError(f"mllm.api_key_env names the environment variable {config.api_key_env}, which is "
                                f"not set; export {config.api_key_env} or pass --config.mllm.api_key_env=''.")
            self._headers["Authorization"] = f"Bearer {self._key}"
        self._structured = config.structured_output
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def __repr__(self) -> str:
        config = self._config
        return f"OpenAIClient(base_url={config.base_url!r}, model={config.model!r}, server_kind={config.server_kind!r})"

    def generate(self, images: Sequence[np.ndarray | None], prompts: Sequence[str], max_tokens: int = 64, *,
                 schema: dict[str, Any] | None = None) -> list[str]:
        """One answer per (image, prompt); "" where the request failed (counted). An image of None sends the
        prompt alone (text only). `schema` is asked for as structured output when `structured_output` is set
        (how: `server_kind`)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images and {len(prompts)} prompts; give one prompt per image.")
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": self._config.temperature}
        structured = schema is not None and self._config.structured_output
        if structured:
            params["response_format"] = self._response_format(schema)
        if structured and self._config.server_kind == "ollama":
            prompts = [f"{prompt}\nAnswer with JSON that follows this JSON schema: {json.dumps(schema)}"
                       for prompt in prompts]
        encoded = self._encode_all(images)
        choices = self._run([(image, prompt, params) for image, prompt in zip(encoded, prompts)], logprobs=False)
        return [choice["message"]["content"] if choice else "" for choice in choices]

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str], candidates: Sequence[Sequence[str]], *,
              normalize: bool = False) -> np.ndarray:
        """float32 [B, C]: per (image, candidate), log p("Yes") of the first answer token to `score_question`
        (after the prompt and a newline when the prompt is not empty), asked with temperature 0, max_tokens 1
        and top_logprobs 2. p("Yes") sums the listed tokens that read "yes" (any case, stripped of whitespace
        and the word-start marks "▁"/"Ġ"); with only "No" listed the score is log(1 - p("No")); with neither,
        or when the request failed, log(1e-9) (counted). `normalize` has no effect: the answer is one token."""
        del normalize
        width = check_candidates(images, prompts, candidates)
        encoded = self._encode_all(images)
        params = {"max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 2}
        requests = []
        for image, prompt, row in zip(encoded, prompts, candidates):
            for candidate in row:
                question = self._config.score_question.format(candidate)
                requests.append((image, f"{prompt}\n{question}" if prompt else question, params))
        scores = [self._yes_logprob(choice) if choice else FLOOR for choice in self._run(requests, logprobs=True)]
        return np.asarray(scores, np.float32).reshape(len(encoded), width)

    def _response_format(self, schema: dict[str, Any]) -> dict[str, Any]:
        kind = self._config.server_kind
        if kind == "llamacpp":
            return {"type": "json_schema", "schema": schema}
        if kind == "ollama":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}

    def _yes_logprob(self, choice: dict[str, Any]) -> float:
        first = choice["logprobs"]["content"][0]
        listed = {first.get("token"): first.get("logprob")}
        for alternative in first.get("top_logprobs") or ():
            if isinstance(alternative, dict):
                listed[alternative.get("token")] = alternative.get("logprob")
        probability = {"yes": 0.0, "no": 0.0}
        for token, logprob in listed.items():
            word = token.strip(_TOKEN_MARKS).lower() if isinstance(token, str) else ""
            if word in probability and isinstance(logprob, (int, float)):
                probability[word] += math.exp(min(float(logprob), 0.0))
        if probability["yes"] > 0:
            return math.log(min(probability["yes"], 1.0))
        if probability["no"] > 0:
            return math.log(max(1.0 - probability["no"], 1e-9))
        self._count("score/neither_yes_no")
        return FLOOR

    def _encode_all(self, images: Sequence[np.ndarray | None]) -> list[_Image | None]:
        with concurrent.futures.ThreadPoolExecutor(max_workers=self._config.concurrency) as pool:
            return list(pool.map(self._encode, images))

    def _encode(self, image: np.ndarray | None) -> _Image | None:
        if image is None:
            return None  # a text-only request
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"images must be uint8 [H, W, 3] arrays, got {array.dtype} {array.shape}.")
        picture = Image.fromarray(array)
        longer = max(picture.size)
        if longer > self._config.max_side:
            scale = self._config.max_side / longer
            size = tuple(max(1, round(side * scale)) for side in picture.size)
            picture = picture.resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        if self._config.image_format == "jpeg":
            picture.save(buffer, "JPEG", quality=self._config.jpeg_quality)
        else:
            picture.save(buffer, "PNG")
        data = buffer.getvalue()
        url = f"data:image/{self._config.image_format};base64,{base64.b64encode(data).decode('ascii')}"
        return _Image(url=url, sha=hashlib.sha256(data).hexdigest())

    def _run(self, requests: list[tuple[_Image | None, str, dict[str, Any]]], *,
             logprobs: bool) -> list[dict | None]:
        """The first choice of each request's response, None where it failed; raises a UserError when every
        request failed to connect."""
        if not requests:
            return []
        call = _Call()
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(self._config.concurrency, len(requests))) as pool:
            results = list(pool.map(lambda request: self._call(*request, call=call, logprobs=logprobs), requests))
        if all(reason == "connection" for _, reason in results):
            raise UserError(f"the MLLM server at {self._config.base_url} cannot be reached (all {len(results)} "
                            "requests failed to connect); start it or check --config.mllm.base_url.")
        return [choice for choice, _ in results]

    def _call(self, image: _Image | None, prompt: str, params: dict[str, Any], *, call: _Call,
              logprobs: bool) -> tuple[dict | None, str]:
        """(the first choice, "") from the cache or the server, or (None, the failure's reason)."""
        if "response_format" in params and not self._structured:
            params = {name: value for name, value in params.items() if name != "response_format"}
        body: dict[str, Any] = {"model": self._config.model} if self._config.model else {}
        content = [{"type": "text", "text": prompt}]
        if image is not None:
            content.insert(0, {"type": "image_url", "image_url": {"url": image.url}})
        body["messages"] = [{"role": "user", "content": content}]
        body.update(params)
        path = self._cache_path(image, prompt, params) if self._config.cache_dir else ""
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as file:
                choice = json.load(file)["choice"]
            self._count("cache_hits")
            return choice, ""
        try:
            choice = _first_choice(self._send(json.dumps(body).encode("utf-8"), call), logprobs=logprobs)
        except _Failure as failure:
            if failure.status == 400 and "response_format" in params:
                self._structured = False
                self._count("structured_output_unsupported")
                logging.warning("the MLLM server at %s rejected response_format (400); asking in plain text from "
                                "now on.", self._config.base_url)
                return self._call(image, prompt, params, call=call, logprobs=logprobs)
            self._fail(failure)
            return None, failure.reason
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomic(path, lambda file: file.write(json.dumps({"choice": choice})), binary=False)
        return choice, ""

    def _cache_path(self, image: _Image | None, prompt: str, params: dict[str, Any]) -> str:
        key = json.dumps({"model": self._config.model, "image": image.sha if image is not None else None,
                          "prompt": prompt, "params": params},
                         sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return os.path.join(self._config.cache_dir, digest[:2], f"{digest}.json")

    def _send(self, payload: bytes, call: _Call) -> Any:
        """The parsed JSON response to one request, retried; raises _Failure."""
        attempt = 0
        while True:
            if call.unreachable.is_set():
                raise _Failure("connection", "an earlier request of this call could not connect")
            self._count("requests")
            logging.debug("POST %s (%d bytes, attempt %d)", self._url, len(payload), attempt + 1)
            try:
                data = self._post(payload)
            except _Failure as failure:
                if failure.reason != "connection":
                    call.answered = True
                if not failure.retry or attempt == self._config.max_retries:
                    if failure.reason == "connection" and not call.answered:
                        call.unreachable.set()
                    raise
                delay = failure.retry_after if failure.retry_after is not None else self._config.backoff_s * 2**attempt
                logging.debug("retrying in %.3gs after %s: %s", delay, failure.reason, failure.detail)
                self._count("retries")
                attempt += 1
                time.sleep(delay)
                continue
            call.answered = True
            return data

    def _post(self, payload: bytes) -> Any:
        request = urllib.request.Request(self._url, data=payload, headers=self._headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self._config.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            raise self._http_failure(error) from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                raise _Failure("timeout", f"no answer within {self._config.timeout_s}s", retry=True) from None
            raise _Failure("connection", self._scrub(str(error.reason)), retry=True) from None
        except TimeoutError:
            raise _Failure("timeout", f"no answer within {self._config.timeout_s}s", retry=True) from None
        except (OSError, http.client.HTTPException) as error:
            raise _Failure("connection", self._scrub(f"{type(error).__name__}: {error}"), retry=True) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise _Failure("malformed_response", f"the response body is not JSON: {self._scrub(repr(raw[:100]))}") \
                from None

    def _http_failure(self, error: urllib.error.HTTPError) -> _Failure:
        status = error.code
        try:
            text = error.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException):
            text = ""
        finally:
            error.close()
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text
        detail = f"HTTP {status}: {self._scrub(str(message))[:300]}"
        if status == 429 or status >= 500:
            return _Failure(f"http_{status}", detail, retry=True, status=status,
                            retry_after=_retry_after(error.headers.get("Retry-After")))
        reason = "image_rejected" if status in (400, 413) else f"http_{status}"
        return _Failure(reason, detail, status=status)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _fail(self, failure: _Failure) -> None:
        name = "refusal" if failure.reason == "refusal" else f"failed/{failure.reason}"
        with self._lock:
            first = name not in self.counts
            self.counts[name] = self.counts.get(name, 0) + 1
        (logging.warning if first else logging.debug)("MLLM request to %s failed (%s): %s", self._url, name,
                                                      failure.detail)

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1


def _first_choice(data: Any, *, logprobs: bool) -> dict[str, Any]:
    """choices[0] of a chat-completion response, checked (message content; first-token logprobs when asked)."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Failure("malformed_response", "the response has no choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise _Failure("malformed_response", "the first choice has no message")
    if message.get("refusal"):
        raise _Failure("refusal", f"the model refused: {str(message['refusal'])[:200]}")
    if not isinstance(message.get("content"), str):
        raise _Failure("malformed_response", "the message has no text content")
    if logprobs:
        listed = choice.get("logprobs")
        content = listed.get("content") if isinstance(listed, dict) else None
        if not isinstance(content, list) or not content or not isinstance(content[0], dict):
            raise _Failure("no_logprobs", "the response has no logprobs (does the server support logprobs?)")
    return choice


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
