"""The policy: what a client's suspicion makes of its status, and which alerts that raises.

The policy reads the detectors' combined suspicion (the max of their scores, in [0, 1]) against
the model's thresholds: ``flag_at`` flags the client (defenses that act on flagged clients
start), ``throttle_at`` rate-limits it, ``block_at`` blocks it (until an operator unblocks or
resets it). Statuses only rise: a thief that mixes natural queries into its stream must not wash
its flag out. An operator lowers them; an unblocked client is exempt from throttling and
blocking until it is reset.
"""

from __future__ import annotations

from collections.abc import Mapping

from contracts.batch import Verdict
from gateway.config import PolicyConfig

STATUSES = ("ok", "flagged", "throttled", "blocked")


def decide(previous: Mapping[str, float | str], suspicion: float, verdicts: Mapping[str, Verdict],
           policy: PolicyConfig) -> str:
    """The new status: what the suspicion calls for, but never below the previous status
    (``previous``: the client's stored fields, ``status`` and ``exempt`` among them)."""
    escalate = previous.get("exempt") != 1.0
    wanted = "ok"
    if suspicion >= policy.flag_at or any(v.alert for v in verdicts.values()):
        wanted = "flagged"
    if escalate and policy.throttle_at is not None and suspicion >= policy.throttle_at:
        wanted = "throttled"
    if escalate and policy.block_at is not None and suspicion >= policy.block_at:
        wanted = "blocked"
    before = str(previous.get("status", "ok"))
    return max(wanted, before, key=STATUSES.index)


def alerts_to_raise(previous: Mapping[str, float | str], status: str,
                    verdicts: Mapping[str, Verdict]) -> list[tuple[str, Verdict]]:
    """One alert per detector whose alert flag turned on, and one per rise in status (flagged,
    throttled, blocked) that no such alert already announced, naming the top-scoring detector."""
    raised = [(name, verdict) for name, verdict in verdicts.items()
              if verdict.alert and previous.get(f"alert:{name}") != 1.0]
    rose = STATUSES.index(status) > STATUSES.index(str(previous.get("status", "ok")))
    if rose and not raised and verdicts:
        top = max(verdicts.values(), key=lambda v: v.score)
        raised.append((top.detector, top))
    return raised


def status_fields(status: str, suspicion: float, verdicts: Mapping[str, Verdict], now: float) -> dict[str, float | str]:
    """The client's stored fields after a decision: status, suspicion, each detector's alert flag
    and figures (``<detector>.<figure>``)."""
    fields: dict[str, float | str] = {"status": status, "suspicion": suspicion, "updated": now}
    for name, verdict in verdicts.items():
        fields[f"alert:{name}"] = 1.0 if verdict.alert else 0.0
        fields.update({f"{name}.{figure}": value for figure, value in verdict.figures.items()})
    return fields
