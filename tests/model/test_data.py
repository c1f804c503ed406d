import numpy as np
import pytest

from lstm_serve.model.data import load_dataset, pad_batch, stratified_split


def test_japanese_vowels_official_split_from_package_data():
    data = load_dataset("japanese-vowels")
    assert (len(data.train), len(data.test)) == (270, 370)
    assert data.input_dim == 12
    assert data.label_names == [f"speaker-{k}" for k in range(1, 10)]
    lengths = [len(s) for s in data.train.sequences + data.test.sequences]
    assert (min(lengths), max(lengths)) == (7, 29)
    assert np.bincount(data.train.labels).tolist() == [30] * 9
    assert all(s.dtype == np.float32 and s.shape[1] == 12 for s in data.test.sequences)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        load_dataset("mnist")


def test_pad_batch_right_pads_with_zeros():
    x, lengths = pad_batch([np.ones((3, 2), np.float32), np.full((1, 2), 2, np.float32)])
    assert x.shape == (2, 3, 2) and lengths.tolist() == [3, 1]
    assert x[1, 0].tolist() == [2, 2] and not x[1, 1:].any()


def test_stratified_split_holds_out_every_class_and_is_disjoint():
    labels = np.repeat(np.arange(9), 30)
    keep, held = stratified_split(labels, 0.15, seed=0)
    assert len(np.intersect1d(keep, held)) == 0 and len(keep) + len(held) == 270
    assert np.bincount(labels[held]).tolist() == [4] * 9  # round(0.15 * 30) = 4 (banker's rounding)
