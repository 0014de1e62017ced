"""Parity of the JAX OWLv2 detector with transformers' Owlv2ForObjectDetection (torch CPU).

Reference: a tiny random Owlv2Config (width 32, 2 layers, 32 px images, 8 px patches), every
parameter re-initialised with non-trivial values, saved with save_pretrained next to a word-level
tokenizer, and loaded by vlm_jax.weights.hf_owlv2 without torch.
"""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlm_jax.data.tokenizer import Tokenizer  # noqa: E402
from vlm_jax.errors import UserError  # noqa: E402
from vlm_jax.models.owlv2 import box_bias  # noqa: E402
from vlm_jax.weights import hf_owlv2  # noqa: E402

TOLERANCE = 1e-4
LENGTH = 16
VOCAB = 100
PAD, BOS, EOS = 0, VOCAB - 2, VOCAB - 1
WORDS = [f"w{i}" for i in range(2, VOCAB - 2)]


def _hf_config():
    return transformers.Owlv2Config(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=LENGTH, pad_token_id=PAD,
                         bos_token_id=BOS, eos_token_id=EOS),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32)


def _reinit(model) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            if "norm" in name and name.endswith("weight"):
                param.add_(1.0)


def _tokenizer() -> Tokenizer:
    import tokenizers

    vocab = {"!": PAD, "<unk>": 1, **{word: i + 2 for i, word in enumerate(WORDS)},
             "<|startoftext|>": BOS, "<|endoftext|>": EOS}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return Tokenizer.from_tokenizers(backend, context_length=LENGTH, pad_token="!", bos_token="<|startoftext|>",
                                     eos_token="<|endoftext|>", unk_token="<unk>")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(directory, the transformers model) of the tiny checkpoint."""
    torch.manual_seed(0)
    model = transformers.Owlv2ForObjectDetection(_hf_config()).eval()
    _reinit(model)
    directory = tmp_path_factory.mktemp("owlv2")
    model.save_pretrained(directory, safe_serialization=True)
    _tokenizer().save(directory)
    return directory, model


@pytest.fixture(scope="module")
def loaded(reference):
    return hf_owlv2.load_owlv2(reference[0])


def _query_ids(rng: np.random.Generator, batch: int, num_queries: int) -> np.ndarray:
    """int32 [B, Q, L]: bos, 1-9 random words, eos, padding; the last query of image 0 all padding."""
    ids = np.full((batch, num_queries, LENGTH), PAD, np.int32)
    for b in range(batch):
        for q in range(num_queries):
            words = rng.integers(2, VOCAB - 2, size=rng.integers(1, 10))
            ids[b, q, : len(words) + 2] = [BOS, *words, EOS]
    ids[0, -1] = PAD
    return ids


def _hf_outputs(model, pixel_values: np.ndarray, query_ids: np.ndarray):
    batch, num_queries, length = query_ids.shape
    flat = torch.from_numpy(query_ids.reshape(batch * num_queries, length).astype(np.int64))
    with torch.no_grad():
        return model(input_ids=flat, attention_mask=(flat != PAD).long(),
                     pixel_values=torch.from_numpy(pixel_values.transpose(0, 3, 1, 2).copy()))


def test_detect_matches_transformers_boxes_logits_objectness_and_embeddings(reference, loaded):
    _, hf_model = reference
    model = loaded[0]
    rng = np.random.default_rng(0)
    pixel_values = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    query_ids = _query_ids(rng, batch=2, num_queries=3)
    expected = _hf_outputs(hf_model, pixel_values, query_ids)

    boxes, logits, objectness = jax.jit(lambda p, q: model.detect(p, q))(pixel_values, query_ids)
    assert boxes.shape == (2, 16, 4) and logits.shape == (2, 16, 3) and objectness.shape == (2, 16)
    np.testing.assert_allclose(boxes, expected.pred_boxes.numpy(), atol=TOLERANCE, rtol=TOLERANCE)
    np.testing.assert_allclose(logits, expected.logits.numpy(), atol=TOLERANCE, rtol=TOLERANCE)
    np.testing.assert_allclose(objectness, expected.objectness_logits.numpy(), atol=TOLERANCE, rtol=TOLERANCE)
    # The padding query is masked in both, the real ones are not.
    assert np.all(np.asarray(logits)[0, :, -1] == np.finfo(np.float32).min)
    assert np.all(np.asarray(logits)[1] > np.finfo(np.float32).min)

    features = model.image_features(pixel_values)
    np.testing.assert_allclose(features.reshape(2, 4, 4, 32), expected.image_embeds.numpy(), atol=TOLERANCE,
                               rtol=TOLERANCE)
    np.testing.assert_allclose(model.class_head.class_embeddings(features), expected.class_embeds.numpy(),
                               atol=TOLERANCE, rtol=TOLERANCE)
    queries = np.asarray(model.query_embeddings(query_ids))
    hf_queries = expected.text_embeds.numpy()
    np.testing.assert_allclose(queries[0, :2], hf_queries[0, :2], atol=TOLERANCE, rtol=TOLERANCE)
    np.testing.assert_allclose(queries[1], hf_queries[1], atol=TOLERANCE, rtol=TOLERANCE)


def test_box_bias_matches_transformers_buffer(reference):
    _, hf_model = reference
    np.testing.assert_allclose(box_bias(4, 4), hf_model.box_bias.numpy(), atol=1e-6)


def test_missing_tensor_is_a_one_line_user_error_naming_it(reference, tmp_path):
    directory, _ = reference
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(directory / name, tmp_path / name)
    tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
    del tensors["box_head.dense2.bias"]
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError) as error:
        hf_owlv2.load_owlv2(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert "first difference box_head.dense2.bias (missing from the checkpoint)" in message


def test_misshaped_tensor_is_a_user_error_naming_it(reference, tmp_path):
    directory, _ = reference
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
    tensors["class_head.logit_shift.weight"] = np.zeros((2, 32), np.float32)
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"class_head\.logit_shift\.weight: checkpoint \(2, 32\), model expects "
                                        r"\(1, 32\)"):
        hf_owlv2.load_owlv2(tmp_path)


def test_preprocess_matches_owlv2_image_processor_on_a_non_square_image():
    processors = pytest.importorskip("transformers.models.owlv2.image_processing_pil_owlv2")
    image = np.random.default_rng(1).integers(0, 256, size=(75, 44, 3), dtype=np.uint8)
    processor = processors.Owlv2ImageProcessorPil(size={"height": 32, "width": 32})
    expected = processor(images=[image], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    # transformers 5 pads with black where the original OWLv2 (and transformers 4) pads with grey.
    ours = hf_owlv2.Owlv2Preprocess(image_size=32, pad_value=0.0)(image)
    assert ours.shape == (32, 32, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_preprocess_pads_grey_at_the_bottom_right_by_default():
    image = np.zeros((64, 16, 3), np.uint8)
    pixels = hf_owlv2.Owlv2Preprocess(image_size=32)(image)
    mean, std = np.asarray(hf_owlv2.OPENAI_CLIP_MEAN), np.asarray(hf_owlv2.OPENAI_CLIP_STD)
    # The image covers the left quarter; the right half is padding only, the left column image only.
    np.testing.assert_allclose(pixels[:, 16:], np.broadcast_to((0.5 - mean) / std, (32, 16, 3)), atol=1e-5)
    np.testing.assert_allclose(pixels[:, 0], np.broadcast_to(-mean / std, (32, 3)), atol=1e-5)


def test_detector_matches_transformers_post_processed_boxes_on_two_aspect_ratios(reference, loaded):
    from vlm_jax.mllm.owlv2_detector import Owlv2Detector

    directory, hf_model = reference
    _, tokenizer, preprocess = loaded
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, size=(40, 64, 3), dtype=np.uint8),
              rng.integers(0, 256, size=(64, 24, 3), dtype=np.uint8)]
    queries = [["w3 w4", "w10", "w20 w21 w22"], ["w5 w6 w7"]]
    detections = Owlv2Detector(str(directory), batch_size=2).detect(images, queries, ids=["wide", "tall"])

    query_ids = np.full((2, 3, LENGTH), PAD, np.int32)
    for row, texts in enumerate(queries):
        query_ids[row, : len(texts)] = tokenizer(texts)
    outputs = _hf_outputs(hf_model, preprocess.batch(images), query_ids)
    sizes = [image.shape[:2] for image in images]
    processor = transformers.models.owlv2.image_processing_pil_owlv2.Owlv2ImageProcessorPil()
    expected = processor.post_process_object_detection(outputs, threshold=-1.0, target_sizes=sizes)

    assert len(detections) == 2
    for found, want, (height, width), texts in zip(detections, expected, sizes, queries):
        order = np.argsort(-want["scores"].numpy(), kind="stable")
        scale = np.array([width, height, width, height], np.float32)
        want_boxes = np.clip(want["boxes"].numpy()[order] / scale, 0.0, 1.0)
        assert found.boxes.shape == (16, 4) and found.boxes.dtype == np.float32
        assert np.all((found.boxes >= 0.0) & (found.boxes <= 1.0))
        assert np.all(np.diff(found.scores) <= 0)
        np.testing.assert_allclose(found.scores, want["scores"].numpy()[order], atol=TOLERANCE)
        np.testing.assert_allclose(found.boxes, want_boxes, atol=TOLERANCE)
        np.testing.assert_array_equal(found.queries, want["labels"].numpy()[order])
        assert found.queries.max() < len(texts)

    # One image per forward pass, the second without queries: the first image's detections do not change.
    alone = Owlv2Detector(str(directory), batch_size=1).detect(images, [queries[0], []], ids=["wide", "tall"])
    np.testing.assert_allclose(alone[0].boxes, detections[0].boxes, atol=1e-6)
    np.testing.assert_allclose(alone[0].scores, detections[0].scores, atol=1e-6)
    np.testing.assert_array_equal(alone[0].queries, detections[0].queries)
    assert alone[1].boxes.shape == (0, 4) and alone[1].scores.shape == (0,) and alone[1].queries.shape == (0,)
