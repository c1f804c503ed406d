"""The user's own data: both formats read into the same sequences, and every malformed file is refused
with one line that says what and where."""

import numpy as np
import pytest

from lstm_serve.model.data import DataError, read_user_data, user_dataset
from tests.conftest import ROOT

EXAMPLES = ROOT / "model" / "examples"
HEADER = "sequence_id,t,a,b,label\n"


def test_the_example_csv_reads_as_sequences_with_feature_names():
    data = read_user_data(EXAMPLES / "speakers.csv")
    assert len(data.sequences) == 30 and set(data.labels) == {"speaker-1", "speaker-2", "speaker-3"}
    assert data.feature_names[:2] == ["lpc_cepstrum_1", "lpc_cepstrum_2"] and len(data.feature_names) == 12
    assert all(seq.shape[1] == 12 and seq.dtype == np.float32 for seq in data.sequences)


def test_the_example_npz_reads_and_splits_honestly():
    data = user_dataset(EXAMPLES / "motions.npz", seed=0)
    assert data.label_names == sorted(data.label_names) and len(data.label_names) == 4
    assert data.feature_names[0] == "accelerometer_x" and data.input_dim == 6
    assert len(data.train) + len(data.test) == 24 and len(data.test) >= 4
    assert set(np.unique(data.test.labels)) == set(range(4)), "every class is in the held-out test split"


def test_a_padded_npz_with_lengths_is_the_same_as_ragged(tmp_path):
    rng = np.random.default_rng(0)
    ragged = [rng.normal(size=(n, 3)).astype(np.float32) for n in (4, 7, 5, 6)]
    padded = np.zeros((4, 7, 3), np.float32)
    for i, seq in enumerate(ragged):
        padded[i, : len(seq)] = seq
    np.savez(tmp_path / "padded.npz", X=padded, lengths=np.array([4, 7, 5, 6]), y=np.array([0, 1, 0, 1]))
    data = read_user_data(tmp_path / "padded.npz")
    assert [len(s) for s in data.sequences] == [4, 7, 5, 6] and data.labels == ["0", "1", "0", "1"]
    np.testing.assert_array_equal(data.sequences[1], ragged[1])
    assert data.feature_names == ["f0", "f1", "f2"]


def test_csv_frames_are_ordered_by_t_not_by_row(tmp_path):
    path = tmp_path / "shuffled.csv"
    path.write_text(HEADER + "s1,2,3,3,x\ns1,0,1,1,x\ns1,1,2,2,x\ns2,0,5,5,y\n")
    data = read_user_data(path)
    np.testing.assert_array_equal(data.sequences[0][:, 0], [1, 2, 3])


def npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


def csv(tmp_path, text):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return path


RAGGED = np.empty(2, dtype=object)
RAGGED[:] = [np.zeros((3, 2)), np.zeros((3, 4))]


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: csv(p, HEADER + "s1,0,1,2,x\ns1,1,1,2,y\ns2,0,1,2,y\n"), "line 3: sequence 's1' changes label"),
        (lambda p: csv(p, HEADER + "s1,0,1,2,\ns2,0,1,2,y\n"), "line 2: no label"),
        (lambda p: csv(p, HEADER + "s1,0,1,nan,x\ns2,0,1,2,y\n"), "sequence 0 frame 0 feature 'b' is NaN"),
        (lambda p: csv(p, HEADER + "s1,0,1,2,x\ns1,1,1,x\n"), "line 3: 4 fields, the header has 5"),
        (lambda p: csv(p, HEADER + "s1,0,1,abc,x\n"), "line 2: t and every feature must be numbers"),
        (lambda p: csv(p, HEADER + "s1,0,1,2,x\ns2,0,1,2,x\n"), "a classifier needs at least two classes"),
        (lambda p: csv(p, "sequence_id,a,label\ns1,1,x\n"), "no column t"),
        (lambda p: csv(p, HEADER + "s1,0,1,2,x\ns1,0,3,4,x\ns2,0,1,2,y\n"), "two frames at the same t"),
        (lambda p: csv(p, ""), "empty file"),
        (lambda p: csv(p, "sequence_id,t,a,a,label\ns1,0,1,2,x\n"), "names column 'a' more than once"),
        (
            lambda p: npz(p, X=np.zeros((2, 3, 2)), lengths=[3, 3], y=[0, 1], feature_names=np.array(["a", "a"])),
            "feature_names repeats 'a'",
        ),
        (lambda p: csv(p, HEADER + "s1,nan,1,2,x\ns1,nan,3,4,x\ns2,0,1,2,y\n"), "line 2: t is 'nan', not a finite"),
        (lambda p: csv(p, HEADER + "s1,0,1,1e39,x\ns2,0,1,2,y\n"), "holds 1e+39, beyond float32's range"),
        (lambda p: (p / "latin.csv").write_bytes(b"sequence_id,t,\xe9,b,label\n") and p / "latin.csv", "not UTF-8"),
        (lambda p: npz(p, X=np.zeros((2, 3, 2), complex), lengths=[3, 3], y=[0, 1]), "complex128 values, not real"),
        (lambda p: npz(p, X=np.zeros((2, 3, 2)), lengths=np.array([2.5, 3]), y=np.array([0, 1])), "lengths must be"),
        (lambda p: npz(p, X=RAGGED, y=np.array([0, 1])), "sequence 1 has 4 features per frame, the first has 2"),
        (lambda p: npz(p, X=np.zeros((2, 3, 2)), y=np.array([0, 1])), "'lengths' [N] is needed"),
        (lambda p: npz(p, X=RAGGED, y=np.array([0])), "y must hold one label per sequence (2)"),
        (lambda p: npz(p, y=np.array([0, 1])), "no array 'X'"),
        (lambda p: npz(p, X=np.zeros((2, 3, 2)), lengths=np.array([3, 9]), y=np.array([0, 1])), "lengths must be"),
        (
            lambda p: npz(
                p, X=np.zeros((2, 3, 2)), lengths=np.array([3, 3]), y=np.array([0, 1]), feature_names=np.array(["a"])
            ),
            "1 feature_names for 2 features",
        ),
        (lambda p: p / "missing.csv", "no such file"),
        (lambda p: csv(p, "x").rename(p / "data.txt"), "expected a .npz or a .csv"),
    ],
)
def test_a_malformed_file_is_refused_in_one_line(tmp_path, make, says):
    with pytest.raises(DataError) as refused:
        read_user_data(make(tmp_path))
    message = str(refused.value)
    assert says in message and "\n" not in message, message


def test_too_few_sequences_for_the_splits_are_refused(tmp_path):
    path = csv(tmp_path, HEADER + "s1,0,1,2,x\ns2,0,1,2,x\ns3,0,1,2,x\ns4,0,1,2,y\ns5,0,1,2,y\n")
    with pytest.raises(DataError, match="class 'y' has 2 sequences; with no --test file each class needs at least 3"):
        user_dataset(path)


def test_a_csv_saved_by_excel_with_a_byte_order_mark_reads_like_any_other(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + "s1,0,1,2,x\ns2,0,3,4,y\n").encode())
    data = read_user_data(path)
    assert data.feature_names == ["a", "b"] and data.labels == ["x", "y"]


def test_a_test_file_is_matched_to_the_training_features_by_name_and_may_hold_one_class(tmp_path):
    train = csv(tmp_path, HEADER + "".join(f"s{k},0,{k},{-k},{'xy'[k % 2]}\n" for k in range(8)))
    swapped = tmp_path / "swapped.csv"
    swapped.write_text("sequence_id,t,b,a,label\nq1,0,-5,5,y\n")  # columns in another order, one class
    dataset = user_dataset(train, swapped)
    np.testing.assert_array_equal(dataset.test.sequences[0], [[5, -5]])
    other = tmp_path / "other.csv"
    other.write_text("sequence_id,t,a,c,label\nq1,0,5,-5,y\n")
    with pytest.raises(DataError, match=r"features \['c'\] are not among"):
        user_dataset(train, other)


def test_bytes_labels_read_as_text_and_numeric_labels_keep_one_order(tmp_path):
    from lstm_serve.model.data import label_order

    path = tmp_path / "bytes.npz"
    np.savez(path, X=np.zeros((2, 3, 2)), lengths=[3, 3], y=np.array([b"walk", b"run"]), feature_names=[b"ax", b"ay"])
    data = read_user_data(path)
    assert data.labels == ["walk", "run"] and data.feature_names == ["ax", "ay"]
    assert label_order(["1.0", "01", "1", "2"]) == ["01", "1", "1.0", "2"]
    assert label_order(["nan", "2", "1"]) == ["1", "2", "nan"]


def test_a_test_file_is_matched_by_position_when_either_file_names_no_features(tmp_path):
    path = tmp_path / "unnamed.npz"
    X = np.empty(6, dtype=object)
    X[:] = [np.full((2, 2), k, np.float32) for k in range(6)]
    np.savez(path, X=X, y=np.array(["x", "y"] * 3))  # no feature_names: f0, f1
    named = tmp_path / "named.csv"
    named.write_text("sequence_id,t,b,a,label\nq1,0,-5,5,y\n")
    dataset = user_dataset(path, named)
    np.testing.assert_array_equal(dataset.test.sequences[0], [[-5, 5]])  # as written: by position


def test_a_file_of_one_feature_reads_as_frames_of_width_one(tmp_path):
    path = tmp_path / "univariate.csv"
    path.write_text(
        "sequence_id,t,value,label\n" + "".join(f"s{k},{t},{k + t},{'xy'[k % 2]}\n" for k in range(8) for t in range(3))
    )
    dataset = user_dataset(path, seed=0)
    assert dataset.input_dim == 1 and dataset.feature_names == ["value"]
    assert all(sequence.shape == (3, 1) for sequence in dataset.train.sequences + dataset.test.sequences)
    assert dataset.description == "Trained on univariate.csv: 2 classes, 1 feature per frame."
