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


def test_the_readme_is_a_size_a_user_reads_and_its_links_resolve():
    assert len(README.splitlines()) <= 290
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(((?!https?:|#|/)[^)#\s]+)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_the_first_screen_works_when_pasted(server):
    """The curl and the client example at the top of the README, run against a server."""
    import subprocess
    import sys

    curl = re.search(r"^curl -s localhost:8000/v1/classify --json @(\S+)$", README, flags=re.M)
    assert curl, "the first curl example is missing"
    done = subprocess.run(
        ["curl", "-s", f"{server.url}/v1/classify", "--json", f"@{curl[1]}"], cwd=ROOT, capture_output=True, text=True
    )
    assert '"label":"speaker-1"' in done.stdout, done.stdout
    snippet = re.search(r"<<'PY'\n(.*?)\nPY\n", README, flags=re.S)
    assert snippet, "the client example is missing"
    code = snippet[1].replace("http://127.0.0.1:8000", server.url)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("standing"), done.stderr[-2000:]
