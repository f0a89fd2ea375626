"""Builds the gateway from its config and runs it: public gRPC port, admin port, metrics port.

The public port serves the Open Inference Protocol, ``grpc.health.v1`` and reflection; the
admin port serves :mod:`gateway.admin`; metrics are Prometheus text over HTTP. ``stop()`` marks
health NOT_SERVING, lets in-flight requests finish within the grace period, then releases
backends and flushes state.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry
from threadpoolctl import threadpool_limits

from contracts.params import ConfigError
from gateway import admin, servicer
from gateway.admin import AdminServicer
from gateway.alerts import AlertSink
from gateway.auth import KeyStore
from gateway.backends import create_backend
from gateway.config import GatewayConfig, ServerConfig, TLSConfig
from gateway.exposure import refuse_demo_credentials_beyond_loopback
from gateway.interceptors import StatusInterceptor
from gateway.metrics import GatewayMetrics, MetricsServer
from gateway.pipeline import DataPlane, ServedModel
from gateway.protection import ModelProtection
from gateway.secrets import load_server_secret
from gateway.servicer import InferenceServicer
from gateway.state import StateStore, create_store
from protos import admin_pb2_grpc, inference_pb2_grpc

log = logging.getLogger("moat.gateway")
READINESS_INTERVAL_SECONDS = 5.0


@dataclass(frozen=True)
class Ports:
    grpc: int
    admin: int
    metrics: int


def _server_options(max_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


def _bind(server: grpc.aio.Server, host: str, port: int, tls: TLSConfig | None) -> int:
    address = f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
        credentials = grpc.ssl_server_credentials(
            [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
            root_certificates=ca, require_client_auth=ca is not None,
        )
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    return bound


def build_plane(
    config: GatewayConfig, metrics: GatewayMetrics, store: StateStore, secret: bytes | None, alerts: AlertSink,
) -> DataPlane:
    """Build every model's backend and protection; ``ConfigError`` names the field of a bad one."""
    models = {}
    for index, model in enumerate(config.models):
        backend = create_backend(
            model.name, model.backend, f"models[{index}].backend",
            max_message_bytes=config.server.max_message_bytes,
            on_batch=metrics.backend_batch_rows.labels(model=model.name, backend=model.backend.name).observe,
        )
        protection = None
        if model.protected and secret is not None:
            protection = ModelProtection(model, f"models[{index}]", config.tiers, store, secret, metrics, alerts)
        models[model.name] = ServedModel(config=model, backend=backend, protection=protection)
    return DataPlane(models, metrics, store=store, deferred_max_rows=config.server.deferred_max_rows,
                     detection_commit_seconds=config.server.detection_commit_ms / 1000)


def _check_tiers(config: GatewayConfig, keys: KeyStore) -> None:
    """Every key's tier is defined, and tier overrides name components some model has."""
    tiers = {tier.name for tier in config.tiers}
    for client in keys.clients:
        if client.tier not in tiers:
            raise ConfigError(f"keys file {config.auth.keys_file}: client {client.id!r}.tier",
                              f"tier {client.tier!r} is not defined; tiers: {', '.join(sorted(tiers))}")
    for tier in config.tiers:
        for kind in ("detectors", "defenses"):
            known = {c.name for model in config.models for c in getattr(model, kind)}
            for name in getattr(tier, kind):
                if name not in known:
                    raise ConfigError(f"tiers.{tier.name}.{kind}.{name}",
                                      f"no model has this {kind[:-1]}; configured: {', '.join(sorted(known)) or 'none'}")


def _store(config: GatewayConfig) -> StateStore:
    params = dict(config.state.params)
    if isinstance(params.get("path"), str):
        params["path"] = str(Path(params["path"]).expanduser())
    try:
        return create_store(config.state.name, params)
    except (ConnectionError, OSError) as error:
        raise ConfigError("state.params", f"cannot open the state store: {error}") from None


class Gateway:
    """A running gateway. Build with :func:`build_gateway`, then ``await start()``."""

    def __init__(self, config: GatewayConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.keys = KeyStore.from_file(config.auth.keys_file)
        _check_tiers(config, self.keys)
        self._secret = load_server_secret(config.auth)
        # Before anything is built or stored: public credentials on a public address stop here.
        refuse_demo_credentials_beyond_loopback(config.server, config.auth, self._secret, self.keys.key_hashes())
        self.metrics = GatewayMetrics(self.registry, [model.name for model in config.models])
        self.store = _store(config)
        self.alerts = AlertSink(self.store)
        self.plane = build_plane(config, self.metrics, self.store, self._secret, self.alerts)
        self.health = health.aio.HealthServicer()
        self._public: grpc.aio.Server | None = None
        self._admin: grpc.aio.Server | None = None
        self._metrics_server: MetricsServer | None = None
        self._readiness: asyncio.Task[None] | None = None
        self.ports: Ports | None = None
        self._declare_series()

    def _declare_series(self) -> None:
        """Create every bounded label set at 0, so the first alert or error is an increase that
        Prometheus' increase()/rate() can see (a series born at 1 looks like no change)."""
        for name, served in self.plane.models.items():
            self.metrics.requests.labels(model=name, code="OK")
            if served.config.backend.name == "upstream":
                self.metrics.upstream_errors.labels(model=name, code="UNAVAILABLE")
            for detector in served.config.detectors:
                self.metrics.alerts.labels(model=name, detector=detector.name)

    async def _watch_readiness(self, interval: float = READINESS_INTERVAL_SECONDS) -> None:
        """Refresh moat_model_ready on a timer: probes use grpc.health.v1, which asks no model."""
        while True:
            try:
                await self.plane.server_ready()
            except Exception:  # noqa: BLE001 - a failed probe must never stop the watcher
                log.exception("readiness check failed")
            await asyncio.sleep(interval)

    async def start(self) -> Ports:
        server = self.config.server
        await self.plane.start()
        self._public = self._public_server(server)
        self._admin = grpc.aio.server(
            interceptors=[StatusInterceptor()], options=_server_options(server.max_message_bytes)
        )
        admin_pb2_grpc.add_MoatAdminServicer_to_server(
            AdminServicer(self.plane, self.keys, self.alerts, secret=self._secret), self._admin)
        reflection.enable_server_reflection([admin.SERVICE_NAME, reflection.SERVICE_NAME], self._admin)
        grpc_port = _bind(self._public, server.host, server.grpc_port, server.tls)
        admin_port = _bind(self._admin, server.admin_host, server.admin_port, server.tls)
        self._metrics_server = MetricsServer(self.registry, server.metrics_host, server.metrics_port)
        await self._public.start()
        await self._admin.start()
        for name in ("", servicer.SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._readiness = asyncio.create_task(self._watch_readiness())
        self.ports = Ports(grpc=grpc_port, admin=admin_port, metrics=self._metrics_server.port)
        log.info(json.dumps({"event": "serving", "host": server.host, "admin_host": server.admin_host,
                             "metrics_host": server.metrics_host, **self.ports.__dict__,
                             "models": sorted(self.plane.models)}))
        return self.ports

    def _public_server(self, server: ServerConfig) -> grpc.aio.Server:
        public = grpc.aio.server(
            interceptors=[StatusInterceptor(self.metrics)], options=_server_options(server.max_message_bytes)
        )
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.plane, self.keys), public
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, public)
        services = [servicer.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(services, public)
        return public

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop: in-flight requests get ``grace`` seconds, then state is flushed."""
        grace = self.config.server.grace_seconds if grace is None else grace
        started = time.monotonic()
        await self.health.enter_graceful_shutdown()
        if self._readiness is not None:
            self._readiness.cancel()
        servers = [s for s in (self._public, self._admin) if s is not None]
        await asyncio.gather(*(s.stop(grace) for s in servers))
        await self.plane.close()
        # Every store write was committed before its answer left; close() flushes what remains.
        self.store.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        log.info(json.dumps({"event": "stopped", "seconds": round(time.monotonic() - started, 3)}))

    async def wait_for_termination(self) -> None:
        if self._public is not None:
            await self._public.wait_for_termination()


def build_gateway(config: GatewayConfig, registry: CollectorRegistry | None = None) -> Gateway:
    """Validate everything the config names (keys file, backends) and build the gateway."""
    # Detectors search tiny indexes per request; FAISS's OpenMP threads only contend with the
    # event loop and each other, which makes single queries far slower on busy cores.
    faiss.omp_set_num_threads(1)
    gateway = Gateway(config, registry)
    # The same for the BLAS of numpy and scipy (detectors' projections, PRADA's test): its
    # threads spin-wait between one-row products and take a busy host's cores from the model
    # server. Torch's OpenMP pool is left alone.
    threadpool_limits(limits=1, user_api="blas")
    return gateway


def freeze_startup_heap() -> None:
    """Take everything allocated while starting (modules, models, channels, the config) out of the
    garbage collector's view, as long-running Python servers do: otherwise each full collection
    re-scans those hundreds of thousands of objects, and a loaded gateway allocates enough to run
    one every few hundred requests (``moat bench``, classifier at concurrency 32, one run: 2.46 ->
    2.0 ms of gateway CPU per request, throughput 0.59x -> 0.75x the bare proxy's). Call once,
    after the gateway started."""
    gc.collect()
    gc.freeze()
