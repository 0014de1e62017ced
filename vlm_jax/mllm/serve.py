"""Any `vlm_jax.mllm` backend behind an OpenAI-compatible chat-completions API, so the `openai` backend runs
end to end offline:

    python -m vlm_jax.mllm.serve --model_dir=DIR --port=8000    # the embedded captioner exported at DIR
    # then config.mllm.backend="openai", config.mllm.base_url="http://127.0.0.1:8000/v1"

Endpoints: `GET /v1/models`, `GET /health`, `POST /v1/chat/completions`. A request holds exactly one image, in
an `image_url` part as a data URL or bare base64 (http(s) and file URLs are refused), and text (string contents
or text parts, joined with newlines into the prompt). Fields read: `max_tokens` (or `max_completion_tokens`;
default 64), `temperature` (accepted; the backend decodes as it is configured, greedy or beam search, whatever
the value), `response_format` (json_schema with the schema nested under `json_schema` (OpenAI) or at the top
level (llama.cpp), json_object: passed to `backend.generate` as `schema`), `logprobs` with `top_logprobs`
(0-20; needs the backend's optional `generate_tokens(images, prompts, max_tokens, top_logprobs)`, which returns
per image (text, [(token, logprob, [(alternative, logprob), ...]), ...])). `model` is not checked. `usage`
counts generated tokens where the backend reports them (logprobs requests), else 0.

A micro-batcher gathers concurrent requests with the same (max_tokens, schema, logprobs) into one backend call
(up to `max_batch`, waiting at most `max_wait_s` for more), since the embedded backend is a jitted batched
model; one thread calls the backend. Errors are OpenAI-shaped JSON `{"error": {"message", "type", "code"}}`:
400 for a bad request, 404 for an unknown path, 500 when the backend raises.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import io
import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from vlm_jax.errors import EXIT_USER_ERROR, UserError

DEFAULT_MAX_TOKENS = 64
MAX_TOP_LOGPROBS = 20


class _BadRequest(Exception):
    """A request this server answers with 400; the message says what is wrong."""


@dataclasses.dataclass
class _Job:
    """One request for the batcher, then its answer (or the backend's exception)."""

    image: np.ndarray
    prompt: str
    max_tokens: int
    schema: dict[str, Any] | None
    top_logprobs: int | None  # None: no logprobs asked
    text: str = ""
    tokens: list[tuple[str, float, list[tuple[str, float]]]] | None = None
    error: BaseException | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def key(self) -> tuple[int, str | None, int | None]:
        """Jobs with equal keys share a backend call: (max_tokens, the schema as canonical JSON, top_logprobs)."""
        schema = json.dumps(self.schema, sort_keys=True) if self.schema is not None else None
        return self.max_tokens, schema, self.top_logprobs


class _Batcher:
    """Runs jobs through the backend on one thread, gathering those with the same key into one call."""

    def __init__(self, backend: Any, max_batch: int, max_wait_s: float):
        self._backend, self._max_batch, self._max_wait_s = backend, max_batch, max_wait_s
        self._pending: list[_Job] = []
        self._condition = threading.Condition()
        self._closed = False
        self.batch_sizes: list[int] = []  # one entry per backend call
        self._thread = threading.Thread(target=self._loop, name="mllm-serve-batcher", daemon=True)
        self._thread.start()

    def run(self, job: _Job) -> _Job:
        """Blocks until the job is done; re-raises the backend's exception."""
        with self._condition:
            self._pending.append(job)
            self._condition.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._closed:
                    self._condition.wait()
                if self._closed and not self._pending:
                    return
                key = self._pending[0].key
                deadline = time.monotonic() + self._max_wait_s
                while True:
                    batch = [job for job in self._pending if job.key == key][:self._max_batch]
                    remaining = deadline - time.monotonic()
                    if len(batch) == self._max_batch or remaining <= 0 or self._closed:
                        break
                    self._condition.wait(remaining)
                taken = {id(job) for job in batch}
                self._pending = [job for job in self._pending if id(job) not in taken]
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Job]) -> None:
        self.batch_sizes.append(len(batch))
        images = [job.image for job in batch]
        prompts = [job.prompt for job in batch]
        first = batch[0]
        try:
            if first.top_logprobs is not None:
                outputs = self._backend.generate_tokens(images, prompts, first.max_tokens, first.top_logprobs)
            else:
                outputs = [(text, None) for text in
                           self._backend.generate(images, prompts, max_tokens=first.max_tokens, schema=first.schema)]
            if len(outputs) != len(batch):
                raise RuntimeError(f"the backend answered {len(outputs)} of {len(batch)} requests")
            for job, (text, tokens) in zip(batch, outputs):
                job.text, job.tokens = text, tokens
        except Exception as error:  # noqa: BLE001 - reported to every request of the batch as a 500
            for job in batch:
                job.error = error
        for job in batch:
            job.done.set()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's listen backlog is 5: a burst of 32 clients connecting at once got connection resets.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], backend: Any, model_name: str, max_batch: int, max_wait_s: float):
        super().__init__(address, _Handler)
        self.backend, self.model_name, self.created = backend, model_name, int(time.time())
        self.batcher = _Batcher(backend, max_batch, max_wait_s)

    def server_close(self) -> None:
        super().server_close()
        self.batcher.close()


def make_server(backend: Any, host: str = "127.0.0.1", port: int = 0, model_name: str = "vlm-jax-embedded",
                max_batch: int | None = None, max_wait_s: float = 0.005) -> ThreadingHTTPServer:
    """A bound (not yet serving) server over `backend`; run `serve_forever()`, stop with `shutdown()` and
    `server_close()`. port 0 picks a free port (`server.server_address`). max_batch: requests per backend call
    (default the backend's `batch_size`, else 16). The server's `batcher.batch_sizes` lists each call's size."""
    max_batch = max_batch or getattr(backend, "batch_size", None) or 16
    return _Server((host, port), backend, model_name, max_batch, max_wait_s)


@contextlib.contextmanager
def serving(backend: Any, model_name: str = "vlm-jax-embedded", **options: Any) -> Iterator[str]:
    """Serves `backend` on a free loopback port from a background thread for the `with` block;
    yields the base URL (http://127.0.0.1:<port>/v1)."""
    server = make_server(backend, port=0, model_name=model_name, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def over_http(section: Any, stack: contextlib.ExitStack):
    """The embedded backend of an `MLLMConfig` section served on loopback for the life of `stack`, and
    the HTTP client (the section's other fields) talking to it: the whole HTTP path, offline."""
    from vlm_jax.mllm import make_backend  # noqa: PLC0415

    section = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    url = stack.enter_context(serving(make_backend({**section, "backend": "embedded"})))
    return make_backend({**section, "backend": "openai", "base_url": url})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        """No line per request."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = urlsplit(self.path).path.rstrip("/")
        if path == "/v1/models":
            model = {"id": self.server.model_name, "object": "model", "created": self.server.created,
                     "owned_by": "vlm_jax"}
            self._reply(200, {"object": "list", "data": [model]})
        elif path == "/health":
            self._reply(200, {"status": "ok"})
        else:
            self._error(404, f"no endpoint GET {path}", "not_found_error", "not_found")

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self._error(411, "a request body needs a Content-Length header", "invalid_request_error", "length_required")
            return
        raw = self.rfile.read(length)
        path = urlsplit(self.path).path.rstrip("/")
        if path != "/v1/chat/completions":
            self._error(404, f"no endpoint POST {path}", "not_found_error", "not_found")
            return
        try:
            job = _parse(raw, logprobs_supported=hasattr(self.server.backend, "generate_tokens"))
        except _BadRequest as error:
            self._error(400, str(error), "invalid_request_error", "invalid_request")
            return
        try:
            self.server.batcher.run(job)
        except Exception as error:  # noqa: BLE001 - the backend's failure, answered as a 500
            self._error(500, f"the backend failed: {type(error).__name__}: {error}", "server_error", "backend_error")
            return
        self._reply(200, self._completion(job))

    def _completion(self, job: _Job) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": job.text},
                                  "logprobs": None, "finish_reason": "stop"}
        generated = 0
        if job.tokens is not None:
            generated = len(job.tokens)
            choice["logprobs"] = {"content": [
                {"token": token, "logprob": float(logprob),
                 "top_logprobs": [{"token": other, "logprob": float(other_logprob)} for other, other_logprob in top]}
                for token, logprob, top in job.tokens]}
            if generated >= job.max_tokens:
                choice["finish_reason"] = "length"
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.server.model_name, "choices": [choice],
                "usage": {"prompt_tokens": 0, "completion_tokens": generated, "total_tokens": generated}}

    def _error(self, status: int, message: str, kind: str, code: str) -> None:
        self._reply(status, {"error": {"message": message, "type": kind, "code": code}})

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _parse(raw: bytes, *, logprobs_supported: bool) -> _Job:
    """A chat-completions request body -> the job it asks for; raises _BadRequest."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise _BadRequest("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("the request body must be a JSON object")
    if body.get("stream"):
        raise _BadRequest("stream is not supported")
    if body.get("n", 1) != 1:
        raise _BadRequest("only n=1 is supported")
    prompt, image = _content(body.get("messages"))
    max_tokens = next((body[name] for name in ("max_completion_tokens", "max_tokens") if body.get(name) is not None),
                      DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _BadRequest(f"max_tokens must be a positive integer, got {json.dumps(max_tokens)}")
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))):
        raise _BadRequest(f"temperature must be a number, got {json.dumps(temperature)}")
    schema = _schema(body.get("response_format"))
    top_logprobs = None
    if body.get("logprobs"):
        if not logprobs_supported:
            raise _BadRequest("logprobs are not supported by this backend (it has no generate_tokens)")
        if schema is not None:
            raise _BadRequest("logprobs with response_format is not supported")
        top_logprobs = body.get("top_logprobs") or 0
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or \
                not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise _BadRequest(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]")
    return _Job(image=image, prompt=prompt, max_tokens=max_tokens, schema=schema, top_logprobs=top_logprobs)


def _content(messages: Any) -> tuple[str, np.ndarray]:
    """(the text parts joined with newlines, the one image) of a request's messages; raises _BadRequest."""
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages must be a non-empty list")
    texts, images = [], []
    for message in messages:
        if not isinstance(message, dict):
            raise _BadRequest("each message must be an object with role and content")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise _BadRequest("message content must be a string or a list of parts")
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url")
                images.append(_decode_image(url.get("url") if isinstance(url, dict) else url))
            else:
                raise _BadRequest(f"unsupported content part {json.dumps(part)[:100]}; use text and image_url parts")
    if len(images) != 1:
        raise _BadRequest(f"a request must hold exactly one image, got {len(images)}")
    return "\n".join(texts), images[0]


def _schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema a `response_format` asks for (OpenAI, llama.cpp and JSON-mode forms); None for text."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema", {"type": "object"})
    elif kind == "json_schema":
        nested = response_format.get("json_schema")
        schema = nested.get("schema") if isinstance(nested, dict) else response_format.get("schema")
    else:
        raise _BadRequest(f"response_format type must be text, json_object or json_schema, got {json.dumps(kind)}")
    if not isinstance(schema, dict):
        raise _BadRequest("response_format json_schema needs a schema object (under json_schema.schema or schema)")
    return schema


def _decode_image(url: Any) -> np.ndarray:
    """uint8 [H, W, 3] from a data URL or bare base64; raises _BadRequest for anything else."""
    if not isinstance(url, str):
        raise _BadRequest("image_url must be a data URL string or an object with a url")
    if url.startswith(("http://", "https://", "file:")):
        raise _BadRequest("image URLs are not fetched; send the image inline as a data URL (data:image/png;base64,...)")
    data = url
    if url.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise _BadRequest("a data URL image must be base64 (data:image/<format>;base64,...)")
    try:
        encoded = base64.b64decode("".join(data.split()), validate=True)
        with Image.open(io.BytesIO(encoded)) as picture:
            return np.asarray(picture.convert("RGB"), dtype=np.uint8)
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as error:
        raise _BadRequest(f"the image could not be decoded ({type(error).__name__})") from None


def main() -> None:
    """`python -m vlm_jax.mllm.serve --model_dir=DIR [--host=127.0.0.1] [--port=8000] [--model_name=...]
    [--batch_size=64] [--beam_size=1]`."""
    from absl import app, flags  # noqa: PLC0415

    model_dir = flags.DEFINE_string("model_dir", None, "embedded captioner export (experiments/captioner.py)",
                                    required=True)
    host = flags.DEFINE_string("host", "127.0.0.1", "address to listen on")
    port = flags.DEFINE_integer("port", 8000, "port to listen on (0: a free one)")
    model_name = flags.DEFINE_string("model_name", "vlm-jax-embedded", "the model id /v1/models lists")
    batch_size = flags.DEFINE_integer("batch_size", 64, "rows per backend call: concurrent requests share one; "
                                      "a call costs a full batch, so match it to the clients' concurrency")
    beam_size = flags.DEFINE_integer("beam_size", 1, "1: greedy decoding; more: beam search")

    def serve(argv: Sequence[str]) -> None:
        del argv
        from vlm_jax.mllm import make_backend  # noqa: PLC0415

        try:
            backend = make_backend({"backend": "embedded", "model_dir": model_dir.value,
                                    "batch_size": batch_size.value, "beam_size": beam_size.value})
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        server = make_server(backend, host.value, port.value, model_name.value)
        bound_host, bound_port = server.server_address[:2]
        print(f"serving {model_name.value} at http://{bound_host}:{bound_port}/v1", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()

    app.run(serve)


if __name__ == "__main__":
    main()
