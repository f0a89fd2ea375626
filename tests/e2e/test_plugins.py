"""Third-party components by entry point: the example plugin in tests/plugins (a detector, a defense
and an attack) is installed as a package would be, and moat uses its components by name, in a gateway
config and in a suite, without any of moat's code naming them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.servers.procs import REPO

PLUGIN = REPO / "tests" / "plugins"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The plugin installed (with its entry points' metadata) into a directory of its own."""
    target = tmp_path_factory.mktemp("site")
    # Built from a copy: setuptools writes build/ and egg-info next to the sources it builds.
    source = shutil.copytree(PLUGIN / "moat-example-plugin", tmp_path_factory.mktemp("src") / "plugin")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, text=True, timeout=300)
    assert list(target.glob("moat_example_plugin-*.dist-info/entry_points.txt"))
    return str(target)


def moat(plugin_path: str | None, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    paths = [str(REPO), *([plugin_path] if plugin_path else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_gateway_config_names_plugin_components_and_their_params_are_checked(plugin_path: str,
                                                                              tmp_path: Path) -> None:
    config = yaml.safe_load((PLUGIN / "gateway.yaml").read_text())
    config["auth"] = {k: str((PLUGIN / v).resolve()) for k, v in config["auth"].items()}
    config["models"][0]["detectors"][0]["params"]["budget"] = 0
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    refused = moat(plugin_path, "serve", "--config", str(path), timeout=120)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "models[0].detectors[0].params.budget: must be >= 1, got 0" in refused.stderr
    # Without the plugin installed the same name is unknown, and the message lists what is.
    missing = moat(None, "serve", "--config", str(PLUGIN / "gateway.yaml"), timeout=120)
    assert missing.returncode == 2
    assert "models[0].detectors[0].name: unknown detector 'query-budget'; valid: coverage, prada" in missing.stderr


def test_evaluate_reports_the_plugin_attack_against_the_plugin_defense(plugin_path: str, tmp_path: Path) -> None:
    result = moat(plugin_path, "evaluate", "--no-progress", "--suite", str(PLUGIN / "suite.yaml"),
                  "--out", str(tmp_path / "out"), "--threads", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {r["defense"]: r for r in json.loads((tmp_path / "out" / "report.json").read_text())["runs"]}
    assert set(runs) == {"none", "plugin"}
    assert {r["attack"] for r in runs.values()} == {"random-images"}
    undefended, defended = runs["none"], runs["plugin"]
    assert undefended["flagged_after"] is None and undefended["agreement"] > 0.6
    # query-budget alerts at 300 queries; flat-when-flagged then answers uniform distributions, whose
    # argmax is one class, so the thief's copy learns far less than the undefended one.
    assert defended["flagged_after"] is not None and defended["flagged_after"] <= 400
    assert defended["agreement"] < undefended["agreement"] - 0.2
    assert "random-images" in (tmp_path / "out" / "report.md").read_text()
