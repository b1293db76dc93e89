"""Storage tiers: second stores that hold some streams of an archive (e.g. low-order planes on S3).

The archive's root ``zarr.json`` lists its tiers under ``attributes.gpupas.tiers``::

    {"cold": {"url": "s3://bucket/prefix", "options": {"endpoint_url": "..."}, "id": "3f2a9c01"}}

``options`` are the fsspec storage options that are safe to write down (never keys, secrets or
tokens: :func:`split_secrets`); credentials come from the environment (``GPUPAS_TIER_OPTIONS_<NAME>``,
a JSON object, and whatever the filesystem reads itself, e.g. ``AWS_ACCESS_KEY_ID``) or from the
caller (``open_archive(..., tier_options={"cold": {...}})``). A tier's own root ``zarr.json`` names
the tier and carries the same ``id``, so an archive never reads or sweeps a location that is not its
tier. Streams live in a tier under the same keys as in the archive (``snapshots/<folder>/...``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from gpupas.errors import GpupasError, InvalidInputError, TierUnavailableError
from gpupas.format import keys, zarr_meta
from gpupas.store.base import Store, is_remote

LOCAL = "local"  # not a tier name: what commands call the archive's own store
_SECRET = re.compile(r"key|secret|token|password|passwd|credential|session", re.IGNORECASE)


def check_tier_name(name: object) -> str:
    """``name`` if it may name a tier (a name of :mod:`gpupas.format.keys`, not ``local``)."""
    keys.check_name(name, "tier name")
    if str(name).lower() == LOCAL:
        raise InvalidInputError(f"{LOCAL!r} means the archive's own store; give the tier another name")
    return str(name)


def split_secrets(options: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what may be written down, what may not) of fsspec storage options: keys, secrets, tokens,
    passwords and credentials (in nested dicts too, e.g. ``client_kwargs``) are never stored."""
    keep: dict[str, Any] = {}
    secret: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if _SECRET.search(str(k)):
            secret[k] = v
        elif isinstance(v, Mapping):
            a, b = split_secrets(v)
            keep[k] = a
            if b:
                secret[k] = b
        else:
            keep[k] = v
    return keep, secret


def merge(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Storage options merged left to right; nested dicts are merged too."""
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in (layer or {}).items():
            out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def env_options(name: str) -> dict[str, Any]:
    """Storage options of tier ``name`` from ``$GPUPAS_TIER_OPTIONS_<NAME>`` (a JSON object), if set."""
    var = env_var(name)
    text = os.environ.get(var)
    if not text:
        return {}
    try:
        got = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"${var} is not JSON ({exc}); set it to an object of storage options") from None
    if not isinstance(got, dict):
        raise InvalidInputError(f"${var} must hold a JSON object of storage options")
    return got


def env_var(name: str) -> str:
    """The variable of tier ``name``'s options: its name upper-cased, other characters than letters and digits
    as ``_`` (so no two tiers of an archive may differ only there)."""
    return "GPUPAS_TIER_OPTIONS_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def normalize_url(url: str) -> str:
    """A tier location as it is written down: URLs as given, local paths absolute."""
    url = os.fspath(url)
    return url if is_remote(url) else os.path.abspath(os.path.expanduser(url.removeprefix("file://")))


def inside(url: str, location: str) -> bool:
    """Whether tier location ``url`` lies inside (or is) the archive at ``location``."""
    if is_remote(url) != is_remote(location):
        return False
    if is_remote(url):
        a, b = url.rstrip("/"), location.rstrip("/")
        return a == b or a.startswith(b + "/")
    a, b = os.path.realpath(url), os.path.realpath(location)
    return os.path.commonpath([a, b]) == b


def marker(name: str, tier_id: str) -> dict[str, Any]:
    """The root group document of a tier."""
    return zarr_meta.group({"gpupas": {"tier": {"name": name, "id": tier_id}}})


def new_id() -> str:
    return uuid.uuid4().hex[:8]


def read_marker(store: Store) -> dict[str, Any] | None:
    """The ``{"name", "id"}`` a tier location's root names, None where it holds nothing; raises
    InvalidInputError where it holds something else (an archive, other data)."""
    data = store.get(keys.ROOT)
    if data is None:
        if store.list(""):
            raise InvalidInputError(f"{store.location} is not empty and not a gpupas tier; pick an empty location")
        return None
    try:
        attrs = json.loads(data).get("attributes", {}).get("gpupas", {})
    except (ValueError, AttributeError):
        attrs = None
    tier = attrs.get("tier") if isinstance(attrs, dict) else None
    if not isinstance(tier, dict):
        what = "a gpupas archive" if isinstance(attrs, dict) and "format" in attrs else "not a gpupas tier"
        raise InvalidInputError(f"{store.location} holds {what}; a tier needs a location of its own")
    return tier


def unreachable(name: str, url: str, exc: BaseException) -> TierUnavailableError:
    """The error for a tier that cannot be used, with what to do about it."""
    why = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return TierUnavailableError(f"tier {name!r} ({url}) is full: {why}. Free space there, or move the planes to "
                                    "another tier; nothing was changed")
    return TierUnavailableError(
        f"tier {name!r} ({url}) cannot be used: {why}. Check that it is online and that its credentials are set "
        f"(${env_var(name)} as a JSON object of storage options, the filesystem's own variables such as "
        f"AWS_ACCESS_KEY_ID, or open_archive(..., tier_options={{{name!r}: {{...}}}})); if its data moved, point "
        f"the tier there with `gpupas tier add {name} NEW_URL --force`")


class GuardedStore:
    """A store whose failures (a server down, a refused request) raise the GpupasError ``error(exc)``
    makes (a tier's: TierUnavailableError naming it); gpupas's own errors (a damaged chunk) pass
    unchanged."""

    def __init__(self, store: Store, error: Callable[[BaseException], GpupasError],
                 passes: Callable[[BaseException], bool] = lambda exc: False,
                 wraps: tuple[type[GpupasError], ...] = ()):
        self._store, self._error, self._passes = store, error, passes  # passes(exc): raised unchanged too
        self._wraps = wraps  # gpupas errors that are the store's failures too (a tier that refuses writes)

    @property
    def inner(self) -> Store:
        return self._store

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._store, attr)
        if not callable(value):
            return value
        return self._guard(value, wrap_result=attr == "writer")

    def _guard(self, fn: Callable[..., Any], wrap_result: bool = False) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            ours: list[BaseException] = []  # raised by a callback we passed in (an update's change): not the store's
            args = tuple(_noting(a, ours) if callable(a) else a for a in args)
            try:
                out = fn(*args, **kwargs)
            except GpupasError as exc:
                if exc in ours or not isinstance(exc, self._wraps):
                    raise
                raise self._error(exc) from exc
            except Exception as exc:
                if exc in ours or self._passes(exc):
                    raise
                raise self._error(exc) from exc
            return _GuardedWriter(out, self) if wrap_result else out

        return call


def _noting(fn: Callable[..., Any], raised: list[BaseException]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            raised.append(exc)
            raise

    return call


class _GuardedWriter:
    def __init__(self, writer: Any, owner: GuardedStore):
        self._writer, self._owner = writer, owner

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._writer, attr)
        return self._owner._guard(value) if callable(value) else value
