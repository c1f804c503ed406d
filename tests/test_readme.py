"""The README stays true to the code it describes."""

import re

from lstm_serve.settings import Settings
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table():
    for name in Settings.model_fields:
        assert f"`LSTM_SERVE_{name.upper()}`" in README, f"LSTM_SERVE_{name.upper()} is not documented"
        assert f"`--{name.replace('_', '-')}`" in README


def test_documented_defaults_match_the_code():
    rows = re.findall(r"^\| `LSTM_SERVE_(\w+)` \| `--[\w-]+` \| `([^`]+)` \|", README, flags=re.M)
    assert rows, "configuration table not found"
    for name, documented in rows:
        default = Settings.model_fields[name.lower()].default
        if isinstance(default, int | float) and not isinstance(default, bool):
            assert float(documented) == float(default), f"{name}: README says {documented}, code says {default}"
        elif isinstance(default, str):
            assert documented == default, f"{name}: README says {documented}, code says {default}"


def test_setup_commands_are_documented():
    assert "make serve" in README and "make test" in README
