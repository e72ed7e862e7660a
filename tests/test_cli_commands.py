"""Commands whose failures used to bypass the one error handler (their own ``click.ClickException``): the same
``error:`` line and exit code as every other command now."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from lungsam.cli import main


def test_node_with_a_bad_config_is_one_error_line_and_exit_1(tmp_path):
    pytest.importorskip("pynetdicom")
    pytest.importorskip("highdicom")
    cfg = tmp_path / "node.toml"
    cfg.write_text("[listen]\nport = 'not a port'\n")
    r = CliRunner().invoke(main, ["node", "--config", str(cfg), "--check"])
    assert r.exit_code == 1, r.output
    assert r.output.startswith("error: ") and str(cfg) in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(main, ["node", "--config", str(tmp_path / "missing.toml")])
    assert r.exit_code == 1 and r.output.startswith("error: ") and "missing.toml" in r.output, r.output
