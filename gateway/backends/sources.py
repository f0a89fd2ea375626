"""Where an embedded model comes from: a registry of model sources.

A model source turns one config value into a torch module. Built in: ``torchscript: PATH`` and
``timm: {arch, checkpoint, num_classes, softmax, kwargs}`` (a timm architecture built without
pretrained weights, then loaded from a local state dict). Others come by entry point in the
``moat.model_sources`` group, as a factory ``(spec, field) -> torch.nn.Module``; the evaluation
package declares ``zoo: NAME`` (its locally trained victims) that way, so the gateway never imports
it. A source raises ``ConfigError`` naming ``field``, or ``ValueError``/``OSError``, which become one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from contracts.params import ConfigError
from contracts.registry import Registry

ModelSource = Callable[[Any, str], Any]
MODEL_SOURCES: Registry[Any] = Registry("model source", group="moat.model_sources")


def load_model(params: Mapping[str, Any], where: str, *, ignore: frozenset[str] | set[str] = frozenset()) -> Any:
    """The torch module of the one model source named among ``params``' keys (other than ``ignore``,
    the backend's own parameters); ``ConfigError`` names the field on any problem."""
    given = sorted(set(params) - set(ignore))
    if len(given) != 1:
        raise ConfigError(where, f"needs exactly one model source of {', '.join(MODEL_SOURCES.names())}, "
                                 f"got {given or 'none'}")
    name = given[0]
    field = f"{where}.{name}"
    try:
        source = MODEL_SOURCES.get(name)
    except KeyError as error:
        raise ConfigError(field, str(error.args[0])) from None
    try:
        return source(params[name], field)
    except ConfigError:
        raise
    except (ValueError, OSError) as error:
        raise ConfigError(field, str(error)) from None


@MODEL_SOURCES.register("torchscript")
def load_torchscript(spec: Any, field: str) -> Any:
    """A TorchScript file at path ``spec``."""
    import torch

    path = Path(str(spec))
    if not path.is_file():
        raise ConfigError(field, f"file {str(path)!r} does not exist")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any load failure is a config problem
        raise ConfigError(field, f"cannot load TorchScript file {str(path)!r}: {error}") from None


@MODEL_SOURCES.register("timm")
def load_timm(spec: Any, field: str) -> Any:
    """A timm architecture built without pretrained weights, then loaded from a local state dict."""
    import timm
    import torch

    if not isinstance(spec, Mapping) or "arch" not in spec or "checkpoint" not in spec:
        raise ConfigError(field, "must be a mapping with arch and checkpoint (a local state dict)")
    try:
        model = timm.create_model(
            spec["arch"], pretrained=False, num_classes=spec.get("num_classes", 1000),
            **dict(spec.get("kwargs", {})),
        )
        state = torch.load(Path(spec["checkpoint"]), map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
    except Exception as error:  # noqa: BLE001 - any load failure is a config problem
        raise ConfigError(field, f"cannot build timm model: {error}") from None
    if spec.get("softmax", False):
        model = torch.nn.Sequential(model, torch.nn.Softmax(dim=-1))
    return model
