"""Evaluation suites: YAML files naming the models to attack, the defense presets, the attacks with
their budgets and the honest users. :func:`load_suite` validates a file into :class:`Suite`; every
error names the offending field (``models[0].attacks[2].budget: ...``). ``${VAR}`` and
``${VAR:-default}`` in string values expand from the environment.

Built-in suites live in ``evaluation/suites/<name>.yaml`` and are found by name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from contracts.params import ConfigError, Fields
from evaluation.attacks.base import AttackSpec
from gateway.backends.sources import MODEL_SOURCES

__all__ = ["BenignSpec", "ModelEntry", "Suite", "SuiteError", "load_suite", "suite_path", "SUITES_DIR"]

SUITES_DIR = Path(__file__).resolve().parent / "suites"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_KINDS = ("classifier", "encoder")


class SuiteError(ValueError):
    """A suite file is invalid; the message names the field."""


@dataclass(frozen=True)
class BenignSpec:
    """An honest user: ``task`` ``classes`` (a few, or all when empty) with ``queries`` images of its own
    ``data``, each sent ``passes`` times (a retry, a second scoring run over the same test set: the
    images once each in the same order per pass, ``queries * passes`` queries in all); for encoders a
    linear probe trained on ``train_fraction`` of the images."""

    name: str
    classes: tuple[int, ...]
    queries: int
    data: Mapping[str, Any]
    train_fraction: float = 0.5
    seed: int = 0
    passes: int = 1


@dataclass(frozen=True)
class AttackEntry:
    """One attack of a model: its report ``label`` and the validated :class:`AttackSpec`."""

    label: str
    spec: AttackSpec


@dataclass(frozen=True)
class ModelEntry:
    """A victim: gateway ``name``, ``kind``, backend ``source`` (``zoo``/``torchscript``/``timm``),
    ``input_shape`` (C, H, W), ``num_outputs`` and the data sources for the thief's pool, the evaluation
    set and (encoders) the probe sets."""

    name: str
    kind: str
    source: Mapping[str, Any]
    input_shape: tuple[int, int, int]
    num_outputs: int
    data: Mapping[str, Any]
    attacks: tuple[AttackEntry, ...]
    benign: tuple[BenignSpec, ...]
    defenses: tuple[str, ...] | None = None  # run only under these presets (None: all of the suite's)


@dataclass(frozen=True)
class Suite:
    name: str
    seed: int
    defenses: tuple[Any, ...]
    models: tuple[ModelEntry, ...]
    batch: int = 250
    throttle_wait_s: float = 0.0
    path: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict)


def _expand(value: Any) -> Any:
    """Expand ``${VAR}``/``${VAR:-default}``; a value that was one variable and reads as a number becomes it."""
    if isinstance(value, str):
        out = _VAR.sub(lambda m: os.environ.get(m.group(1), m.group(2) if m.group(2) is not None else m.group(0)),
                       value)
        if out != value and _VAR.fullmatch(value):
            for number in (int, float):
                try:
                    return number(out)
                except ValueError:
                    pass
        return out
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    return value


def _data_source(data: Any, where: str) -> dict[str, Any]:
    from evaluation.data import DATASETS

    f = Fields(data, where, {"dataset", "split", "root", "start", "n", "size", "channels", "seed"})
    name = f.get("dataset", str)
    if name not in DATASETS:
        raise SuiteError(f"{f.name('dataset')}: unknown dataset {name!r}; valid: {sorted(DATASETS)}")
    f.get("start", int, 0, minimum=0)
    f.get("n", int, None, minimum=1)
    if name in ("cifar10", "image-folder"):
        f.get("root", str)
    return dict(data)


def _attack(data: Any, where: str, seed: int, kind: str) -> AttackEntry:
    from evaluation.attacks import ATTACKS, create_attack

    f = Fields(data, where, {"name", "label", "budget", "params", "seed"})
    name = f.get("name", str)
    if name not in ATTACKS:
        raise SuiteError(f"{f.name('name')}: unknown attack {name!r}; valid: {ATTACKS.names()}")
    params = f.get("params", dict, {})
    spec = AttackSpec(name=name, params=params, budget=f.get("budget", int, minimum=1),
                      seed=f.get("seed", int, seed))
    try:
        attack = create_attack(name, params, seed=spec.seed)
    except ValueError as error:
        raise SuiteError(f"{f.name('params')}: {error}") from None
    inner = getattr(attack, "inner", attack)
    if inner.kind not in (kind, "any"):
        raise SuiteError(f"{f.name('name')}: {inner.name} attacks {inner.kind}s, but the model is a {kind}")
    label = f.get("label", str, name if inner is attack else f"{name}({inner.name})")
    return AttackEntry(label=label, spec=spec)


def _benign(data: Any, where: str, seed: int) -> BenignSpec:
    f = Fields(data, where, {"name", "classes", "queries", "passes", "data", "train_fraction", "seed"})
    classes = f.get("classes", list, [])
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes):
        raise SuiteError(f"{f.name('classes')}: must be a list of class indices, got {classes!r}")
    fraction = f.get("train_fraction", float, 0.5)
    if not 0.0 < fraction < 1.0:
        raise SuiteError(f"{f.name('train_fraction')}: must be in (0, 1), got {fraction}")
    return BenignSpec(name=f.get("name", str), classes=tuple(classes), queries=f.get("queries", int, minimum=2),
                      data=_data_source(f.get("data", dict), f.name("data")), train_fraction=fraction,
                      seed=f.get("seed", int, seed), passes=f.get("passes", int, 1, minimum=1))


def _model(data: Any, where: str, seed: int) -> ModelEntry:
    f = Fields(data, where, {"name", "kind", "source", "input_shape", "num_outputs", "data", "attacks", "benign",
                              "defenses"})
    name, kind = f.get("name", str), f.get("kind", str)
    if kind not in _KINDS:
        raise SuiteError(f"{f.name('kind')}: must be one of {list(_KINDS)}, got {kind!r}")
    source = f.get("source", dict, {"zoo": name})
    sources = MODEL_SOURCES.names()
    if len(source) != 1 or not set(source) <= set(sources):
        raise SuiteError(f"{f.name('source')}: must name exactly one of {sources}, got {sorted(source)}")
    shape = f.get("input_shape", list, None)
    outputs = f.get("num_outputs", int, None, minimum=1)
    if (shape is None or outputs is None) and "zoo" in source:
        from evaluation.zoo import ZOO
        if source["zoo"] not in ZOO:
            raise SuiteError(f"{f.name('source')}.zoo: unknown zoo model {source['zoo']!r}; valid: {sorted(ZOO)}")
        shape = shape if shape is not None else list(ZOO[source["zoo"]].input_shape)
        outputs = outputs if outputs is not None else ZOO[source["zoo"]].output_dim
    if shape is None or outputs is None:
        raise SuiteError(f"{where}: input_shape and num_outputs are required unless source is a zoo model")
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise SuiteError(f"{f.name('input_shape')}: must be [C, H, W] positive ints, got {shape!r}")
    d = Fields(f.get("data", dict), f.name("data"), {"pool", "eval", "probe_train", "probe_test", "probes"})
    pool = d.get("pool", list)
    if not pool:
        raise SuiteError(f"{d.name('pool')}: needs at least one data source")
    sources = {"pool": [_data_source(p, f"{d.name('pool')}[{i}]") for i, p in enumerate(pool)],
               "eval": _data_source(d.get("eval", dict), d.name("eval"))}
    if kind == "encoder":
        for key in ("probe_train", "probe_test"):
            sources[key] = _data_source(d.get(key, dict), d.name(key))
    # The watermark's fresh probes (images the thieves never had to send); the eval set by default.
    probes = d.get("probes", list, [])
    sources["probes"] = [_data_source(p, f"{d.name('probes')}[{i}]") for i, p in enumerate(probes)]
    attacks = tuple(_attack(a, f"{f.name('attacks')}[{i}]", seed, kind)
                    for i, a in enumerate(f.get("attacks", list, [])))
    labels = [a.label for a in attacks]
    if len(set(labels)) != len(labels):
        raise SuiteError(f"{f.name('attacks')}: labels must be unique, got {labels}")
    benign = tuple(_benign(b, f"{f.name('benign')}[{i}]", seed) for i, b in enumerate(f.get("benign", list, [])))
    defenses = f.get("defenses", list, None)
    if defenses is not None and not all(isinstance(d, str) for d in defenses):
        raise SuiteError(f"{f.name('defenses')}: must be a list of defense preset names, got {defenses!r}")
    return ModelEntry(name=name, kind=kind, source=source, input_shape=tuple(shape), num_outputs=outputs,
                      data=sources, attacks=attacks, benign=benign,
                      defenses=None if defenses is None else tuple(defenses))


def suite_path(name_or_path: str) -> Path:
    """A built-in suite by name (``quick``, ``paper``, ``demo``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    builtin = SUITES_DIR / f"{name_or_path}.yaml"
    if not builtin.exists():
        names = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
        raise SuiteError(f"suite: no built-in suite {name_or_path!r} (built-in: {names}) and no such file")
    return builtin


def load_suite(name_or_path: str) -> Suite:
    """Read and validate a suite (see the module docstring); raises :class:`SuiteError`."""
    import evaluation.attacks  # noqa: F401 - registers the attacks

    try:
        return _load_suite(name_or_path)
    except ConfigError as error:  # a field read with contracts.params.Fields
        raise SuiteError(str(error)) from None


def _load_suite(name_or_path: str) -> Suite:
    from evaluation.presets import PRESETS

    path = suite_path(name_or_path)
    try:
        data = _expand(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError) as error:
        raise SuiteError(f"{path}: cannot read suite: {error}") from None
    f = Fields(data, "", {"name", "seed", "defenses", "models", "batch", "throttle_wait_s", "description"})
    seed = f.get("seed", int, 0)
    defenses = f.get("defenses", list, ["none", "default"])
    for i, d in enumerate(defenses):
        name = d.get("name") if isinstance(d, Mapping) else d
        if isinstance(d, Mapping):
            config = path.parent / Fields(d, f"defenses[{i}]", {"name", "config"}).get("config", str)
            if not config.is_file():
                raise SuiteError(f"defenses[{i}].config: no such file {config}")
            defenses[i] = {**d, "config": str(config)}
        if not isinstance(name, str) or (not isinstance(d, Mapping) and name not in PRESETS):
            raise SuiteError(f"defenses[{i}]: unknown defense preset {name!r}; valid: {sorted(PRESETS)} "
                             "or {name, config: gateway.yaml}")
    names = [d["name"] if isinstance(d, Mapping) else d for d in defenses]
    if len(set(names)) != len(names):
        raise SuiteError(f"defenses: names must be unique, got {names}")
    models = f.get("models", list)
    if not models:
        raise SuiteError("models: needs at least one model")
    entries = tuple(_model(m, f"models[{i}]", seed) for i, m in enumerate(models))
    seen = [m.name for m in entries]
    if len(set(seen)) != len(seen):
        raise SuiteError(f"models: names must be unique, got {seen}")
    for i, m in enumerate(entries):
        unknown = sorted(set(m.defenses or ()) - set(names))
        if unknown:
            raise SuiteError(f"models[{i}].defenses: {unknown} are not among the suite's defenses {names}")
    return Suite(name=f.get("name", str, path.stem), seed=seed, defenses=tuple(defenses), models=entries,
                 batch=f.get("batch", int, 250, minimum=1), throttle_wait_s=f.get("throttle_wait_s", float, 0.0, minimum=0),
                 path=str(path), raw=data)
