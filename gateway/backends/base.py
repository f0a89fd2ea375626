"""The backend contract and its registry."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from contracts.params import check_keys, params_at
from contracts.registry import Registry
from gateway.config import ComponentConfig, ConfigError
from gateway.types import (
    DATATYPES,
    InferRequest,
    InferResponse,
    ModelMetadata,
    TensorSpec,
)


@runtime_checkable
class Backend(Protocol):
    """Produces the clean answer for one configured model.

    ``infer`` receives inputs already validated against ``metadata()`` and returns every declared
    output; ``deadline`` is an absolute ``time.monotonic()`` instant or None. ``while_waiting``,
    when given, is called once on the event loop as soon as the request is in the model's hands
    (sent upstream, running on a worker thread), before the answer is awaited: the data plane
    runs the previous answers' deferred detection there, in time the loop would otherwise idle
    (it never raises).
    """

    name: str

    async def start(self) -> None: ...

    async def metadata(self) -> ModelMetadata: ...

    async def ready(self) -> bool: ...

    async def infer(self, request: InferRequest, deadline: float | None, *,
                    while_waiting: Callable[[], None] | None = None) -> InferResponse: ...

    async def close(self) -> None: ...


# Built-in backends are imported on first use so that `upstream` works without torch installed.
BACKENDS: Registry[Backend] = Registry(
    "backend", group="moat.backends",
    builtins={"embedded": "gateway.backends.embedded", "upstream": "gateway.backends.upstream"})


def create_backend(model_name: str, config: ComponentConfig, where: str, **options: Any) -> Backend:
    """Build the backend named in ``config``; ``ConfigError`` names the field on bad params."""
    try:
        factory = BACKENDS.get(config.name)
    except KeyError as error:
        raise ConfigError(f"{where}.name", str(error.args[0])) from None
    return factory(model_name, config.params, f"{where}.params", **options)


def parse_tensor_specs(data: Any, where: str) -> tuple[TensorSpec, ...]:
    """Parse a list of ``{name, datatype, shape}`` mappings from backend params."""
    if not isinstance(data, list) or not data:
        raise ConfigError(where, "must be a non-empty list of {name, datatype, shape}")
    specs: list[TensorSpec] = []
    for index, entry in enumerate(data):
        field = f"{where}[{index}]"
        if not isinstance(entry, Mapping) or set(entry) - {"name", "datatype", "shape"}:
            raise ConfigError(field, "must be a mapping with exactly name, datatype and shape")
        name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{field}.name", "must be a non-empty string")
        if datatype not in DATATYPES:
            raise ConfigError(f"{field}.datatype", f"must be one of {', '.join(DATATYPES)}, got {datatype!r}")
        if not isinstance(shape, list) or not shape or not all(
            isinstance(d, int) and not isinstance(d, bool) and (d > 0 or d == -1) for d in shape
        ):
            raise ConfigError(f"{field}.shape", f"must be a list of positive ints or -1, got {shape!r}")
        if any(spec.name == name for spec in specs):
            raise ConfigError(f"{field}.name", f"duplicate tensor name {name!r}")
        specs.append(TensorSpec(name, datatype, tuple(shape)))
    return tuple(specs)


def check_params(params: Mapping[str, Any], where: str, allowed: set[str], required: set[str]) -> None:
    """Reject unknown and missing backend params, naming the field (``where.<param>``)."""
    with params_at(where):
        check_keys(params, allowed, sorted(required))
