"""Suite files: the built-in suites load; every mistake is refused with a message naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evaluation.runner import client_ids
from evaluation.suite import SuiteError, load_suite

BASE = {
    "name": "t", "seed": 3, "defenses": ["none", "default"],
    "models": [{
        "name": "fashion-classifier", "kind": "classifier",
        "data": {"pool": [{"dataset": "fashion-mnist", "n": 100}], "eval": {"dataset": "fashion-mnist", "n": 50}},
        "attacks": [{"name": "knockoff", "budget": 100},
                    {"name": "sybil", "budget": 90, "params": {"attack": "knockoff", "keys": 3}}],
        "benign": [{"name": "shoes", "classes": [5, 7], "queries": 10, "data": {"dataset": "fashion-mnist"}}],
    }],
}


def write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def edited(change) -> dict:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    change(data)
    return data


@pytest.mark.parametrize("name", ["quick", "demo", "paper"])
def test_builtin_suites_load(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    suite = load_suite(name)
    assert suite.name == name and suite.models
    assert all(m.attacks for m in suite.models)


def test_valid_suite_reads_labels_budgets_and_sybil_keys(tmp_path: Path) -> None:
    suite = load_suite(write(tmp_path, BASE))
    (model,) = suite.models
    assert [a.label for a in model.attacks] == ["knockoff", "sybil(knockoff)"]
    assert model.attacks[1].spec.budget == 90 and model.attacks[1].spec.seed == 3
    assert model.input_shape == (1, 28, 28) and model.num_outputs == 10
    plan = client_ids(suite)
    assert len(plan[(0, "sybil(knockoff)")]) == 3 and len(plan[(0, "knockoff")]) == 1
    assert len({c for ids in plan.values() for c in ids}) == 5


def test_honest_users_send_their_images_once_unless_passes_says_more(tmp_path: Path) -> None:
    assert load_suite(write(tmp_path, BASE)).models[0].benign[0].passes == 1
    data = edited(lambda d: d["models"][0]["benign"][0].update(passes=10))
    assert load_suite(write(tmp_path, data)).models[0].benign[0].passes == 10


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(colour=1), "colour: unknown field; valid:"),
    (lambda d: d.update(seed="x"), "seed: must be int"),
    (lambda d: d.update(defenses=["none", "tight"]), "defenses[1]: unknown defense preset 'tight'"),
    (lambda d: d.update(models=[]), "models: needs at least one model"),
    (lambda d: d["models"][0].update(kind="regressor"), "models[0].kind: must be one of"),
    (lambda d: d["models"][0]["attacks"][0].update(budget=0), "models[0].attacks[0].budget: must be >= 1"),
    (lambda d: d["models"][0]["attacks"][0].update(name="teleport"), "models[0].attacks[0].name: unknown attack"),
    (lambda d: d["models"][0]["attacks"][0].update(params={"labels": "fuzzy"}),
     "models[0].attacks[0].params: knockoff.labels must be one of"),
    (lambda d: d["models"][0]["attacks"][0].update(params={"epochz": 3}),
     "models[0].attacks[0].params: knockoff: unknown param(s) ['epochz']"),
    (lambda d: d["models"][0]["attacks"][1]["params"].update(keys=1), "sybil.keys must be >= 2"),
    (lambda d: d["models"][0]["attacks"].append({"name": "knockoff", "budget": 5}), "labels must be unique"),
    (lambda d: d["models"][0]["attacks"].append({"name": "direct", "budget": 5}),
     "models[0].attacks[2].name: direct attacks encoders, but the model is a classifier"),
    (lambda d: d["models"][0]["data"].update(pool=[]), "models[0].data.pool: needs at least one data source"),
    (lambda d: d["models"][0]["data"]["eval"].update(dataset="imagenet"), "models[0].data.eval.dataset: unknown"),
    (lambda d: d["models"][0].update(source={"zoo": "nope"}), "models[0].source.zoo: unknown zoo model 'nope'"),
    (lambda d: d["models"][0].update(defenses=["strict"]), "models[0].defenses: ['strict'] are not among"),
    (lambda d: d["models"][0]["benign"][0].update(classes=["shoes"]), "models[0].benign[0].classes: must be"),
    (lambda d: d["models"][0]["benign"][0].update(train_fraction=1.5), "models[0].benign[0].train_fraction"),
    (lambda d: d["models"][0]["benign"][0].update(passes=0), "models[0].benign[0].passes: must be >= 1"),
    (lambda d: d["models"][0]["benign"][0].update(passes=2.5), "models[0].benign[0].passes: must be int"),
    (lambda d: d["models"].append(d["models"][0]), "models: names must be unique"),
])
def test_bad_suites_name_the_field(tmp_path: Path, change, message: str) -> None:
    with pytest.raises(SuiteError) as caught:
        load_suite(write(tmp_path, edited(change)))
    assert message in str(caught.value)


def test_environment_variables_expand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THIEF_BUDGET_NAME", "thief")
    data = edited(lambda d: d["models"][0]["attacks"][0].update(label="${THIEF_BUDGET_NAME}-${UNSET_VAR:-x}"))
    assert load_suite(write(tmp_path, data)).models[0].attacks[0].label == "thief-x"


def test_unknown_builtin_suite_lists_the_builtins() -> None:
    with pytest.raises(SuiteError, match=r"no built-in suite 'nope' \(built-in: \[.*'quick'"):
        load_suite("nope")
