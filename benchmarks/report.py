"""Helpers both benchmark scripts use to summarise repeated runs."""

from __future__ import annotations

import statistics


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)]


def combine(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """Per executor and metric: [median, min, max] over the repeated runs (NaNs left out)."""
    combined: dict[str, dict[str, list[float]]] = {}
    for name in runs[0]:
        combined[name] = {}
        for metric in runs[0][name]:
            values = [run[name][metric] for run in runs]
            known = [v for v in values if v == v] or [float("nan")]
            combined[name][metric] = [statistics.median(known), min(known), max(known)]
    return combined
