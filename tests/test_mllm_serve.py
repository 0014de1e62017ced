"""vlm_jax.mllm.serve: a fake backend behind make_server, reached by OpenAIClient and raw HTTP on loopback."""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vlm_jax.mllm.config import MLLMConfig
from vlm_jax.mllm.http import OpenAIClient
from vlm_jax.mllm.serve import make_server

SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}


class ColourBackend:
    """Answers from each image's mean colour and size, the prompt and max_tokens; records every call."""

    batch_size = 8

    def __init__(self, *, fail_on: str = ""):
        self.fail_on = fail_on
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def generate(self, images, prompts, max_tokens=64, *, schema=None):
        self._record(images, prompts, max_tokens=max_tokens, schema=schema)
        return [self.answer(image, prompt, max_tokens) for image, prompt in zip(images, prompts)]

    def _record(self, images, prompts, **params):
        if self.fail_on in prompts:
            raise RuntimeError("the fake backend fails on request")
        with self.lock:
            self.calls.append({"images": [np.array(image) for image in images], "prompts": list(prompts), **params})

    @staticmethod
    def answer(image: np.ndarray, prompt: str, max_tokens: int) -> str:
        red, green, blue = (int(value) for value in image.reshape(-1, 3).mean(axis=0))
        return f"{prompt}|{red},{green},{blue}|{image.shape[0]}x{image.shape[1]}|max{max_tokens}"


class TokenBackend(ColourBackend):
    """ColourBackend with `generate_tokens`: "Yes" (p 0.8, then No 0.2) when the prompt names a cat, else "No"
    (p 0.6, then Maybe 0.1)."""

    def generate_tokens(self, images, prompts, max_tokens, top_logprobs):
        self._record(images, prompts, max_tokens=max_tokens, top_logprobs=top_logprobs)
        outputs = []
        for prompt in prompts:
            top = [("Yes", math.log(0.8)), ("No", math.log(0.2))] if '"cat"' in prompt else \
                [("No", math.log(0.6)), ("Maybe", math.log(0.1))]
            outputs.append((top[0][0], [(top[0][0], top[0][1], top[:top_logprobs])]))
        return outputs


@pytest.fixture
def serving():
    """serving(backend, **make_server_kwargs) -> (server, base_url); every server is stopped after the test."""
    servers = []

    def start(backend, **kwargs):
        server = make_server(backend, **kwargs)
        threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def client_for(base_url: str, **overrides: Any) -> OpenAIClient:
    fields = {"backend": "openai", "base_url": base_url, "image_format": "png", "max_side": 512, "timeout_s": 10.0,
              "max_retries": 0, "backoff_s": 0.001, "concurrency": 4}
    fields.update(overrides)
    return OpenAIClient(MLLMConfig(**fields))


def images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (12 + index, 20, 3), dtype=np.uint8) for index in range(count)]


def png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def request(url: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    """(status, parsed JSON) of a GET (body None) or a POST of `body` (bytes as they are, else JSON)."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def chat(image_url: Any, text: str = "describe", **fields: Any) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": image_url}, {"type": "text", "text": text}]
    return {"model": "any", "messages": [{"role": "user", "content": content}], **fields}


def test_client_gets_the_backends_answers_and_exact_pixels(serving):
    backend = ColourBackend()
    _, url = serving(backend)
    batch, prompts = images(5), [f"prompt {index}" for index in range(5)]
    texts = client_for(url).generate(batch, prompts, max_tokens=9)
    assert texts == ColourBackend().generate(batch, prompts, max_tokens=9)
    received = {prompt: image for call in backend.calls for prompt, image in zip(call["prompts"], call["images"])}
    for image, prompt in zip(batch, prompts):
        np.testing.assert_array_equal(received[prompt], image)


def test_response_has_the_openai_shape(serving):
    _, url = serving(ColourBackend(), model_name="served-name")
    image = images(1)[0]
    status, body = request(f"{url}/chat/completions", chat(f"data:image/png;base64,{png_base64(image)}",
                                                           max_completion_tokens=3))
    assert status == 200
    assert body["object"] == "chat.completion" and body["model"] == "served-name" and body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ColourBackend.answer(image, "describe", 3)}
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_bare_base64_and_the_ollama_string_form_are_accepted(serving):
    backend = ColourBackend()
    _, url = serving(backend)
    image = images(1)[0]
    assert request(f"{url}/chat/completions", chat({"url": png_base64(image)}))[0] == 200
    assert request(f"{url}/chat/completions", chat(f"data:image/png;base64,{png_base64(image)}"))[0] == 200
    assert len(backend.calls) == 2
    for call in backend.calls:
        np.testing.assert_array_equal(call["images"][0], image)


@pytest.mark.parametrize("kind", ["openai", "llamacpp"])
def test_json_schema_forms_reach_the_backend_as_the_schema(serving, kind):
    backend = ColourBackend()
    _, url = serving(backend)
    client_for(url, server_kind=kind).generate(images(1), ["label it"], schema=SCHEMA)
    assert [call["schema"] for call in backend.calls] == [SCHEMA]


def test_json_object_reaches_the_backend_as_an_object_schema(serving):
    backend = ColourBackend()
    _, url = serving(backend)
    image_url = f"data:image/png;base64,{png_base64(images(1)[0])}"
    assert request(f"{url}/chat/completions", chat(image_url, response_format={"type": "json_object"}))[0] == 200
    assert request(f"{url}/chat/completions", chat(image_url, response_format={"type": "text"}))[0] == 200
    assert [call["schema"] for call in backend.calls] == [{"type": "object"}, None]


def test_logprobs_round_trip_through_score(serving):
    backend = TokenBackend()
    _, url = serving(backend)
    client = client_for(url)
    scores = client.score(images(2), ["", "Look."], [["cat", "dog"], ["dog", "cat"]])
    cat, dog = math.log(0.8), math.log(1 - 0.6)
    np.testing.assert_allclose(scores, [[cat, dog], [dog, cat]], rtol=1e-6)
    assert client.counts == {"requests": 4}
    assert {(call["max_tokens"], call["top_logprobs"]) for call in backend.calls} == {(1, 2)}
    image_url = f"data:image/png;base64,{png_base64(images(1)[0])}"
    status, body = request(f"{url}/chat/completions", chat(image_url, 'show "cat"?', logprobs=True, top_logprobs=1,
                                                           max_tokens=1))
    assert status == 200
    assert body["choices"][0]["logprobs"] == {"content": [
        {"token": "Yes", "logprob": math.log(0.8), "top_logprobs": [{"token": "Yes", "logprob": math.log(0.8)}]}]}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 1


def test_micro_batcher_gathers_concurrent_requests(serving):
    backend = ColourBackend()
    server, url = serving(backend, max_wait_s=0.05)
    client = client_for(url, concurrency=16)
    batch = images(16)
    results: dict[int, list[str]] = {}

    def run(max_tokens: int) -> None:
        results[max_tokens] = client.generate(batch[:8], [f"p{index}" for index in range(8)], max_tokens=max_tokens)

    threads = [threading.Thread(target=run, args=(max_tokens,)) for max_tokens in (5, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for max_tokens in (5, 7):  # each answer shows its own max_tokens: no call mixed the two
        assert results[max_tokens] == ColourBackend().generate(batch[:8], [f"p{index}" for index in range(8)],
                                                               max_tokens=max_tokens)
    sizes = server.batcher.batch_sizes
    assert sum(sizes) == 16 and len(sizes) < 16 and max(sizes) <= backend.batch_size


def test_max_batch_bounds_each_backend_call(serving):
    backend = ColourBackend()
    server, url = serving(backend, max_batch=3, max_wait_s=0.05)
    assert len(client_for(url, concurrency=8).generate(images(8), ["q"] * 8)) == 8
    assert sum(server.batcher.batch_sizes) == 8 and max(server.batcher.batch_sizes) <= 3


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not JSON"),
    ({"messages": [{"role": "user", "content": "no image"}]}, "exactly one image, got 0"),
    (chat("https://example.com/cat.png"), "not fetched"),
    (chat("file:///etc/passwd"), "not fetched"),
    (chat("data:image/png;base64,!!!!"), "could not be decoded"),
    (chat("data:image/png,rawbytes"), "must be base64"),
    (chat({"url": "aGVsbG8="}), "could not be decoded"),
    (chat(None), "image_url must be a data URL string"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "unsupported content part"),
])
def test_bad_requests_get_openai_shaped_400s(serving, body, message):
    _, url = serving(ColourBackend())
    status, error = request(f"{url}/chat/completions", body)
    assert status == 400
    assert set(error["error"]) == {"message", "type", "code"} and error["error"]["type"] == "invalid_request_error"
    assert message in error["error"]["message"]


@pytest.mark.parametrize("fields, message", [
    ({"max_tokens": 0}, "max_tokens must be a positive integer"),
    ({"max_tokens": "8"}, "max_tokens must be a positive integer"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"response_format": {"type": "grammar"}}, "response_format type must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs a schema object"),
    ({"logprobs": True}, "logprobs are not supported by this backend"),
    ({"stream": True}, "stream is not supported"),
    ({"n": 2}, "only n=1"),
])
def test_bad_fields_get_400s(serving, fields, message):
    backend = ColourBackend()
    _, url = serving(backend)
    status, error = request(f"{url}/chat/completions", chat(f"data:image/png;base64,{png_base64(images(1)[0])}",
                                                           **fields))
    assert status == 400 and message in error["error"]["message"]
    assert backend.calls == []


def test_logprobs_out_of_range_and_with_a_schema_are_400s(serving):
    _, url = serving(TokenBackend())
    image_url = f"data:image/png;base64,{png_base64(images(1)[0])}"
    status, error = request(f"{url}/chat/completions", chat(image_url, logprobs=True, top_logprobs=21))
    assert status == 400 and "top_logprobs must be an integer in [0, 20]" in error["error"]["message"]
    status, error = request(f"{url}/chat/completions", chat(image_url, logprobs=True,
                                                           response_format={"type": "json_object"}))
    assert status == 400 and "logprobs with response_format" in error["error"]["message"]


def test_backend_exception_is_a_500_and_the_client_counts_it(serving):
    _, url = serving(ColourBackend(fail_on="explode"))
    status, error = request(f"{url}/chat/completions", chat(f"data:image/png;base64,{png_base64(images(1)[0])}",
                                                           "explode"))
    assert status == 500 and error["error"]["type"] == "server_error"
    assert "RuntimeError: the fake backend fails on request" in error["error"]["message"]
    client = client_for(url)
    assert client.generate(images(1), ["explode"]) == [""]
    assert client.counts == {"requests": 1, "failed/http_500": 1}


def test_models_health_and_unknown_paths(serving):
    _, url = serving(ColourBackend(), model_name="my-model")
    status, models = request(f"{url}/models")
    assert status == 200 and models["object"] == "list" and [model["id"] for model in models["data"]] == ["my-model"]
    assert request(url.removesuffix("/v1") + "/health") == (200, {"status": "ok"})
    status, error = request(f"{url}/completions", {"prompt": "x"})
    assert status == 404 and error["error"]["code"] == "not_found"
