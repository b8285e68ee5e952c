"""An episode's risk score, from the alerts it raised (Sandbox.verdict, incident reports)."""

from __future__ import annotations

from collections.abc import Iterable

#: Weight of one alert of each severity in the risk score.
RISK_WEIGHTS = {"info": 0.0, "low": 0.05, "medium": 0.2, "high": 0.5, "critical": 0.9}


def risk(fired: Iterable[tuple[str, str]]) -> float:
    """Risk in [0, 1] from the (rule, severity) pairs of an episode's alerts.

    risk = 1 - prod(1 - w(rule)) over the distinct rules that fired, where w is
    RISK_WEIGHTS[severity] (info 0, low 0.05, medium 0.2, high 0.5, critical 0.9):
    one critical alone gives 0.9, two highs 0.75, and repeats of one rule count
    once, so a noisy rule cannot dominate.
    """
    product = 1.0
    for severity in dict(fired).values():
        product *= 1.0 - RISK_WEIGHTS.get(severity, 0.0)
    return round(1.0 - product, 4)
