"""vlm_jax.mllm.http.OpenAIClient against a scripted OpenAI-compatible server on loopback."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from absl import logging as absl_logging
from PIL import Image

from vlm_jax.errors import UserError
from vlm_jax.mllm.config import MLLMConfig
from vlm_jax.mllm.http import FLOOR, OpenAIClient

SCHEMA = {"type": "array", "items": {"type": "string", "enum": ["cat", "dog"]}, "minItems": 1, "maxItems": 1}


@dataclasses.dataclass
class Reply:
    status: int = 200
    body: Any = None  # a dict is sent as JSON, bytes as they are
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay: float = 0.0


@dataclasses.dataclass
class Seen:
    path: str
    authorization: str | None
    body: dict[str, Any]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client that timed out and closed its socket is expected here."""


class FakeOpenAI:
    """`respond(index, body) -> Reply` answers each POST; `seen` records them, `max_in_flight` the most at once."""

    def __init__(self, respond: Callable[[int, dict[str, Any]], Reply]):
        self.respond = respond
        self.seen: list[Seen] = []
        self.in_flight = self.max_in_flight = 0
        lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # noqa: A002
                """Quiet."""

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    index = len(fake.seen)
                    fake.seen.append(Seen(self.path, self.headers.get("Authorization"), body))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                reply = fake.respond(index, body)
                time.sleep(reply.delay)
                with lock:
                    fake.in_flight -= 1
                data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def text_of(body: dict[str, Any]) -> str:
    return next(part["text"] for part in body["messages"][0]["content"] if part["type"] == "text")


def completion(content: str | None, **message: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, **message},
                         "finish_reason": "stop"}]}


def echo(index: int, body: dict[str, Any]) -> Reply:
    return Reply(body=completion(f"answer to {text_of(body)}"))


@pytest.fixture
def serve():
    """serve(respond=echo) -> a running FakeOpenAI, closed after the test."""
    servers = []

    def start(respond: Callable[[int, dict[str, Any]], Reply] = echo) -> FakeOpenAI:
        servers.append(FakeOpenAI(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def client_for(base_url: str, **overrides: Any) -> OpenAIClient:
    fields = {"backend": "openai", "base_url": base_url, "model": "test-model", "timeout_s": 2.0, "max_retries": 2,
              "backoff_s": 0.001, "concurrency": 2}
    fields.update(overrides)
    return OpenAIClient(MLLMConfig(**fields))


def images(count: int, height: int = 24, width: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def sent_image(body: dict[str, Any]) -> tuple[str, Image.Image]:
    """(the data URL's prefix, the decoded image) of the request's one image part."""
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    prefix, _, data = url.partition(",")
    return prefix, Image.open(io.BytesIO(base64.b64decode(data)))


def test_generate_answers_each_prompt(serve):
    server = serve()
    client = client_for(server.base_url)
    texts = client.generate(images(3), ["one", "two", "three"], max_tokens=7)
    assert texts == ["answer to one", "answer to two", "answer to three"]
    assert client.counts == {"requests": 3}
    assert {seen.path for seen in server.seen} == {"/v1/chat/completions"}
    assert all(seen.body["max_tokens"] == 7 and seen.body["temperature"] == 0.0 for seen in server.seen)
    assert all(seen.body["model"] == "test-model" and seen.authorization is None for seen in server.seen)


def test_slow_answer_times_out_and_is_counted(serve):
    server = serve(lambda index, body: Reply(body=completion("late"), delay=0.5))
    client = client_for(server.base_url, timeout_s=0.2, max_retries=1)
    started = time.monotonic()
    assert client.generate(images(1), ["q"]) == [""]
    assert time.monotonic() - started < 1.0
    assert client.counts == {"requests": 2, "retries": 1, "failed/timeout": 1}


def test_429_and_500_are_retried_then_answered(serve):
    script = [Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.3"}),
              Reply(500, {"error": {"message": "boom"}})]
    server = serve(lambda index, body: script[index] if index < len(script) else echo(index, body))
    client = client_for(server.base_url, max_retries=3)
    started = time.monotonic()
    assert client.generate(images(1), ["q"]) == ["answer to q"]
    assert time.monotonic() - started >= 0.3  # Retry-After honoured over the 1 ms backoff
    assert client.counts == {"requests": 3, "retries": 2}


def test_retries_exhausted_give_an_empty_answer(serve):
    server = serve(lambda index, body: Reply(503, {"error": {"message": "overloaded"}}))
    client = client_for(server.base_url, max_retries=2)
    assert client.generate(images(1), ["q"]) == [""]
    assert len(server.seen) == 3
    assert client.counts == {"requests": 3, "retries": 2, "failed/http_503": 1}


def test_rejected_image_is_counted_without_retry(serve):
    server = serve(lambda index, body: Reply(413, {"error": {"message": "request entity too large"}}))
    client = client_for(server.base_url)
    assert client.generate(images(2), ["a", "b"]) == ["", ""]
    assert client.counts == {"requests": 2, "failed/image_rejected": 2}


@pytest.mark.parametrize("call", ["generate", "score"])
def test_unreachable_server_is_a_one_line_user_error(call):
    url = closed_port_url()
    client = client_for(url, max_retries=3, concurrency=4)
    started = time.monotonic()
    with pytest.raises(UserError) as raised:
        if call == "generate":
            client.generate(images(6), ["q"] * 6)
        else:
            client.score(images(2), ["q", "q"], [["a", "b"], ["c", "d"]])
    assert time.monotonic() - started < 2.0
    message = str(raised.value)
    assert "\n" not in message
    assert url in message and "cannot be reached" in message and "--config.mllm.base_url" in message
    assert client.counts["failed/connection"] == (6 if call == "generate" else 4)


def test_malformed_responses_are_counted(serve):
    replies = {"garbage": Reply(body=b"{not json"), "empty": Reply(body={"object": "chat.completion"}),
               "none": Reply(body=completion(None)), "ok": Reply(body=completion("fine"))}
    server = serve(lambda index, body: replies[text_of(body)])
    client = client_for(server.base_url)
    assert client.generate(images(4), ["garbage", "empty", "none", "ok"]) == ["", "", "", "fine"]
    assert client.counts == {"requests": 4, "failed/malformed_response": 3}


def test_refusal_gives_an_empty_answer(serve):
    server = serve(lambda index, body: Reply(body=completion(None, refusal="I cannot help with that.")))
    client = client_for(server.base_url)
    assert client.generate(images(1), ["q"]) == [""]
    assert client.counts == {"requests": 1, "refusal": 1}


def test_request_body_holds_one_downscaled_image_then_the_text(serve):
    server = serve()
    big = images(1, height=200, width=300)[0]
    small = images(1, height=10, width=20)[0]
    client_for(server.base_url, max_side=64, image_format="jpeg").generate([big, small], ["big", "small"])
    bodies = sorted((seen.body for seen in server.seen), key=text_of)
    for body, size in zip(bodies, [(64, 43), (20, 10)]):
        content = body["messages"][0]["content"]
        assert [part["type"] for part in content] == ["image_url", "text"]
        assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
        prefix, picture = sent_image(body)
        assert prefix == "data:image/jpeg;base64"
        assert picture.format == "JPEG" and picture.size == size  # never upscaled
    server.seen.clear()
    client_for(server.base_url, max_side=512, image_format="png").generate([big], ["exact"])
    prefix, picture = sent_image(server.seen[0].body)
    assert prefix == "data:image/png;base64"
    np.testing.assert_array_equal(np.asarray(picture.convert("RGB")), big)


@pytest.mark.parametrize("kind, expected", [
    ("openai", {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}),
    ("vllm", {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}),
    ("sglang", {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}),
    ("llamacpp", {"type": "json_schema", "schema": SCHEMA}),
    ("ollama", {"type": "json_object"}),
])
def test_structured_output_body_per_server_kind(serve, kind, expected):
    server = serve()
    client = client_for(server.base_url, server_kind=kind)
    client.generate(images(1), ["pick one"], schema=SCHEMA)
    body = server.seen[0].body
    assert body["response_format"] == expected
    if kind == "ollama":
        assert text_of(body) == f"pick one\nAnswer with JSON that follows this JSON schema: {json.dumps(SCHEMA)}"
    else:
        assert text_of(body) == "pick one"


def test_structured_output_off_sends_plain_text(serve):
    server = serve()
    client_for(server.base_url, structured_output=False).generate(images(1), ["pick one"], schema=SCHEMA)
    assert "response_format" not in server.seen[0].body and text_of(server.seen[0].body) == "pick one"


def test_400_to_response_format_falls_back_to_plain_text_for_good(serve):
    def respond(index, body):
        if "response_format" in body:
            return Reply(400, {"error": {"message": "unknown field response_format"}})
        return echo(index, body)

    server = serve(respond)
    client = client_for(server.base_url, concurrency=1)
    assert client.generate(images(2), ["a", "b"], schema=SCHEMA) == ["answer to a", "answer to b"]
    assert client.generate(images(1), ["c"], schema=SCHEMA) == ["answer to c"]
    assert ["response_format" in seen.body for seen in server.seen] == [True, False, False, False]
    assert client.counts == {"requests": 4, "structured_output_unsupported": 1}


def _yes_no(index: int, body: dict[str, Any]) -> Reply:
    candidate = re.search(r'show "(.*)"\?', text_of(body)).group(1)
    top = {"cat": [("Yes", -0.5), ("\u2581yes", -1.5)], "dog": [(" no", math.log(0.75)), ("The", -3.0)],
           "bird": [("Maybe", -0.2), ("The", -2.0)]}[candidate]
    logprobs = {"content": [{"token": top[0][0], "logprob": top[0][1],
                             "top_logprobs": [{"token": token, "logprob": logprob} for token, logprob in top]}]}
    reply = completion(top[0][0])
    reply["choices"][0]["logprobs"] = logprobs
    return Reply(body=reply)


def test_score_reads_yes_and_no_logprobs(serve):
    server = serve(_yes_no)
    client = client_for(server.base_url)
    scores = client.score(images(2), ["", "Look closely."], [["cat", "dog", "bird"], ["bird", "cat", "dog"]],
                          normalize=True)
    cat, dog = math.log(math.exp(-0.5) + math.exp(-1.5)), math.log(0.25)
    assert scores.dtype == np.float32 and scores.shape == (2, 3)
    np.testing.assert_allclose(scores, [[cat, dog, FLOOR], [FLOOR, cat, dog]], rtol=1e-6)
    assert client.counts == {"requests": 6, "score/neither_yes_no": 2}
    texts = sorted(text_of(seen.body) for seen in server.seen)
    assert texts[0] == 'Does this figure show "bird"? Please answer Yes or No.'
    assert 'Look closely.\nDoes this figure show "cat"? Please answer Yes or No.' in texts
    for seen in server.seen:
        assert {name: seen.body[name] for name in ("logprobs", "top_logprobs", "max_tokens", "temperature")} == \
            {"logprobs": True, "top_logprobs": 2, "max_tokens": 1, "temperature": 0}


def test_score_without_logprobs_in_the_answer_is_counted(serve):
    server = serve()
    client = client_for(server.base_url)
    np.testing.assert_array_equal(client.score(images(1), ["q"], [["cat"]]), np.float32([[FLOOR]]))
    assert client.counts == {"requests": 1, "failed/no_logprobs": 1}


def test_cache_answers_a_rerun_without_requests(serve, tmp_path):
    def respond(index, body):
        if text_of(body) == "fail":
            return Reply(500, {"error": {"message": "no"}})
        return _yes_no(index, body) if "logprobs" in body else echo(index, body)

    first_server, second_server = serve(respond), serve(respond)
    cache = str(tmp_path / "cache")
    run_images = images(3)

    def run(client: OpenAIClient) -> tuple[list[str], np.ndarray]:
        return (client.generate(run_images, ["a", "b", "fail"], max_tokens=5),
                client.score(run_images[:1], ["q"], [["cat", "dog"]]))

    first = client_for(first_server.base_url, cache_dir=cache, max_retries=0)
    texts, scores = run(first)
    assert texts == ["answer to a", "answer to b", ""]
    assert len(first_server.seen) == 5
    files = sorted(os.path.relpath(os.path.join(root, name), cache)
                   for root, _, names in os.walk(cache) for name in names)
    assert len(files) == 4  # the failed request is not cached
    assert all(re.fullmatch(r"([0-9a-f]{2})/\1[0-9a-f]{62}\.json", name) for name in files)

    second = client_for(second_server.base_url, cache_dir=cache, max_retries=0)  # base_url is not in the key
    second_texts, second_scores = run(second)
    assert second_texts == texts
    np.testing.assert_array_equal(second_scores, scores)
    assert [text_of(seen.body) for seen in second_server.seen] == ["fail"]
    assert second.counts == {"cache_hits": 4, "requests": 1, "failed/http_500": 1}
    assert second.generate(run_images[:1], ["a"], max_tokens=6) == ["answer to a"]  # max_tokens is in the key
    assert len(second_server.seen) == 2


def test_api_key_is_sent_only_in_the_authorization_header(serve, tmp_path, monkeypatch, caplog, capsys):
    secret = f"sk-{secrets.token_hex(16)}"
    monkeypatch.setenv("VLM_JAX_TEST_KEY", secret)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    replies = {"busy": Reply(503, {"error": {"message": "busy"}}),
               "deny": Reply(401, {"error": {"message": f"Incorrect API key provided: {secret}"}}),
               "garbage": Reply(body=f"not json {secret}".encode())}
    server = serve(lambda index, body: replies.get(text_of(body)) or echo(index, body))
    absl_logger = absl_logging.get_absl_logger()
    level = absl_logger.level  # restored as it was: set_verbosity would pin it (NOTSET defers to caplog)
    absl_logger.setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    errors = []
    try:
        client = client_for(server.base_url, api_key_env="VLM_JAX_TEST_KEY", cache_dir=str(tmp_path / "cache"))
        texts = client.generate(images(4), ["ok", "busy", "deny", "garbage"])
        client.score(images(1), ["ok"], [["cat"]])
        with pytest.raises(UserError) as raised:
            client_for(closed_port_url(), api_key_env="VLM_JAX_TEST_KEY").generate(images(1), ["ok"])
        errors.append(str(raised.value))
    finally:
        absl_logger.setLevel(level)
    assert texts == ["answer to ok", "", "", ""]
    assert {seen.authorization for seen in server.seen} == {f"Bearer {secret}"}
    assert not any(secret in json.dumps(seen.body) for seen in server.seen)
    logged = [record.getMessage() + (record.exc_text or "") for record in caplog.records]
    assert any(message.startswith("POST ") for message in logged)  # debug records were captured
    assert any("failed/http_401" in message for message in logged)
    assert not any(secret in message for message in logged)
    output = capsys.readouterr()
    assert secret not in output.out + output.err
    assert not any(secret in error for error in errors)
    assert secret not in repr(client) and secret not in str(client.counts)
    written = [os.path.join(root, name) for root, _, names in os.walk(tmp_path) for name in names]
    assert written
    for path in written:
        with open(path, "rb") as file:
            assert secret.encode() not in file.read(), path


def test_missing_api_key_variable_is_a_user_error_naming_it(monkeypatch):
    monkeypatch.delenv("VLM_JAX_ABSENT_KEY", raising=False)
    with pytest.raises(UserError, match="VLM_JAX_ABSENT_KEY") as raised:
        client_for("http://127.0.0.1:1/v1", api_key_env="VLM_JAX_ABSENT_KEY")
    assert "\n" not in str(raised.value)


def test_concurrency_bounds_requests_in_flight(serve):
    server = serve(lambda index, body: Reply(body=completion("ok"), delay=0.1))
    client = client_for(server.base_url, concurrency=4)
    assert client.generate(images(12), ["q"] * 12) == ["ok"] * 12
    assert 1 < server.max_in_flight <= 4


@pytest.mark.parametrize("base_url", ["", "localhost:8000/v1"])
def test_base_url_must_be_an_http_url(base_url):
    with pytest.raises(UserError, match=r"mllm\.base_url=.* is not an http\(s\) URL"):
        client_for(base_url)


def test_unreachable_server_stops_the_other_requests_retrying():
    client = client_for(closed_port_url(), max_retries=2, backoff_s=0.1, concurrency=2)
    with pytest.raises(UserError, match="cannot be reached"):
        client.generate(images(8), ["q"] * 8)
    assert client.counts["failed/connection"] == 8
    assert client.counts["requests"] <= 6  # the two first requests' 3 attempts each; the rest are not sent


def test_rar_ranks_through_the_client_and_counts_what_real_servers_answer(serve):
    """Names outside the list, duplicates, short lists, refusals and failed requests all reach RAR's
    parser through the HTTP client; none is reused or dropped silently."""
    import vlm_jax.methods.rar as rar  # noqa: PLC0415 - the method on top of the client

    by_first_name = {"zorvid": Reply(body=completion('```json\n["kalpo", "zorvid", "mub"]\n```')),
                     "kalpo": Reply(body=completion("[dax, kalpo, kalpo]")),               # unknown + duplicate
                     "mub": Reply(body=completion("['zorvid']")),                          # short
                     "dax": Reply(body=completion(None, refusal="I can't help with that.")),
                     "wug": Reply(status=500, body={"error": {"message": "down"}})}        # retried, then ""

    def respond(index, body):
        return by_first_name[text_of(body).split("[")[1].split(",")[0].strip("'")]

    server = serve(respond)
    client = client_for(server.base_url, max_retries=1)
    names = ["zorvid", "kalpo", "mub", "dax", "wug"]
    candidates = np.asarray([[0, 1, 2], [1, 0, 2], [2, 0, 1], [3, 0, 1], [4, 0, 1]])
    ranked, events = rar.rank(client, images(5), candidates, names, rar.RarConfig(k=3))
    assert ranked.tolist() == [[1, 0, 2], [1, 0, 2], [0, 2, 1], [3, 0, 1], [4, 0, 1]]
    assert (events["unknown_name"], events["duplicate"], events["completed"]) == (1, 1, 2)
    assert events["empty"] == 2 and events["answers"] == 5 and events["answers_with_fallback"] == 4
    assert client.counts["refusal"] == 1 and client.counts["retries"] == 1
    assert all(body.body["response_format"]["json_schema"]["schema"]["minItems"] == 3 for body in server.seen)
