"""The promotion gate: a new model version takes the `champion` alias only when its success rate
clears the threshold and is at least the current champion's."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    metric: str = "success_rate"
    candidate: float | None = None
    champion: float | None = None
    champion_version: str | None = None
    threshold: float = 0.0

    @property
    def verdict(self) -> str:
        return "promoted" if self.promote else "rejected"

    @property
    def reason(self) -> str:
        """The comparison that decided, in one sentence with the metric's name, its value and the
        threshold: "success_rate 0.01 < threshold 0.5: not promoted"."""
        verdict = "promoted" if self.promote else "not promoted"
        metric, candidate, threshold = self.metric, self.candidate, self.threshold
        if candidate is None or not math.isfinite(candidate):
            return f"{metric} missing from the evaluation (threshold {threshold:g}): {verdict}"
        if candidate < threshold:
            return f"{metric} {candidate:.4g} < threshold {threshold:g}: {verdict}"
        passed = f"{metric} {candidate:.4g} >= threshold {threshold:g}"
        if self.champion is None:
            return f"{passed}: {verdict}"
        relation = ">=" if candidate >= self.champion else "<"
        return f"{passed}, {relation} champion (version {self.champion_version}) {self.champion:.4g}: {verdict}"

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, **asdict(self), "reason": self.reason}


def decide(candidate: float | None, champion: float | None, champion_version: str | None,
           threshold: float, metric: str = "success_rate") -> GateDecision:
    reasons = []
    ok = True
    if candidate is None or not math.isfinite(candidate):
        reasons.append(f"the candidate has no evaluation metric {metric!r}")
        ok = False
    elif candidate < threshold:
        reasons.append(f"{metric} {candidate:.4f} is below the threshold {threshold:.4f}")
        ok = False
    else:
        reasons.append(f"{metric} {candidate:.4f} clears the threshold {threshold:.4f}")
    if champion_version is None:
        reasons.append("there is no current champion")
    elif champion is None:
        reasons.append(f"the current champion (version {champion_version}) has no {metric!r}: "
                       f"any candidate that clears the threshold replaces it")
    elif candidate is not None and math.isfinite(candidate):
        if candidate >= champion:
            reasons.append(f"{metric} {candidate:.4f} is at least the champion's (version {champion_version}) "
                           f"{champion:.4f}")
        else:
            reasons.append(f"{metric} {candidate:.4f} is below the champion's (version {champion_version}) "
                           f"{champion:.4f}")
            ok = False
    return GateDecision(ok, reasons, metric, candidate, champion, champion_version, threshold)
