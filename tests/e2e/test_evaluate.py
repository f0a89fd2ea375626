"""``moat evaluate`` end to end: a toy suite with every attack on both demo models, undefended and with
the default protection, through gateways the command starts itself; and the `paper` suite at toy size on
CIFAR-10-format and ImageFolder fixtures with tiny timm victims and thief."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evaluation.report import BENIGN_FIELDS, RUN_FIELDS
from tests.servers.procs import REPO

FASHION = {"dataset": "fashion-mnist", "split": "train", "start": 0, "n": 3000}
TEST = {"dataset": "fashion-mnist", "split": "test", "start": 0, "n": 500}
OWN = {"dataset": "fashion-mnist", "split": "test", "start": 500, "n": 2000}
FAST = {"stages": 1, "max_epochs": 1}


def evaluate(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gateway.cli", "evaluate", "--no-progress", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def toy_suite(path: Path, backbone: Path) -> Path:
    classifier_attacks = [
        {"name": "knockoff", "budget": 2000, "params": {"sampling": "adaptive", "labels": "soft", "stages": 2,
                                                         "max_epochs": 2}},
        {"name": "fm-steal", "budget": 300, "params": {"backbone": f"torchscript:{backbone}", **FAST}},
        {"name": "jbda", "budget": 200, "params": {"seed_size": 50, "rounds": 2, "max_epochs": 1}},
        {"name": "copycat", "budget": 200, "params": FAST},
        {"name": "sybil", "budget": 300, "params": {"attack": "knockoff", "attack_params": FAST, "keys": 2}},
        {"name": "averaging", "budget": 300, "params": {"attack": "knockoff", "attack_params": FAST, "repeats": 3,
                                                        "jitter": 0.01}},
    ]
    encoder_attacks = [
        {"name": "direct", "budget": 300, "params": FAST},
        {"name": "stolen-encoder", "budget": 300, "params": FAST},
        {"name": "cont-steal", "budget": 300, "params": FAST},
        {"name": "sybil", "budget": 400, "params": {"attack": "direct", "attack_params": FAST, "keys": 2,
                                                    "anchors": 100}},
    ]
    suite = {"name": "toy", "seed": 1, "defenses": ["none", "default"], "models": [
        {"name": "fashion-classifier", "kind": "classifier", "data": {"pool": [FASHION], "eval": TEST},
         "attacks": classifier_attacks,
         "benign": [{"name": "shoes", "classes": [5, 7, 9], "queries": 300, "data": OWN}]},
        {"name": "fashion-encoder", "kind": "encoder",
         "data": {"pool": [FASHION], "eval": TEST, "probe_train": {**FASHION, "start": 3000, "n": 500},
                  "probe_test": TEST},
         "attacks": encoder_attacks,
         "benign": [{"name": "shoes-probe", "classes": [5, 7, 9], "queries": 300, "data": OWN}]},
    ]}
    path.write_text(yaml.safe_dump(suite))
    return path


def tiny_backbone(path: Path) -> Path:
    """A TorchScript feature extractor [B,1,28,28] -> [B,32] standing in for a public backbone."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(64, 32))
    torch.jit.script(net.eval()).save(str(path))
    return path


def check_outputs(out: Path, attacks: set[tuple[str, str]], defenses: set[str]) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert {(r["model"], r["attack"]) for r in report["runs"]} == attacks
    assert {r["defense"] for r in report["runs"]} == defenses
    assert len(report["runs"]) == len(attacks) * len(defenses)
    for run in report["runs"]:
        assert set(RUN_FIELDS) <= set(run), run["attack"]
        assert 0 < run["queries"] <= run["budget"], run
    for user in report["benign"]:
        assert set(BENIGN_FIELDS) <= set(user)
    md = (out / "report.md").read_text()
    assert "## What a thief got" in md and "## What honest users lost" in md
    assert report["plots"]
    for name in report["plots"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
        assert f"]({name})" in md
    return report


def test_toy_suite_every_attack_both_kinds_undefended_and_defended(tmp_path: Path) -> None:
    suite = toy_suite(tmp_path / "toy.yaml", tiny_backbone(tmp_path / "backbone.pt"))
    # --out relative to the working directory, as `make demo` passes it
    result = evaluate("--suite", str(suite), "--out", os.path.relpath(tmp_path / "out", REPO), "--threads", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    classifier = {"knockoff", "fm-steal", "jbda", "copycat", "sybil(knockoff)", "averaging(knockoff)"}
    encoder = {"direct", "stolen-encoder", "cont-steal", "sybil(direct)"}
    attacks = {("fashion-classifier", a) for a in classifier} | {("fashion-encoder", a) for a in encoder}
    report = check_outputs(tmp_path / "out", attacks, {"none", "default"})
    runs = {(r["model"], r["attack"], r["defense"]): r for r in report["runs"]}
    knockoff = runs[("fashion-classifier", "knockoff", "none")]
    assert knockoff["victim_accuracy"] > 0.85 and knockoff["agreement"] > 0.5  # chance is ~0.1
    assert knockoff["stolen_downstream_accuracy"] is None and knockoff["watermark_p_value"] is None
    defended = runs[("fashion-classifier", "knockoff", "default")]
    assert defended["watermark_p_value"] is not None and 0 <= defended["watermark_p_value"] <= 1
    assert defended["gain_remaining"] is not None
    assert runs[("fashion-classifier", "sybil(knockoff)", "none")]["api_keys"] == 2
    assert runs[("fashion-classifier", "averaging(knockoff)", "none")]["queries"] == 300
    direct = runs[("fashion-encoder", "direct", "none")]
    assert direct["agreement"] is None and direct["stolen_downstream_accuracy"] > 0.5
    assert direct["victim_downstream_accuracy"] > 0.7
    assert runs[("fashion-encoder", "sybil(direct)", "default")]["api_keys"] == 2
    # The encoder's direction watermark is verified against the copies too (~0.5% of 1,300 queries marked).
    encoder_p = [r["watermark_p_value"] for r in report["runs"] if r["model"] == "fashion-encoder"
                 and r["defense"] == "default" and r["watermark_p_value"] is not None]
    assert encoder_p and all(0 <= p <= 1 for p in encoder_p)
    assert runs[("fashion-classifier", "jbda", "default")]["flagged_after"] is not None  # PRADA sees JBDA
    users = {(b["model"], b["defense"]): b for b in report["benign"]}
    assert len(users) == 4
    assert users[("fashion-classifier", "default")]["utility_undefended"] == users[("fashion-classifier", "none")]["utility"]
    assert users[("fashion-classifier", "none")]["utility"] > 0.85
    assert "[default] gateway on 127.0.0.1:" in result.stderr


def write_cifar(root: Path, rng: np.random.Generator, per_batch: int = 20) -> Path:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, per_batch).tolist()}, f)
    return base


def write_folder(root: Path, rng: np.random.Generator, n: int = 12) -> Path:
    from PIL import Image

    for cls in ("cats", "trucks"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_paper_suite_at_toy_size(tmp_path: Path) -> None:
    import timm

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    vit = {"img_size": 32}
    checkpoints = {
        "MOAT_PAPER_VIT_VICTIM": timm.create_model("vit_tiny_patch16_224", num_classes=10, **vit),
        "MOAT_PAPER_RESNET_VICTIM": timm.create_model("resnet18", num_classes=10),
        "MOAT_PAPER_BACKBONE": timm.create_model("vit_tiny_patch16_224", num_classes=0),
    }
    env = {"MOAT_CIFAR10_DIR": str(write_cifar(tmp_path / "cifar", rng)),
           "MOAT_PAPER_POOL_DIR": str(write_folder(tmp_path / "pool", rng)),
           "MOAT_PAPER_VIT_ARCH": "vit_tiny_patch16_224", "MOAT_PAPER_SIZE": "32", "MOAT_PAPER_QUERIES": "20",
           "MOAT_PAPER_EPOCHS": "1", "MOAT_PAPER_EVAL": "20", "MOAT_PAPER_POOL": "24"}
    for name, model in checkpoints.items():
        torch.save(model.state_dict(), tmp_path / f"{name}.pt")
        env[name] = str(tmp_path / f"{name}.pt")
    os.environ.update(env)
    try:
        result = evaluate("--suite", "paper", "--out", str(tmp_path / "out"), "--threads", "2")
    finally:
        for name in env:
            os.environ.pop(name, None)
    assert result.returncode == 0, result.stderr[-3000:]
    attacks = {("cifar10-vit", "fm-steal"), ("cifar10-resnet18", "fm-steal")}
    report = check_outputs(tmp_path / "out", attacks, {"none", "default"})
    assert all(r["queries"] == 20 and r["kind"] == "classifier" for r in report["runs"])
    assert report["benign"] == []


def test_target_mode_attacks_an_endpoint_someone_else_runs(tmp_path: Path) -> None:
    from evaluation.presets import ADMIN_TOKEN, api_key, gateway_config, start_gateway
    from evaluation.suite import ModelEntry

    model = ModelEntry(name="fashion-classifier", kind="classifier", source={"zoo": "fashion-classifier"},
                       input_shape=(1, 28, 28), num_outputs=10, data={}, attacks=(), benign=())
    gateway = start_gateway(gateway_config([model], "default", ["eve", "eve2", "eve3"], tmp_path), tmp_path)
    suite = {"name": "remote", "batch": 100, "models": [
        {"name": "fashion-classifier", "kind": "classifier", "data": {"pool": [FASHION], "eval": TEST},
         "attacks": [{"name": "knockoff", "budget": 300, "params": FAST},
                     {"name": "sybil", "budget": 300, "params": {"attack": "knockoff", "attack_params": FAST,
                                                                 "keys": 2}}]}]}
    (tmp_path / "remote.yaml").write_text(yaml.safe_dump(suite))
    try:
        result = evaluate("--suite", str(tmp_path / "remote.yaml"), "--out", str(tmp_path / "out"),
                          "--target", gateway.address, "--api-key", api_key("eve"), "--api-key", api_key("eve2"),
                          "--api-key", api_key("eve3"), "--admin", f"127.0.0.1:{gateway.ports['admin']}",
                          "--admin-token", ADMIN_TOKEN)
        assert result.returncode == 0, result.stderr[-3000:]
        from gateway.admin_client import AdminClient

        with AdminClient(f"127.0.0.1:{gateway.ports['admin']}", ADMIN_TOKEN) as admin:
            queries = {c["client_id"]: int(c["models"][0]["queries"]) for c in admin.list_clients()["clients"]}
    finally:
        gateway.stop()
    report = check_outputs(tmp_path / "out", {("fashion-classifier", "knockoff"),
                                              ("fashion-classifier", "sybil(knockoff)")}, {"target"})
    assert [r["api_keys"] for r in report["runs"]] == [1, 2]
    # the sybil took the next two keys and sent them batches of 100 in turn
    assert queries == {"eve": 300, "eve2": 200, "eve3": 100}


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "nohost"], "--target: expected HOST:PORT"),
    (["--target", "127.0.0.1:1"], "--target needs at least one --api-key"),
    (["--api-key", "k"], "--api-key and --admin need --target"),
    (["--suite", "no-such-suite"], "no built-in suite 'no-such-suite'"),
])
def test_bad_arguments_are_refused_with_the_flag_named(tmp_path: Path, args: list[str], message: str) -> None:
    result = evaluate("--out", str(tmp_path / "out"), *args, timeout=60)
    assert result.returncode == 2 and message in result.stderr


def test_python_api_runs_a_suite_and_returns_the_report_it_wrote(tmp_path: Path) -> None:
    from evaluation import evaluate

    suite = {"name": "api", "seed": 0, "batch": 100, "defenses": ["none"], "models": [
        {"name": "fashion-classifier", "kind": "classifier", "data": {"pool": [FASHION], "eval": TEST},
         "attacks": [{"name": "knockoff", "budget": 500, "params": {"stages": 1, "max_epochs": 5}}]}]}
    path = tmp_path / "api.yaml"
    path.write_text(yaml.safe_dump(suite))
    report = evaluate(path, tmp_path / "out")
    assert [(r["model"], r["attack"], r["defense"]) for r in report["runs"]] == [
        ("fashion-classifier", "knockoff", "none")]
    assert report["runs"][0]["queries"] == 500 and report["runs"][0]["agreement"] > 0.4  # chance is ~0.1
    assert json.loads((tmp_path / "out" / "report.json").read_text())["runs"] == json.loads(json.dumps(report["runs"]))
