"""The evaluation runner: for every defense preset of a suite, start a gateway on loopback (or use the
endpoint given with ``--target``), run every attack and honest user of every model through it, and
measure what the thief got and what the honest users lost. Returns the report dict (see
:mod:`evaluation.report`).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.attacks import AttackContext, create_attack
from evaluation.benign import run_benign
from evaluation.client import KeyPool, VictimClient
from evaluation.data import ImageDataset
from evaluation.presets import (
    ADMIN_TOKEN,
    api_key,
    gateway_config,
    preset_name,
    start_gateway,
)
from evaluation.scoring import (
    ClientMonitor,
    agreement,
    fidelity,
    load_pool,
    load_reference,
    load_source,
    outputs,
    probe_accuracy,
    watermark_p_value,
    watermark_proof,
)
from evaluation.suite import AttackEntry, ModelEntry, Suite

__all__ = ["Prepared", "Runner", "Target"]


@dataclass
class Target:
    """An endpoint someone else runs: ``address`` HOST:PORT, the thief's ``api_keys`` (runs take keys from
    the list in turn), optionally the admin service ``admin`` HOST:PORT and its ``admin_token``."""

    address: str
    api_keys: Sequence[str]
    admin: str | None = None
    admin_token: str | None = None
    label: str = "target"


@dataclass
class Prepared:
    """A suite model with its data loaded and the clean reference outputs computed."""

    index: int
    entry: ModelEntry
    reference: torch.nn.Module
    pool: ImageDataset
    eval: ImageDataset
    eval_ref: np.ndarray
    victim_accuracy: float | None = None
    victim_downstream: float | None = None
    probe: tuple[ImageDataset, ImageDataset] | None = None
    chance: float = 0.0
    benign_data: dict[str, ImageDataset] = field(default_factory=dict)
    probes: np.ndarray | None = None  # the watermark test's fresh probe images float32 [N, C, H, W]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def client_ids(suite: Suite) -> dict[tuple[int, str], list[str]]:
    """Client ids per (model index, attack label or ``honest:<name>``): one per API key used."""
    plan: dict[tuple[int, str], list[str]] = {}
    for mi, model in enumerate(suite.models):
        for a in model.attacks:
            keys = getattr(create_attack(a.spec.name, a.spec.params, seed=a.spec.seed), "keys", 1)
            plan[(mi, a.label)] = [f"m{mi}-{_slug(a.label)}-k{k}" for k in range(keys)]
        for b in model.benign:
            plan[(mi, f"honest:{b.name}")] = [f"m{mi}-honest-{_slug(b.name)}"]
    return plan


class Runner:
    """Runs ``suite`` and writes nothing itself (see :func:`evaluation.report.write_report`)."""

    def __init__(self, suite: Suite, out: Path, *, progress: bool = True, target: Target | None = None,
                 log=None) -> None:
        self.suite, self.out, self.progress, self.target = suite, out, progress, target
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.plan = client_ids(suite)
        self._target_turn = 0
        self._configs: dict[str, str] = {}  # defense preset -> the config of the gateway serving it

    # ----------------------------------------------------------------------- preparation
    def prepare(self, mi: int, model: ModelEntry) -> Prepared:
        shape = model.input_shape
        reference = load_reference(model.source, f"models[{mi}].source")
        ev = load_source(model.data["eval"], shape)
        p = Prepared(index=mi, entry=model, reference=reference, pool=load_pool(model.data["pool"], shape), eval=ev,
                     eval_ref=outputs(reference, ev.images))
        if model.kind == "classifier":
            if ev.labels is not None:
                p.victim_accuracy = float((p.eval_ref.argmax(1) == ev.labels).mean())
            p.chance = float(np.bincount(p.eval_ref.argmax(1)).max() / len(ev))
        else:
            train, test = load_source(model.data["probe_train"], shape), load_source(model.data["probe_test"], shape)
            if train.labels is None or test.labels is None:
                raise ValueError(f"models[{mi}].data.probe_train/probe_test: need labelled datasets")
            p.probe = (train, test)
            p.victim_downstream = self._downstream(p, reference)
            p.chance = float(np.bincount(test.labels).max() / len(test))
        for b in model.benign:
            p.benign_data[b.name] = load_source(b.data, shape)
        p.probes = load_pool(model.data["probes"], shape).images if model.data["probes"] else ev.images
        return p

    def _downstream(self, p: Prepared, model: torch.nn.Module) -> float:
        train, test = p.probe  # type: ignore[misc]
        return probe_accuracy(outputs(model, train.images), train.labels, outputs(model, test.images), test.labels,
                              seed=self.suite.seed)

    def _metric(self, p: Prepared, surrogate: torch.nn.Module) -> dict[str, float | None]:
        if p.entry.kind == "classifier":
            out = outputs(surrogate, p.eval.images)
            acc = None if p.eval.labels is None else float((out.argmax(1) == p.eval.labels).mean())
            return {"agreement": agreement(out, p.eval_ref), "stolen_accuracy": acc,
                    "stolen_downstream_accuracy": None}
        return {"agreement": None, "stolen_accuracy": None,
                "stolen_downstream_accuracy": self._downstream(p, surrogate),
                "embedding_fidelity": fidelity(outputs(surrogate, p.eval.images), p.eval_ref)}

    # ----------------------------------------------------------------------- one gateway
    def _victim(self, address: str, model: str, keys: Sequence[str]) -> VictimClient | KeyPool:
        kw = {"batch": self.suite.batch, "throttle_wait_s": self.suite.throttle_wait_s}
        if len(keys) == 1:
            return VictimClient(address, model, keys[0], **kw)
        return KeyPool(address, model, keys, **kw)

    def _keys(self, ids: Sequence[str]) -> list[str]:
        if self.target is None:
            return [api_key(c) for c in ids]
        keys = list(self.target.api_keys)
        out = [keys[(self._target_turn + i) % len(keys)] for i in range(len(ids))]
        self._target_turn += len(ids)
        return out

    def _watched(self, address: str, p: Prepared, ids: Sequence[str], admin: Any
                 ) -> tuple[VictimClient | KeyPool, ClientMonitor]:
        """The victim client (or key pool) for ``ids`` and an admin monitor watching every key."""
        victim = self._victim(address, p.entry.name, self._keys(ids))
        monitor = ClientMonitor(admin, p.entry.name, every=self.suite.batch)
        for cid, client in zip(ids, victim.clients if isinstance(victim, KeyPool) else [victim], strict=True):
            monitor.watch(cid, client)
        return victim, monitor

    def run_attack(self, mi: int, p: Prepared, a: AttackEntry, defense: str, address: str, admin: Any) -> dict:
        """Run one attack through ``address`` and score its surrogate; one ``runs`` entry of the report."""
        ids = self.plan[(mi, a.label)]
        victim, monitor = self._watched(address, p, ids, admin)
        attack = create_attack(a.spec.name, a.spec.params, seed=a.spec.seed)
        ctx = AttackContext(victim=victim, kind=p.entry.kind, input_shape=p.entry.input_shape,
                            num_outputs=p.entry.num_outputs, budget=a.spec.budget, seed=a.spec.seed,
                            progress=self.progress, pool=p.pool, eval_x=p.eval.images)
        torch.manual_seed(a.spec.seed)
        t0 = time.perf_counter()
        result = attack.run(ctx)
        seconds = time.perf_counter() - t0
        monitor.poll(force=True)
        clients = victim.clients if isinstance(victim, KeyPool) else [victim]
        refusal = next((c.refusal for c in clients if c.refusal is not None), None)
        blocked = monitor.blocked_after
        if blocked is None and refusal is not None and refusal.code == "PERMISSION_DENIED":
            blocked = victim.refused_after
        wm = watermark_p_value(admin, p.entry.name, ids, result.surrogate, p.entry.kind)
        proof = watermark_proof(self._configs.get(defense), p.entry.name, p.reference, p.probes, result.surrogate)
        victim.close()
        key = "agreement" if p.entry.kind == "classifier" else "stolen_downstream_accuracy"
        return {"model": p.entry.name, "kind": p.entry.kind, "attack": a.label, "attack_name": a.spec.name,
                "params": dict(a.spec.params), "defense": defense, "budget": a.spec.budget,
                "queries": int(result.queries), "api_keys": len(ids), "victim_accuracy": p.victim_accuracy,
                "victim_downstream_accuracy": p.victim_downstream, **self._metric(p, result.surrogate),
                "flagged_after": monitor.flagged_after, "blocked_after": blocked,
                "refused_after": result.refused_after,
                "watermark_p_value": None if wm is None else wm["p_value"], "watermark": wm,
                # The p-value the verdict judges by: `moat verify --config` of this copy on fresh probes.
                "moat_verify_p_value": None if proof is None else proof["p_value"], "watermark_proof": proof,
                "chance": p.chance, "seconds": round(seconds, 2), "seed": a.spec.seed,
                "training": result.training,
                "curve": [[int(q), self._metric(p, m)[key]] for q, m in result.curve],
                "coverage": [[int(q), round(c, 3)] for q, c in monitor.coverage]}

    def run_honest(self, mi: int, p: Prepared, spec: Any, defense: str, address: str, admin: Any) -> dict:
        (cid,) = self.plan[(mi, f"honest:{spec.name}")]
        (key,) = self._keys([cid])
        victim = VictimClient(address, p.entry.name, key, batch=self.suite.batch)
        monitor = ClientMonitor(admin, p.entry.name, every=250)
        monitor.watch(cid, victim)
        t0 = time.perf_counter()
        result = run_benign(spec, p.entry.kind, victim, p.benign_data[spec.name], progress=self.progress)
        monitor.poll(force=True)
        victim.close()
        status = monitor.status.get(cid)
        task = f"classes {list(spec.classes)}" if spec.classes else "all classes"
        task += " (labels)" if p.entry.kind == "classifier" else " (linear probe)"
        task += f", {spec.passes} passes" if spec.passes > 1 else ""
        return {"model": p.entry.name, "kind": p.entry.kind, "user": spec.name, "defense": defense, "task": task,
                "queries": result.queries, "utility": round(result.utility, 4), "utility_undefended": None,
                "flagged": monitor.flagged_after is not None or result.refused_after is not None,
                "status": status, "flagged_after": monitor.flagged_after, "refused_after": result.refused_after,
                "seconds": round(time.perf_counter() - t0, 2),
                "coverage": [[int(q), round(c, 3)] for q, c in monitor.coverage]}

    def run_preset(self, prepared: list[Prepared], defense: str, address: str, admin: Any) -> tuple[list, list]:
        runs, benign = [], []
        for p in prepared:
            mi = p.index
            for b in p.entry.benign:
                benign.append(self.run_honest(mi, p, b, defense, address, admin))
                self.log(f"[{defense}] {p.entry.name} honest {b.name}: utility {benign[-1]['utility']:.4f} "
                         f"flagged={benign[-1]['flagged']}")
            for a in p.entry.attacks:
                runs.append(self.run_attack(mi, p, a, defense, address, admin))
                r = runs[-1]
                score = r["agreement"] if r["kind"] == "classifier" else r["stolen_downstream_accuracy"]
                self.log(f"[{defense}] {p.entry.name} {a.label}: {r['queries']} queries, score {score:.4f}, "
                         f"flagged_after={r['flagged_after']} blocked_after={r['blocked_after']} "
                         f"p={r['watermark_p_value']} ({r['seconds']:.0f} s)")
        return runs, benign

    # ----------------------------------------------------------------------- everything
    def run(self) -> dict[str, Any]:
        from gateway.admin_client import AdminClient

        t0 = time.perf_counter()
        prepared = [self.prepare(mi, m) for mi, m in enumerate(self.suite.models)]
        runs: list[dict] = []
        benign: list[dict] = []
        if self.target is not None:
            admin = AdminClient(self.target.admin, self.target.admin_token) if self.target.admin else None
            r, b = self.run_preset(prepared, self.target.label, self.target.address, admin)
            runs += r
            benign += b
        else:
            ids = [c for cs in self.plan.values() for c in cs]
            for preset in self.suite.defenses:
                name = preset_name(preset)
                chosen = [p for p in prepared if p.entry.defenses is None or name in p.entry.defenses]
                if not chosen:
                    continue
                config = gateway_config([p.entry for p in chosen], preset, ids, self.out / "gateways")
                self._configs[name] = str(config)
                gateway = start_gateway(config, self.out / "gateways")
                self.log(f"[{name}] gateway on {gateway.address}")
                try:
                    with AdminClient(f"127.0.0.1:{gateway.ports['admin']}", ADMIN_TOKEN) as admin:
                        r, b = self.run_preset(chosen, name, gateway.address, admin)
                finally:
                    gateway.stop()
                runs += r
                benign += b
        return {"suite": self.suite.name, "suite_path": self.suite.path, "seed": self.suite.seed,
                "runs": runs, "benign": benign, "seconds": round(time.perf_counter() - t0, 1),
                "models": [{"model": p.entry.name, "kind": p.entry.kind, "victim_accuracy": p.victim_accuracy,
                            "victim_downstream_accuracy": p.victim_downstream, "chance": p.chance}
                           for p in prepared]}
