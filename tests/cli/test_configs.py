"""Every shipped config parses through the real CLI (class paths, argument names and types)."""

from pathlib import Path

import pytest

from lightning_app import main
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_parses(config: Path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config), "--print_config"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path" in printed and "default_root_dir: runs/" in printed
