"""Learning measurements: metric series from training logs and dicts, and picking the best snapshot."""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
import operator
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gpupas.errors import InvalidInputError
from gpupas.versions.model import select_snapshot

_STEP_NAMES = ("step", "global_step", "iteration", "iter", "epoch")
Series = dict[str, list[list[Any]]]


def _value(v: Any) -> float | None:
    if v is None or (isinstance(v, str) and v == ""):  # not v == "": an array's is elementwise
        return None
    if callable(getattr(v, "detach", None)):  # a loss tensor as it is: torch warns converting one with its graph
        v = v.detach()
    try:
        f = float(v)
    except OverflowError:  # an int past a double's range: not finite, as float("1e400") is not
        return None
    except (TypeError, ValueError):
        raise InvalidInputError(f"metric value {v!r} is not a number") from None
    return f if math.isfinite(f) else None


def _step(v: Any) -> int | float:
    try:
        f = float(v)
    except OverflowError:
        f = math.inf  # an int past a double's range
    except (TypeError, ValueError):
        raise InvalidInputError(f"step {v!r} is not a number") from None
    if not math.isfinite(f):
        raise InvalidInputError(f"step {v!r} is not finite")
    return int(f) if f.is_integer() else f


def snapshot_step(step: Any) -> int | None:
    """A snapshot's training step as a plain int (NumPy and torch integer scalars too), or None."""
    if step is None:
        return None
    if not isinstance(step, bool):
        n: int | None
        try:
            n = operator.index(step)
        except TypeError:
            n = int(step) if isinstance(step, float) and step.is_integer() else None  # 100.0
        if n is not None and -(2**63) <= n < 2**63:  # the catalog's (SQLite's) integers
            return n
    raise InvalidInputError(f"step {step!r:.40} must be an integer of at most 64 bits (the training step of the "
                            "snapshot)")


def _from_rows(rows: Iterable[Mapping[str, Any]], source: str) -> dict[str, list[list[Any]]]:
    """Series from per-step records; columns holding any text (timestamps, phase names) are skipped."""
    rows = [r for r in rows if isinstance(r, Mapping)]
    cols = list(dict.fromkeys(k for r in rows for k in r if k is not None))
    step_key = next((k for k in _STEP_NAMES if k in cols), None)

    def numeric(v: Any) -> bool:
        if v is None or (isinstance(v, str) and v == "") or isinstance(v, bool):
            return v is not True and v is not False
        try:
            float(v)
        except (TypeError, ValueError):
            return False
        return True

    metrics = [k for k in cols if k != step_key and all(numeric(r.get(k)) for r in rows)]
    for k in metrics:
        if not isinstance(k, str) or not k:  # as a mapping's names: a tuple made no JSON, 1 became "1"
            raise InvalidInputError(f"{source}: metric name {k!r} must be a non-empty string")
    out: dict[str, list[list[Any]]] = {}
    step: int | float = 0
    for i, row in enumerate(rows):
        raw_step = row.get(step_key) if step_key else None
        if step_key is None:
            step = i
        elif raw_step not in (None, ""):
            step = _step(raw_step)  # a row without one is of the step before it (not of its row number)
        for k in metrics:
            if row.get(k) not in (None, ""):
                out.setdefault(k, []).append([step, _value(row[k])])
    if not out and rows:
        raise InvalidInputError(f"{source}: no numeric metric columns found")
    return out


def read_training_log(path: str | os.PathLike[str]) -> dict[str, list[list[Any]]]:
    """Metric series from a training log: CSV with a header, JSON or JSON lines.

    A ``step`` (or ``global_step``, ``iteration``, ``iter``, ``epoch``) column gives the step (a row where
    it is blank: the step of the row before), else the row number; every other numeric column is a
    series. JSON may also be an object of series (``{"loss": [0.9, 0.5]}`` or ``{"loss": [[step, value],
    ...]}``).
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"training log {p} does not exist")
    text = p.read_text(errors="replace")
    try:
        if p.suffix == ".csv":
            return _from_rows(csv.DictReader(io.StringIO(text)), str(p))
        if p.suffix == ".jsonl":
            return _from_rows([json.loads(line) for line in text.splitlines() if line.strip()], str(p))
        if p.suffix == ".json":
            return normalize_metrics(json.loads(text), str(p))
    except (json.JSONDecodeError, csv.Error, AttributeError) as exc:
        raise InvalidInputError(f"training log {p} cannot be read: {exc}") from None
    raise InvalidInputError(f"training log {p}: unknown type {p.suffix!r}; give .csv, .json or .jsonl")


def normalize_metrics(metrics: Any, source: str = "metrics") -> dict[str, list[list[Any]]]:
    """Metric series as ``{name: [[step, value], ...]}`` (values NaN/Inf -> None).

    Accepts a path (see :func:`read_training_log`), a list of per-step records, or a mapping of
    name to a number, a list of numbers, a list of ``[step, value]`` pairs or ``{step: value}``.
    """
    if metrics is None:
        return {}
    if isinstance(metrics, (str, os.PathLike)):
        return read_training_log(metrics)
    if isinstance(metrics, list):
        if not all(isinstance(r, Mapping) for r in metrics):
            raise InvalidInputError(f"{source}: a list of metrics must hold one object per step")
        return _from_rows(metrics, source)
    if not isinstance(metrics, Mapping):
        raise InvalidInputError(f"{source}: metrics must be a mapping of name -> series, a list of records or a path")
    out: dict[str, list[list[Any]]] = {}
    for name, series in metrics.items():
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"{source}: metric name {name!r} must be a non-empty string")
        if getattr(series, "ndim", 0) >= 1 and callable(getattr(series, "tolist", None)):
            series = series.tolist()  # a NumPy array or torch tensor of values or of [step, value] rows
        if isinstance(series, Mapping):
            pts = [[_step(k), _value(v)] for k, v in series.items()]
        elif isinstance(series, (list, tuple)):
            pts = [[_step(x[0]), _value(x[1])] if isinstance(x, (list, tuple)) and len(x) == 2 else [i, _value(x)]
                   for i, x in enumerate(series)]
        else:
            pts = [[0, _value(series)]]
        out[name] = pts
    return out


def merge_metrics(into: dict[str, list[list[Any]]], more: Mapping[str, list[list[Any]]]) -> None:
    for name, pts in more.items():
        into.setdefault(name, []).extend(pts)


def upto(metrics: Mapping[str, list[list[Any]]], step: int | None, after: int | None) -> dict[str, Any]:
    """The points of each series in (after, step]; all of them when step is unknown."""
    if step is None:
        return {k: list(v) for k, v in metrics.items()}
    out = {k: [p for p in v if p[0] <= step and (after is None or p[0] > after)] for k, v in metrics.items()}
    return {k: v for k, v in out.items() if v}


def values_at(series: Sequence[Sequence[Any]], steps: Sequence[int | None]) -> list[float | None]:
    """The value at each of ``steps``, from one sort of the series, not a scan per step: the value logged last
    at the highest step up to it (all steps where None): of two points at one step the later, so an evaluation
    logged after its checkpoint, at its step, counts for it. None where that point is NaN or infinite (kept as
    None): a diverged checkpoint is not credited an earlier finite value."""
    pts = sorted((p[0], i, p[1]) for i, p in enumerate(series))  # the last of a step last (i: never a tie)
    keys = [p[0] for p in pts]
    out: list[float | None] = []
    for step in steps:
        k = len(pts) if step is None else bisect.bisect_right(keys, step)
        out.append(pts[k - 1][2] if k else None)
    return out


def pick_best(entries: list[dict[str, Any]], series: Mapping[str, Any], best: str | int | None,
               best_by: str | None) -> str | None:
    if best is not None:
        return select_snapshot(entries, best, entries[-1]["id"] if entries else None, None, "the version")["id"]
    if not best_by or not entries:
        return None
    metric, sign = best_rule(best_by)
    if metric not in series:
        raise InvalidInputError(f"best_by: no metric {metric!r}; the metrics are {', '.join(series) or 'none'}")
    values = values_at(series[metric], [e.get("step") for e in entries])
    scored = [(v, i) for i, v in enumerate(values) if v is not None]
    if not scored:
        return None
    return entries[min(scored, key=lambda t: (sign * t[0], t[1]))[1]]["id"]


def best_rule(best_by: str) -> tuple[str, int]:
    """A ``best_by`` rule as (metric, sign), the best the lowest ``sign * value``: "accuracy" (highest),
    "loss:min" (lowest); a metric named like a loss, error or perplexity is lowest-best by default."""
    if not isinstance(best_by, str):
        raise InvalidInputError(f"best_by is METRIC or METRIC:min or METRIC:max, not {best_by!r:.60}")
    metric, _, mode = best_by.partition(":")
    mode = mode or ("min" if re.search(r"loss|err|perplex", metric, re.IGNORECASE) else "max")  # "Train/Loss" too
    if not metric or mode not in ("min", "max"):
        raise InvalidInputError(f"best_by is METRIC or METRIC:min or METRIC:max, not {best_by!r}")
    return metric, 1 if mode == "min" else -1


def final_metrics(into: dict[str, list[list[Any]]], values: Mapping[str, Any], step: int | None) -> None:
    """Add one point per metric ``values`` (name -> value) at ``step`` (0 when unknown)."""
    for k, v in values.items():
        into.setdefault(k, []).extend(normalize_metrics({k: [[step or 0, v]]})[k])
