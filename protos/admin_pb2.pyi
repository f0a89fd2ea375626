from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "kind", "backend", "ready", "detectors", "defenses", "watermark")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    DEFENSES_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    backend: str
    ready: bool
    detectors: _containers.RepeatedScalarFieldContainer[str]
    defenses: _containers.RepeatedScalarFieldContainer[str]
    watermark: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., backend: _Optional[str] = ..., ready: _Optional[bool] = ..., detectors: _Optional[_Iterable[str]] = ..., defenses: _Optional[_Iterable[str]] = ..., watermark: _Optional[str] = ...) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "uptime_seconds", "models")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    version: str
    uptime_seconds: float
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, version: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ListClientsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClientModelState(_message.Message):
    __slots__ = ("model", "queries", "coverage", "suspicion", "status", "figures")
    class FiguresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    SUSPICION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FIGURES_FIELD_NUMBER: _ClassVar[int]
    model: str
    queries: int
    coverage: float
    suspicion: float
    status: str
    figures: _containers.ScalarMap[str, float]
    def __init__(self, model: _Optional[str] = ..., queries: _Optional[int] = ..., coverage: _Optional[float] = ..., suspicion: _Optional[float] = ..., status: _Optional[str] = ..., figures: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ClientSummary(_message.Message):
    __slots__ = ("client_id", "tier", "requests", "errors", "models")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    tier: str
    requests: int
    errors: int
    models: _containers.RepeatedCompositeFieldContainer[ClientModelState]
    def __init__(self, client_id: _Optional[str] = ..., tier: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ClientModelState, _Mapping]]] = ...) -> None: ...

class ListClientsResponse(_message.Message):
    __slots__ = ("clients",)
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    clients: _containers.RepeatedCompositeFieldContainer[ClientSummary]
    def __init__(self, clients: _Optional[_Iterable[_Union[ClientSummary, _Mapping]]] = ...) -> None: ...

class ClientRequest(_message.Message):
    __slots__ = ("client_id", "model")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    model: str
    def __init__(self, client_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class ClientActionResponse(_message.Message):
    __slots__ = ("changed",)
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    changed: int
    def __init__(self, changed: _Optional[int] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ("after_id", "limit")
    AFTER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    after_id: int
    limit: int
    def __init__(self, after_id: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("id", "time", "time_iso", "client_id", "model", "detector", "figures", "action")
    class FiguresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    TIME_ISO_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    FIGURES_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    id: int
    time: float
    time_iso: str
    client_id: str
    model: str
    detector: str
    figures: _containers.ScalarMap[str, float]
    action: str
    def __init__(self, id: _Optional[int] = ..., time: _Optional[float] = ..., time_iso: _Optional[str] = ..., client_id: _Optional[str] = ..., model: _Optional[str] = ..., detector: _Optional[str] = ..., figures: _Optional[_Mapping[str, float]] = ..., action: _Optional[str] = ...) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("alerts",)
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    def __init__(self, alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ...) -> None: ...

class EvidenceRequest(_message.Message):
    __slots__ = ("client_id", "model")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    model: str
    def __init__(self, client_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class EvidenceChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ImportEvidenceResponse(_message.Message):
    __slots__ = ("client_id", "model", "records")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    model: str
    records: int
    def __init__(self, client_id: _Optional[str] = ..., model: _Optional[str] = ..., records: _Optional[int] = ...) -> None: ...
