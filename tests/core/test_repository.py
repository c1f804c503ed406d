"""The model repository on disk: which folders are versions, and what a version number may be."""

import json
import logging
import shutil
from pathlib import Path

import pytest

from lstm_serve.core.repository import RepositoryError, load_entry, scan_repository, version_number

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "japanese-vowels" / "1"


def test_a_version_is_up_to_18_digits_everywhere_a_folder_or_a_request_names_one(tmp_path, caplog):
    """A bigger number would load and then break every reply that writes it (JSON writers take 64 bits)."""
    for name in ("0", "1", "000000000000000002", "1" + "0" * 20, "²", "v3"):
        (tmp_path / "m" / name).mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="lstm_serve"):
        found = scan_repository(tmp_path)
    assert list(found["m"]) == [1, 2]
    assert "1" + "0" * 20 in caplog.text and "at most 18 digits" in caplog.text
    assert "versions start at 1 (rename it to serve it)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lstm_serve"):
        scan_repository(tmp_path)  # as a repository poll does, again and again
    assert "at most 18 digits" not in caplog.text, "the same folder is warned about once"
    assert version_number("9" * 18) == int("9" * 18) and version_number("1" * 19) is None
    assert version_number("-1") is None and version_number("²") is None


def test_a_config_whose_version_is_not_a_version_number_is_refused(tmp_path):
    folder = tmp_path / "japanese-vowels" / "latest"
    shutil.copytree(SHIPPED, folder)
    config = json.loads((folder / "config.json").read_text())
    for bad in (10**20, -1, 0, "one"):
        (folder / "config.json").write_text(json.dumps({**config, "version": bad}))
        with pytest.raises(RepositoryError, match=r"is not a version \(1 or more, up to 18 digits\)"):
            load_entry(folder)
    (folder / "config.json").write_text(json.dumps({**config, "version": 7}))
    assert load_entry(folder).version == 7


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda c: "[1, 2]", "holds a JSON list, not an object"),
        (lambda c: '{"name": ', "is not readable JSON"),
        (lambda c: {**c, "name": "other"}, "names the model 'other', but its folder is 'japanese-vowels'"),
        (lambda c: {**c, "labels": "abc"}, "labels must be a list of distinct strings"),
        (lambda c: {**c, "labels": ["a", "a"] + c["labels"][2:]}, "labels must be a list of distinct strings"),
        (lambda c: {**c, "input_dim": "12"}, "input_dim must be a whole number"),
        (lambda c: {**c, "feature_names": ["x"]}, "feature_names must be input_dim=12 strings"),
        (lambda c: {**c, "inputs": [{**c["inputs"][0], "datatype": "FP64"}]}, "the frames input must be FP32"),
        (lambda c: {**c, "state": [{"input": "h0"}]}, "state must list {input, output, shape}"),
        (lambda c: {**c, "example": {**c["example"], "label": "nobody"}}, "example.label must be one of the labels"),
        (lambda c: {**c, "example": {**c["example"], "frames": [[0.0] * 5]}}, "example.frames must be frames of"),
    ],
)
def test_a_config_json_that_is_wrong_is_refused_naming_the_file_and_the_field(tmp_path, change, says):
    folder = tmp_path / "japanese-vowels" / "1"
    shutil.copytree(SHIPPED, folder)
    changed = change(json.loads((folder / "config.json").read_text()))
    (folder / "config.json").write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(RepositoryError) as refused:
        load_entry(folder)
    assert str(folder / "config.json") in str(refused.value) and says in str(refused.value), str(refused.value)


def test_what_earlier_exports_wrote_still_loads(tmp_path):
    """No feature names ([]: f0, f1, ...) and an example whose label was written as a number."""
    folder = tmp_path / "japanese-vowels" / "1"
    shutil.copytree(SHIPPED, folder)
    config = json.loads((folder / "config.json").read_text())
    labels = [str(k) for k in range(len(config["labels"]))]
    example = {**config["example"], "label": 1}
    (folder / "config.json").write_text(
        json.dumps({**config, "feature_names": [], "labels": labels, "example": example})
    )
    entry = load_entry(folder)
    assert entry.feature_names == [f"f{k}" for k in range(12)] and entry.example["label"] == 1
