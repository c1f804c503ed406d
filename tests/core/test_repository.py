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
    for name in ("1", "000000000000000002", "1" + "0" * 20, "²", "v3"):
        (tmp_path / "m" / name).mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="lstm_serve"):
        found = scan_repository(tmp_path)
    assert list(found["m"]) == [1, 2]
    assert "1" + "0" * 20 in caplog.text and "at most 18 digits" in caplog.text
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
    for bad in (10**20, -1, "one"):
        (folder / "config.json").write_text(json.dumps({**config, "version": bad}))
        with pytest.raises(RepositoryError, match="is not 0 to 18 digits"):
            load_entry(folder)
    (folder / "config.json").write_text(json.dumps({**config, "version": 7}))
    assert load_entry(folder).version == 7
