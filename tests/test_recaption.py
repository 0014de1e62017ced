"""vlm_jax.mllm.recaption: resumable recaptioning (exactly once after SIGKILL), quality filters, rejections by
reason, the HTTP path against the embedded backend in-process, text-only rewriting, config checks, and
`RecaptionedSource`.

Corpora are small ArrayRecord files of 32 px PNG images written in the test; the backends are a deterministic
fake (answers derived from the prompt) and a tiny random-init captioner export served on loopback.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vlm_jax.config_lib import ConfigError
from vlm_jax.data import corpora
from vlm_jax.data.pipeline import make_source
from vlm_jax.errors import UserError
from vlm_jax.mllm import recaption as rc
from vlm_jax.mllm.config import mllm_config

PROMPT = "Describe: {alt_text}[ Title: {title}.]"
NO_FILTERS = {"min_words": 0, "max_words": 0, "max_repeat_fraction": 1.0, "refusal_phrases": (),
              "min_ascii_fraction": 0.0}


class FakeMLLM:
    """Answers "a caption of <prompt>" (or `answer(prompt)`), sleeping `delay` seconds per call; records calls."""

    def __init__(self, delay: float = 0.0, answer=None):
        self.delay, self.answer = delay, answer
        self.calls: list[dict[str, Any]] = []

    def generate(self, images, prompts, max_tokens=64, *, schema=None):
        self.calls.append({"images": list(images), "prompts": list(prompts), "max_tokens": max_tokens})
        time.sleep(self.delay)
        return [self.answer(prompt) if self.answer else f"a caption of {prompt}" for prompt in prompts]


class ListSource:
    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return dict(self.records[index])


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def alt_text(identifier: Any) -> str:
    return f"alt text of record {identifier}"


def make_corpus(directory, count: int, *, corrupt=(), ids=None, no_alt_text=(), titles=False, size: int = 32,
                seed: int = 0) -> dict[str, Any]:
    """An ArrayRecord corpus (two files) of `count` PNG records; the data section that names it."""
    rng = np.random.default_rng(seed)
    records = []
    for position in range(count):
        identifier = ids[position] if ids is not None else position
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        record = {"id": identifier, "image": b"not an image" if position in corrupt else png(image),
                  "caption": "" if position in no_alt_text else alt_text(identifier)}
        if titles:
            record["title"] = f"page {identifier}" if position % 2 else ""
        records.append(record)
    os.makedirs(directory, exist_ok=True)
    corpora.convert_to_array_record(ListSource(records), str(directory), num_shards=2)
    return {"source": "array_record", "paths": os.path.join(str(directory), "corpus-*.array_record")}


def section(data: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Recaption overrides as plain data (JSON-able): grounded with PROMPT, small batches, no progress bar."""
    values = {"data": data, "mode": "grounded", "prompts": {"grounded": PROMPT, "ungrounded": "Describe the image.",
                                                            "rewrite": "Rewrite: {alt_text}"},
              "batch_size": 4, "shard_size": 10, "max_tokens": 16, "progress": False}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return values


def shard_records(directory) -> tuple[list[dict], list[dict]]:
    """(every record of the .array_record shards, every record of the .jsonl twins), shard by shard."""
    arrays, lines = [], []
    for number in rc.finished_shards(directory):
        array_path, jsonl_path = rc.shard_paths(directory, number)
        arrays.extend(rc.read_shard(array_path))
        with open(jsonl_path, encoding="utf-8") as file:
            lines.extend(json.loads(line) for line in file)
    return arrays, lines


def assert_exactly_once(directory, count: int) -> list[dict]:
    arrays, lines = shard_records(directory)
    assert arrays == lines
    assert sorted(record["index"] for record in arrays) == list(range(count))
    ids = [record["id"] for record in arrays]
    assert len(ids) == len(set(ids)) == count
    for name in os.listdir(directory):
        assert ".tmp-" not in name, name
        match = rc.SHARD_PATTERN.match(name)
        assert match or name in (rc.MANIFEST_FILE, rc.SUMMARY_FILE), name
    numbers = {int(rc.SHARD_PATTERN.match(name).group(1)) for name in os.listdir(directory)
               if rc.SHARD_PATTERN.match(name)}
    assert numbers == set(rc.finished_shards(directory))  # no twin without its shard
    return arrays


def assert_summary_matches_shards(directory) -> dict[str, Any]:
    with open(os.path.join(directory, rc.SUMMARY_FILE)) as file:
        summary = json.load(file)
    recomputed = rc.summarize(directory)
    assert {name: summary[name] for name in ("written", "kept", "rejected")} == recomputed
    assert summary["written"] == summary["kept"] + sum(summary["rejected"].values())
    return summary


# -- prompts and filters --------------------------------------------------------------------------------------


def test_render_prompt_fills_placeholders_and_drops_bracketed_parts_without_text():
    assert rc.render_prompt(PROMPT, "a red star", "Stars") == "Describe: a red star Title: Stars."
    assert rc.render_prompt(PROMPT, "a red star", "") == "Describe: a red star"
    assert rc.render_prompt("[Alt: {alt_text}.] Go.", "", "") == "Go."
    # braces and brackets in the texts are never interpreted
    assert rc.render_prompt(PROMPT, "{title} [x]", "t") == "Describe: {title} [x] Title: t."
    default = rc.recaption_config().prompts.grounded
    assert rc.render_prompt(default, "a dog", "") == ("Describe this image in detail. Its alt-text is: a dog. Use the "
                                                      "alt-text and title only where the image agrees with them.")


@pytest.mark.parametrize("template, message", [
    ("Describe {caption}", "placeholder {caption}"),
    ("Describe [{alt_text} [nested]]", "unbalanced or nested"),
    ("Describe {alt_text", "not a valid template"),
    ("Describe ]", "unbalanced"),
])
def test_a_bad_template_is_a_one_line_config_error(tmp_path, template, message):
    data = make_corpus(tmp_path / "corpus", 2)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("{", r"\{")) as error:
        rc.check_recaption_section(section(data, prompts={"grounded": template}))
    assert "\n" not in str(error.value)


FILTERS = rc.filters_config()


@pytest.mark.parametrize("text, reason", [
    ("a large striped red star to the left of a small solid blue circle", ""),
    ("Une grande étoile rouge à rayures", ""),  # Latin script with accents passes the script check
    ("", "empty"),
    ("   \n ", "empty"),
    (None, "empty"),
    ("I'm sorry, but I cannot describe this image.", "refusal"),
    ("I\u2019m sorry, no.", "refusal"),  # a curly apostrophe
    ("As an AI language model I see a cat", "refusal"),
    ("a cat that seems unable to move", "refusal"),
    ("a cat that seems unable", ""),  # phrases match whole words only: "unable to" is not here
    ("Большая красная звезда на синем фоне", "script"),
    ("一只红色的星星在蓝色圆圈的左边", "script"),
    ("a star", "too_short"),
    (" ".join(["word"] * 301), "too_long"),
    ("a red star a red star a red star a red star a red star", "repetitive"),
    ("a red star and a blue circle and a red star", ""),
])
def test_quality_reason_case_by_case(text, reason):
    assert rc.quality_reason(text, FILTERS) == reason


def test_quality_filter_thresholds_can_be_disabled():
    repetitive = "a red star a red star a red star a red star"
    assert rc.quality_reason(repetitive, {**FILTERS.to_dict(), "max_repeat_fraction": 1.0}) == ""
    assert rc.quality_reason("Большая красная звезда", {**FILTERS.to_dict(), "min_ascii_fraction": 0.0}) == ""
    assert rc.quality_reason("a star", {**FILTERS.to_dict(), "min_words": 0}) == ""
    assert rc.quality_reason(" ".join(f"w{i}" for i in range(999)), {**FILTERS.to_dict(), "max_words": 0}) == ""
    assert rc.repeat_fraction("a b c a b c", 3) == pytest.approx(1 - 3 / 4)
    assert rc.ascii_fraction("abé") == pytest.approx(2 / 3)


# -- the pipeline -------------------------------------------------------------------------------------------------


RESUME_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_recaption import FakeMLLM
from vlm_jax.mllm.recaption import recaption
recaption(json.loads(sys.argv[2]), FakeMLLM(delay=float(sys.argv[4])), sys.argv[3])
"""


def test_killed_at_any_moment_and_rerun_every_id_is_written_exactly_once(tmp_path):
    count, corrupt = 200, (7, 150)
    data = make_corpus(tmp_path / "corpus", count, corrupt=corrupt)
    config = section(data, batch_size=5, shard_size=20)
    out = str(tmp_path / "out")
    process = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, os.path.dirname(__file__), json.dumps(config),
                                out, "0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not rc.finished_shards(out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, process.communicate()[0].decode()[-2000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = rc.finished_shards(out)
    assert 1 <= len(finished) < count // 20 and not os.path.exists(os.path.join(out, rc.SUMMARY_FILE))
    done = sum(len(rc.read_shard(rc.shard_paths(out, number)[0])) for number in finished)

    fake = FakeMLLM()
    summary = rc.recaption(config, fake, out)
    records = assert_exactly_once(out, count)
    assert sum(len(call["prompts"]) for call in fake.calls) == count - done - sum(p >= done for p in corrupt)
    assert summary["written"] == count and summary["kept"] == count - len(corrupt)
    assert summary["rejected"] == {"corrupt_image": len(corrupt)} and summary["remaining"] == 0
    assert_summary_matches_shards(out)
    for record in records:  # each answer belongs to its own record
        if record["index"] in corrupt:
            assert record["recaption"] is None and record["rejected"] == "corrupt_image"
        else:
            assert record["id"] == str(record["index"])
            assert record["recaption"] == f"a caption of Describe: {alt_text(record['index'])}"
        assert record["source_text"] == alt_text(record["index"])
    again = FakeMLLM()
    assert rc.recaption(config, again, out)["written"] == count and again.calls == []  # nothing left to do


def test_a_shard_interrupted_between_its_two_files_is_redone_and_never_read(tmp_path, monkeypatch):
    data = make_corpus(tmp_path / "corpus", 30)
    out = str(tmp_path / "out")
    real_replace = os.replace
    renamed: list[str] = []

    def replace(source, target):
        if str(target).endswith("-00001.array_record"):
            raise KeyboardInterrupt  # killed after the twin of shard 1 was renamed, before the shard itself
        if str(target).endswith("-00002.jsonl"):
            raise AssertionError("shard 2 must not start")
        renamed.append(str(target))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        rc.recaption(section(data), FakeMLLM(), out)
    monkeypatch.setattr(os, "replace", real_replace)
    assert os.path.exists(rc.shard_paths(out, 1)[1]) and rc.finished_shards(out) == [0]
    assert not any(".tmp-" in name for name in os.listdir(out))
    assert len(rc.read_recaptions(out)) == 10  # the reader sees shard 0 only
    fake = FakeMLLM()
    rc.recaption(section(data), fake, out)
    assert sum(len(call["prompts"]) for call in fake.calls) == 20
    assert_exactly_once(out, 30)
    assert_summary_matches_shards(out)


ANSWERS = {  # position % 8 -> the fake's answer, and the reason it is rejected for
    0: ("a large striped red star to the left of a circle", ""),
    1: ("I'm sorry, I cannot help with that image.", "refusal"),
    2: ("", "empty"),
    3: ("a star", "too_short"),
    4: ("red star red star red star red star red star red star", "repetitive"),
    5: ("Большая красная звезда на синем фоне", "script"),
    6: (" ".join(["word"] * 40), "too_long"),
    7: ("a small solid blue circle above a square", ""),
}


def _answer_by_position(prompt: str) -> str:
    return ANSWERS[int(prompt.rsplit(" ", 1)[-1]) % 8][0]


def test_rejections_are_written_counted_by_reason_and_a_corrupt_image_is_not_fatal(tmp_path):
    count, corrupt = 24, (9, 10)
    data = make_corpus(tmp_path / "corpus", count, corrupt=corrupt)
    out = str(tmp_path / "out")
    config = section(data, filters={"max_words": 30})
    summary = rc.recaption(config, FakeMLLM(answer=_answer_by_position), out)
    expected: dict[str, int] = {}
    for position in range(count):
        reason = "corrupt_image" if position in corrupt else ANSWERS[position % 8][1]
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert summary["rejected"] == dict(sorted(expected.items()))
    assert summary["kept"] == count - sum(expected.values()) and summary["written"] == count
    assert_summary_matches_shards(out)
    kept = rc.read_recaptions(out)
    assert kept == {str(p): ANSWERS[p % 8][0] for p in range(count) if p not in corrupt and not ANSWERS[p % 8][1]}
    assert "written" in rc.summary_line(summary) and "corrupt_image 2" in rc.summary_line(summary)
    # a rerun retries nothing: rejected records are final
    again = FakeMLLM(answer=_answer_by_position)
    assert rc.recaption(config, again, out)["rejected"] == summary["rejected"] and again.calls == []


class FlakyMLLM(FakeMLLM):
    """Fails the requests of its first call like the HTTP client does: "" answers, counts["failed/timeout"]."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def generate(self, images, prompts, max_tokens=64, *, schema=None):
        texts = super().generate(images, prompts, max_tokens)
        if len(self.calls) == 1:
            self.counts["failed/timeout"] = len(prompts) - 1
            texts = [texts[0]] + [""] * (len(prompts) - 1)
        return texts


def test_answers_lost_to_failed_requests_are_not_written_and_a_rerun_retries_them(tmp_path):
    data = make_corpus(tmp_path / "corpus", 12)
    out = str(tmp_path / "out")
    summary = rc.recaption(section(data), FlakyMLLM(), out)
    assert summary["failed"] == 3 and summary["remaining"] == 3 and summary["written"] == 9
    assert "rerun to retry" in rc.summary_line(summary)
    fake = FakeMLLM()
    summary = rc.recaption(section(data), fake, out)
    assert [len(call["prompts"]) for call in fake.calls] == [3]
    assert summary["written"] == 12 and summary["kept"] == 12 and summary["failed"] == 0
    assert_exactly_once(out, 12)


def test_titles_ids_as_strings_and_limit(tmp_path):
    ids = [f"img-{index:03d}" for index in range(10)]
    data = make_corpus(tmp_path / "corpus", 10, ids=ids, titles=True)
    out = str(tmp_path / "out")
    fake = FakeMLLM()
    summary = rc.recaption(section(data, title_key="title", limit=6), fake, out)
    assert summary["written"] == 6 and summary["total"] == 6
    prompts = [prompt for call in fake.calls for prompt in call["prompts"]]
    assert prompts[0] == f"Describe: {alt_text(ids[0])}"
    assert prompts[1] == f"Describe: {alt_text(ids[1])} Title: page {ids[1]}."
    assert sorted(rc.read_recaptions(out)) == ids[:6]
    summary = rc.recaption(section(data, title_key="title", shard_size=3), fake, out)  # the rest, other shard size
    assert summary["written"] == 10 and sorted(rc.read_recaptions(out)) == ids
    assert all(isinstance(image, np.ndarray) and image.shape == (32, 32, 3) for call in fake.calls
               for image in call["images"])


def test_a_resumed_run_with_other_content_settings_is_a_user_error(tmp_path):
    data = make_corpus(tmp_path / "corpus", 4)
    out = str(tmp_path / "out")
    rc.recaption(section(data), FakeMLLM(), out)
    with pytest.raises(UserError, match="mode='grounded'.*'ungrounded'") as error:
        rc.recaption(section(data, mode="ungrounded"), FakeMLLM(), out)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="max_tokens"):
        rc.recaption(section(data, max_tokens=99), FakeMLLM(), out)
    rc.recaption(section(data, batch_size=1, shard_size=2, progress=True), FakeMLLM(), out)  # speed settings may change


def test_a_missing_id_field_is_a_one_line_user_error(tmp_path):
    data = make_corpus(tmp_path / "corpus", 3)
    with pytest.raises(UserError, match="id_key='index' is not a field"):
        rc.recaption(section(data, id_key="index"), FakeMLLM(), str(tmp_path / "out"))


# -- rewrite mode over HTTP ----------------------------------------------------------------------------------------


class RecordingServer:
    """An OpenAI-compatible fake on loopback that records every request body and answers "rewritten: <text>"."""

    def __init__(self):
        self.bodies: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # noqa: A002
                """Quiet."""

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                text = " ".join(part["text"] for part in body["messages"][0]["content"] if part["type"] == "text")
                data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant",
                                                                         "content": f"rewritten: {text}"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, args=(0.01,), daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def test_rewrite_mode_sends_text_only_requests_carrying_the_alt_text(tmp_path):
    data = make_corpus(tmp_path / "corpus", 8, corrupt=(2,), no_alt_text=(5,))
    server = RecordingServer()
    try:
        mllm = {"backend": "openai", "base_url": server.base_url, "model": "text-lm", "concurrency": 4,
                "max_retries": 0}
        out = rc.recaption_dir(section(data, mode="rewrite"), mllm, str(tmp_path / "out"))
    finally:
        server.close()
    assert len(server.bodies) == 7  # no request for the record without alt-text
    for body in server.bodies:
        (message,) = body["messages"]
        assert [part["type"] for part in message["content"]] == ["text"]
        assert "image_url" not in json.dumps(body)
        assert body["model"] == "text-lm" and body["max_tokens"] == 16
    texts = sorted(part["text"] for body in server.bodies for part in body["messages"][0]["content"])
    assert texts == sorted(f"Rewrite: {alt_text(p)}" for p in range(8) if p != 5)
    summary = assert_summary_matches_shards(out)
    # the image is never read in rewrite mode: a corrupt one does not matter
    assert summary["rejected"] == {"no_source_text": 1} and summary["kept"] == 7
    assert rc.read_recaptions(out)["2"] == f"rewritten: Rewrite: {alt_text(2)}"
    assert summary["backend"].startswith("openai base_url=")


def test_the_http_client_still_sends_the_image_part_first():
    from vlm_jax.mllm.config import parse_mllm  # noqa: PLC0415
    from vlm_jax.mllm.http import OpenAIClient  # noqa: PLC0415

    server = RecordingServer()
    try:
        client = OpenAIClient(parse_mllm(mllm_config(backend="openai", base_url=server.base_url, max_retries=0)))
        image = np.zeros((8, 8, 3), np.uint8)
        assert client.generate([image, None], ["with image", "text only"], 4) == ["rewritten: with image",
                                                                                 "rewritten: text only"]
    finally:
        server.close()
    kinds = {body["messages"][0]["content"][-1]["text"]: [part["type"] for part in body["messages"][0]["content"]]
             for body in server.bodies}
    assert kinds == {"with image": ["image_url", "text"], "text only": ["text"]}


# -- config checks -----------------------------------------------------------------------------------------------


def task_config(data, **mllm: Any):
    import ml_collections  # noqa: PLC0415

    config = ml_collections.ConfigDict({"task": "recaption", "recaption": rc.recaption_config(),
                                        "mllm": mllm_config(**mllm), "mllm_config": "", "data_dir": "",
                                        "cache_dir": ""})
    config.recaption.update(ml_collections.ConfigDict(section(data)))
    return config


def test_config_checks_are_one_line_config_errors(tmp_path):
    data = make_corpus(tmp_path / "corpus", 2)
    export = tmp_path / "export"
    export.mkdir()
    (export / "captioner.json").write_text("{}")
    config = task_config(data, model_dir=str(export))
    rc.check_recaption_config(config)

    def error(config) -> str:
        with pytest.raises(ConfigError) as raised:
            rc.check_recaption_config(config)
        assert "\n" not in str(raised.value)
        return str(raised.value)

    rewrite = task_config(data, model_dir=str(export))
    rewrite.recaption.mode = "rewrite"
    assert "openai-compatible text LM endpoint" in error(rewrite)
    rewrite.mllm.update(backend="openai", base_url="http://127.0.0.1:1/v1")
    rc.check_recaption_config(rewrite)
    for where in ("recaption", "recaption.filters", "recaption.prompts", "recaption.data", "mllm", ""):
        bad = task_config(data, model_dir=str(export))
        target = bad
        for name in filter(None, where.split(".")):
            target = target[name]
        target["colour_key"] = 1
        message = error(bad)
        assert f"{where + '.' if where else 'config.'}colour_key is not a field" in message
    bad = task_config(data, model_dir=str(export))
    bad.recaption.mode = "dense"
    assert "is not a mode" in error(bad)
    bad = task_config(data, model_dir=str(export))
    bad.recaption.filters.max_repeat_fraction = 2.0
    assert "max_repeat_fraction" in error(bad)
    assert "needs a captioner" in error(task_config(data))  # embedded: no model_dir, no mllm_config
    assert "base_url" in error(task_config(data, backend="openai"))
    bad = task_config(data, model_dir=str(export))
    bad.recaption.data.paths = str(tmp_path / "nothing-*.array_record")
    assert "matches no file" in error(bad)
    bad = task_config(data, model_dir=str(export))
    bad.recaption.alt_text_key = ""
    assert "alt_text_key is empty" in error(bad)


# -- the embedded captioner, in-process and over HTTP ---------------------------------------------------------------


HTTP_PROMPT = "Describe the image.[ Alt: {alt_text}.]"


@pytest.fixture(scope="module")
def captioner_export(tmp_path_factory):
    """A tiny random-init captioner export (32 px images, the Shapes World tokenizer); answers run to max_tokens."""
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from vlm_jax.data import shapes_world  # noqa: PLC0415
    from vlm_jax.data.preprocess import PreprocessSpec  # noqa: PLC0415
    from vlm_jax.data.tokenizer import Tokenizer  # noqa: PLC0415
    from vlm_jax.mllm.embedded import save_captioner  # noqa: PLC0415
    from vlm_jax.models import captioner as captioner_lib  # noqa: PLC0415
    from vlm_jax.models.clip import VisionConfig  # noqa: PLC0415

    root = tmp_path_factory.mktemp("captioner")
    tokenizer = Tokenizer.from_dir(shapes_world.save_tokenizer(root / "tokenizer"))
    config = captioner_lib.CaptionerConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=16, depth=1, heads=2, mlp_dim=32),
        vocab_size=tokenizer.vocab_size, context_length=64, width=32, depth=2, heads=2, mlp_dim=64,
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    # Random weights filled in from numpy on the abstract model: an eager random init costs seconds per op.
    model = nnx.eval_shape(lambda: captioner_lib.Captioner(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    updates = []
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape, name = value.get_value().shape, str(path[-1])
        if name == "scale":
            array = np.ones(shape)
        elif len(shape) < 2:
            array = rng.normal(0.0, 0.02, shape)
        else:
            array = rng.normal(0.0, 4.0 / np.sqrt(np.prod(shape[:-1])), shape)  # varied answers
        if path == ("head", "bias"):
            array[config.eos_id] = -10.0
        updates.append((path, value.replace(jnp.asarray(array, value.get_value().dtype))))
    nnx.update(model, nnx.from_flat_state(updates))
    save_captioner(model, root / "export", tokenizer, PreprocessSpec.clip(32))
    return str(root / "export")


def test_recaptions_through_http_equal_the_embedded_backend_in_process(tmp_path, captioner_export):
    from vlm_jax.mllm.embedded import EmbeddedMLLM  # noqa: PLC0415
    from vlm_jax.mllm.serve import serving  # noqa: PLC0415

    data = make_corpus(tmp_path / "corpus", 10, corrupt=(4,))
    config = section(data, prompts={"grounded": HTTP_PROMPT}, max_tokens=8,
                     filters=NO_FILTERS, batch_size=6)
    embedded = rc.recaption_dir(config, {"backend": "embedded", "model_dir": captioner_export, "batch_size": 4},
                                str(tmp_path / "embedded"))
    backend = EmbeddedMLLM.load(captioner_export, batch_size=4)
    with serving(backend) as url:
        over_http = rc.recaption_dir(config, {"backend": "openai", "base_url": url, "image_format": "png",
                                              "max_side": 64, "concurrency": 4, "max_retries": 0},
                                     str(tmp_path / "http"))
    in_process, through_http = shard_records(embedded)[0], shard_records(over_http)[0]
    assert through_http == in_process
    kept = [record for record in in_process if not record["rejected"]]
    assert len(kept) == 9 and all(record["recaption"] for record in kept)
    assert len({record["recaption"] for record in kept}) > 1  # answers depend on the image
    assert rc.read_recaptions(over_http) == rc.read_recaptions(embedded)


def test_the_recaption_task_writes_to_the_workdir_and_prints_the_summary(tmp_path, captioner_export, capsys):
    data = make_corpus(tmp_path / "corpus", 5)
    config = task_config(data, model_dir=captioner_export, batch_size=4)
    # the shapes of the HTTP test's calls, so the jitted decoder is compiled once
    config.recaption.update(filters=NO_FILTERS, max_tokens=8, prompts={"grounded": HTTP_PROMPT})
    metrics = rc.recaption_task(config, tmp_path / "workdir")
    assert metrics["recaption/written"] == 5.0
    assert metrics["recaption/kept"] + sum(v for k, v in metrics.items() if k.startswith("recaption/rejected/")) == 5
    assert "recaption (grounded):" in capsys.readouterr().out
    summary = assert_summary_matches_shards(str(tmp_path / "workdir" / "recaptions"))
    assert summary["backend"].startswith("embedded model_dir=")


# -- reading back ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("array_record", [True, False])
def test_recaptioned_source_adds_the_recaption_and_counts_fallbacks(tmp_path, array_record):
    ids = [3, "b", 5, "d", 7]
    data = make_corpus(tmp_path / "corpus", 5, ids=ids)
    source = make_source(data) if array_record else ListSource([make_source(data)[i] for i in range(5)])
    recaptions = {"3": "a new caption of three", "d": "a new caption of d", "unused": "x"}
    wrapped = rc.RecaptionedSource(source, recaptions, id_key="id", fallback_key="caption")
    assert len(wrapped) == 5 and wrapped.fallbacks == wrapped.missing == 3 and wrapped.recaptioned == 2
    records = [wrapped[index] for index in range(5)]
    assert [record["recaption"] for record in records] == [
        "a new caption of three", alt_text("b"), alt_text(5), "a new caption of d", alt_text(7)]
    assert records[0]["caption"] == alt_text(3) and isinstance(records[0]["image"], bytes)
    plain = rc.RecaptionedSource(source, recaptions, id_key="id", key="text", fallback_key=None)
    assert plain[1]["text"] == "" and plain[3]["text"] == "a new caption of d"


def test_recaptioned_source_reads_a_recaption_directory(tmp_path):
    data = make_corpus(tmp_path / "corpus", 6)
    out = str(tmp_path / "out")
    rc.recaption(section(data), FakeMLLM(answer=lambda prompt: "" if prompt.endswith(" 2") else f"new {prompt}"), out)
    wrapped = rc.RecaptionedSource(make_source(data), out, id_key="id")
    assert wrapped.fallbacks == 1
    assert wrapped[2]["recaption"] == alt_text(2) and wrapped[0]["recaption"] == f"new Describe: {alt_text(0)}"
