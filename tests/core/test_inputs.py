"""The frame checks every protocol shares (core/inputs.py): a non-finite value anywhere is refused, naming
its frame; any finite float32, however large, is taken."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lstm_serve.core.inputs import Limits, chunk_from_bytes, finite_chunk
from lstm_serve.core.repository import load_entry
from lstm_serve.errors import InvalidInput
from tests.conftest import SHIPPED_ENTRY

FLOAT32_MAX = float(np.finfo(np.float32).max)
ENTRY = load_entry(SHIPPED_ENTRY)  # 12 features per frame
LIMITS = Limits(max_body_bytes=1 << 20, max_sequence_length=1000, max_sequences_per_request=8)


@settings(max_examples=60, deadline=None)
@given(
    frames=st.integers(1, 40),
    width=st.integers(1, 16),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    where=st.integers(0, 10_000),
)
def test_a_non_finite_value_anywhere_is_refused_naming_its_frame(frames, width, bad, where):
    x = np.full((frames, width), FLOAT32_MAX, np.float32)  # sums far past float32: still all finite
    t, d = divmod(where % (frames * width), width)
    x[t, d] = bad
    with pytest.raises(InvalidInput, match=f"frame {t} holds NaN or Inf"):
        finite_chunk(x, "inputs")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=12, max_size=12 * 30))
def test_every_finite_float32_is_taken_and_binary_frames_are_read_as_sent(values):
    values = values[: len(values) // 12 * 12]
    x = np.array(values, np.float32).reshape(-1, 12)
    if not len(x):
        return
    assert finite_chunk(x, "inputs").frames is x

    chunk = chunk_from_bytes(x.astype("<f4").tobytes(), ENTRY, LIMITS, "message")
    np.testing.assert_array_equal(chunk.frames, x)
    assert chunk.frames.dtype == np.float32
