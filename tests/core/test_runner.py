"""The onnxruntime runner on the shipped model: batching never changes a result."""

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lstm_serve.core.repository import RepositoryError, load_repository
from lstm_serve.core.runner import FEW_CLASSES, WIDE_ROWS, Item, OnnxRunner, row_max, softmax
from tests.conftest import SHIPPED_ENTRY


@pytest.fixture(scope="module")
def runner() -> OnnxRunner:
    return OnnxRunner(load_repository(SHIPPED_ENTRY.parents[1])["japanese-vowels"], "cpu")


def frames(rng, n):
    return rng.normal(size=(n, 12)).astype(np.float32)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12), seed=st.integers(0, 2**16), fresh=st.booleans())
def test_a_mixed_batch_equals_running_each_item_alone(runner, lengths, seed, fresh):
    rng = np.random.default_rng(seed)
    width = runner.state_specs[0]["shape"]
    items = [
        Item(frames(rng, n), None if fresh or k % 2 else [rng.normal(size=(2, width[1])).astype(np.float32)] * 2)
        for k, n in enumerate(lengths)
    ]
    batched = runner.run(items)
    for item, out in zip(items, batched, strict=True):
        (alone,) = runner.run([item])
        assert out.logits.shape == (len(item.frames), 9)
        np.testing.assert_allclose(out.logits, alone.logits, atol=1e-5)
        np.testing.assert_allclose(out.probabilities, alone.probabilities, atol=1e-6)
        # the batch's argmax of each item's last frame: the class its prediction names
        assert out.class_id == alone.class_id == int(np.argmax(out.probabilities[-1]))
        for ours, theirs in zip(out.state, alone.state, strict=True):
            np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_a_lone_item_takes_float64_frames_and_read_only_state(runner):
    """A batch of one is fed without a copy (runner.run_one): whatever dtype or flags its arrays have."""
    rng = np.random.default_rng(3)
    x = frames(rng, 5)
    state = [np.frombuffer(rng.normal(size=(2, 192)).astype(np.float32).tobytes(), np.float32).reshape(2, 192)] * 2
    (expected, _) = runner.run([Item(x, state), Item(x[:1], None)])  # padded: copies everything
    (alone,) = runner.run([Item(x.astype(np.float64), state)])
    np.testing.assert_allclose(alone.logits, expected.logits, atol=1e-5)
    (fresh,) = runner.run([Item(x, None)])
    (zeros,) = runner.run([Item(x, [np.zeros((2, 192), np.float32)] * 2)])
    np.testing.assert_allclose(fresh.logits, zeros.logits, atol=1e-6)


def test_an_item_that_keeps_no_state_gets_the_same_outputs_and_no_state(runner):
    """A classify asks for no state (Item.keep_state=False): nothing is copied out for it; its batch
    neighbours keep theirs."""
    rng = np.random.default_rng(4)
    a, b = frames(rng, 6), frames(rng, 9)
    kept, dropped = runner.run([Item(a, None), Item(b, None, keep_state=False)])
    (alone,) = runner.run([Item(b, None)])
    assert dropped.state == [] and len(kept.state) == 2
    np.testing.assert_allclose(dropped.probabilities, alone.probabilities, atol=1e-6)


def test_state_carried_between_calls_equals_one_call(runner):
    rng = np.random.default_rng(0)
    x = frames(rng, 20)
    (whole,) = runner.run([Item(x, None)])
    state, parts = None, []
    for chunk in np.split(x, [1, 4, 11]):
        (out,) = runner.run([Item(chunk, state)])
        state, parts = out.state, parts + [out.logits]
    np.testing.assert_allclose(np.concatenate(parts), whole.logits, atol=1e-5)


def test_cpu_provider_is_used_on_a_machine_without_cuda(runner):
    assert runner.provider == "CPUExecutionProvider"


def test_cuda_setting_fails_loudly_without_cuda():
    entry = load_repository(SHIPPED_ENTRY.parents[1])["japanese-vowels"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert OnnxRunner(entry, "cuda").provider == "CUDAExecutionProvider"
    else:
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            OnnxRunner(entry, "cuda")


def test_repository_refuses_an_onnx_file_that_does_not_match_its_sha256(tmp_path):
    entry = tmp_path / "m" / "1"
    entry.mkdir(parents=True)
    (entry / "config.json").write_text((SHIPPED_ENTRY / "config.json").read_text())
    (entry / "model.onnx").write_bytes((SHIPPED_ENTRY / "model.onnx").read_bytes()[:-1] + b"\0")
    with pytest.raises(RepositoryError, match="sha256"):
        load_repository(tmp_path)


def test_repository_serves_the_newest_version(tmp_path):
    for version in (1, 2):
        entry = tmp_path / "japanese-vowels" / str(version)
        entry.mkdir(parents=True)
        config = (SHIPPED_ENTRY / "config.json").read_text().replace('"version": 1', f'"version": {version}')
        (entry / "config.json").write_text(config)
        (entry / "model.onnx").write_bytes((SHIPPED_ENTRY / "model.onnx").read_bytes())
    for not_a_version in ("²", "٣", "v3", "1.5"):  # '²'.isdigit() is True, but int('²') fails
        (tmp_path / "japanese-vowels" / not_a_version).mkdir()
    assert load_repository(tmp_path)["japanese-vowels"].version == 2


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 3 * WIDE_ROWS),
    classes=st.integers(1, 2 * FEW_CLASSES),
    seed=st.integers(0, 2**16),
    specials=st.lists(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0, 3e38]), max_size=6),
)
def test_a_rows_maximum_is_numpys_bit_for_bit_whichever_way_it_is_taken(rows, classes, seed, specials):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(rows, classes)) * 10).astype(np.float32)
    for value in specials:
        logits[rng.integers(rows), rng.integers(classes)] = value
    ours, numpys = row_max(logits.reshape(1, rows, classes)), np.maximum.reduce(logits, axis=-1, keepdims=True)
    assert ours.shape == (1, rows, 1) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours[0], numpys)  # NaN where numpy has NaN
    # and so the softmax is numpy's own to the bit, signed zeros and all (inf - inf is NaN on both ways)
    with np.errstate(invalid="ignore"):
        shifted = np.subtract(logits, numpys)
        np.exp(shifted, out=shifted)
        shifted /= np.add.reduce(shifted, axis=-1, keepdims=True)
        assert softmax(logits.reshape(1, rows, classes))[0].tobytes() == shifted.tobytes()
