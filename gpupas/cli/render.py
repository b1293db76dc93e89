"""How the command line shows results: tables, trees and one-line summaries (no library logic here).

User text (names, messages, file names) is always printed as plain text, never as rich markup, and its
control characters (terminal escapes, newlines in a table cell, bidi overrides) as escapes.
Piped or redirected output is never cut to a terminal's width.
"""

from __future__ import annotations

import json
import math
import os
import sys
import unicodedata
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

_JOINERS = {"\u200c", "\u200d"}  # zero-width (non-)joiners: parts of emoji and of some scripts


def plain(text: str, keep: str = "") -> str:
    """``text`` with its control and format characters (but those in ``keep``) written as escapes (``\\x1b``)."""
    if text.isprintable():
        return text
    return "".join(c.encode("unicode_escape").decode() if c not in keep and c not in _JOINERS
                   and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in text)


class OutputGone(BrokenPipeError):
    """The reader of our output went away (``gpupas log | head``): not an error of the command."""


class _Console(Console):
    def on_broken_pipe(self) -> None:  # rich's own: SystemExit(1), the exit code of "not found"
        raise OutputGone("the reader of the output went away")


def _write(file: Any, text: str) -> None:
    """``text`` written and flushed, bypassing rich (scripts' data, JSON); OutputGone where the reader went away."""
    try:
        file.write(text)
        file.flush()
    except BrokenPipeError:
        raise OutputGone("the reader of the output went away") from None


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    wide = None if stream.isatty() or os.environ.get("COLUMNS") else 100_000  # piped: never cut
    return _Console(file=stream, highlight=False, soft_wrap=True, width=wide, emoji=False)


def _finite_only(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_only(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_only(v) for v in obj]
    return obj


class Output:
    """Where results go: stdout (tables, JSON), stderr (progress, warnings, errors)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.out = _console()
        self.err = _console(stderr=True)

    def line(self, text: str) -> None:
        """A result line (suppressed by --quiet where it only confirms what happened)."""
        if not self.quiet:
            self.out.print(Text(plain(text, keep="\n")))

    def data(self, text: str) -> None:
        """A line of requested data (printed even with --quiet; tabs kept, for scripts)."""
        _write(self.out.file, plain(text, keep="\t") + "\n")

    def table(self, t: Table | Tree) -> None:
        self.out.print(t)

    def json(self, obj: Any) -> None:
        """``obj`` as strict JSON (NaN and infinities, which JSON lacks, as null)."""
        try:
            text = json.dumps(obj, indent=1, default=str, allow_nan=False)
        except ValueError:
            text = json.dumps(_finite_only(obj), indent=1, default=str, allow_nan=False)
        _write(sys.stdout, text + "\n")

    def note(self, text: str) -> None:
        """A side note on stderr (counts, hints), suppressed by --quiet."""
        if not self.quiet:
            self.err.print(Text(plain(text, keep="\n")))

    def warn(self, text: str) -> None:
        self.err.print(Text(plain(f"warning: {text}", keep="\n")))

    def error(self, text: str) -> None:
        self.err.print(Text(plain("error: " + " ".join(text.split()))))


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: "1 version", "3 versions"."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def pct(stored: float | None, raw: float | None) -> str:
    return f"{100 * stored / raw:.1f}%" if raw and stored is not None else "-"


def num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def table(columns: Iterable[str], right: Iterable[str] = (), title: str | None = None) -> Table:
    right = set(right)
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left")
    return t


def row(t: Table, *cells: Any, style: str | None = None) -> None:
    """Add a row of plain-text cells (never markup)."""
    t.add_row(*(c if isinstance(c, Text) else Text(plain(str(c))) for c in cells), style=style)


# -- commands' views ----------------------------------------------------------------------------------------------
def version_line(r: dict[str, Any]) -> Text:
    t = Text()
    t.append(f"#{r['id']}", style="bold cyan")
    t.append(f" {plain(r['name'])}")
    if r["tags"]:
        t.append(f" ({plain(', '.join(r['tags']))})", style="bold yellow")
    if r["parents"]:
        t.append(f" ← {', '.join(f'#{p}' for p in r['parents'])}")
    stored, shared = r["stored_bytes"], r.get("shared_bytes")  # shared: with an earlier version (a copy's)
    t.append(f"  {r['n_snapshots']} snap  {size(stored)} ({pct(stored, r['raw_bytes'])}"
             f"{f', {size(shared)} shared' if shared else ''})  {r['created'][:16].replace('T', ' ')}")
    if r.get("lossy"):
        t.append(f"  lossy ({r['lossy']})", style="bold red")
    if r["message"]:
        t.append(f"  {plain(r['message'])}", style="dim")
    return t


def log_tree(rows: list[dict[str, Any]], location: str) -> Tree:
    """Versions as a tree: a straight chain stays at one level, branches indent. Where a version has several
    children, the last one of its own name continues its line at its level (a main line with side branches
    stays at one level however many it has) and the others indent below it."""
    by_id = {r["id"]: r for r in rows}
    kids: dict[int, list[int]] = {}
    roots = []
    for r in rows:
        first = next((p for p in r["parents"] if p in by_id and p < r["id"]), None)
        if first is None:
            roots.append(r["id"])
        else:
            kids.setdefault(first, []).append(r["id"])
    tree = Tree(Text(plain(location), style="bold"))
    todo = [(r, tree) for r in reversed(roots)]  # a loop, not recursion: chains can be long
    while todo:
        vid, container = todo.pop()
        item = container.add(version_line(by_id[vid]))
        ks = kids.get(vid, [])
        same = [k for k in ks if by_id[k]["name"] == by_id[vid]["name"]]
        main = ks[0] if len(ks) == 1 else (same[-1] if same else None)  # the line of work that goes on
        if main is not None:
            todo.append((main, container))
        todo.extend((k, item) for k in reversed(ks) if k != main)  # branches indent (shown first: popped first)
    return tree


MAX_NODES = 25
MAX_SNAPSHOTS = 50  # a version with more: its first 10, last 20 and best snapshot listed (--json: all)
SHOWN_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "num_features",
               "normalized_shape", "num_embeddings", "embedding_dim", "p")


def show(o: Output, d: dict[str, Any], tensors: bool, network: bool) -> None:
    from gpupas.catalog import flatten, last_value

    o.data(f"version {d['id']}  {d['name']}" + (f"  tags: {', '.join(d['tags'])}" if d["tags"] else ""))
    o.data(f"  parents: {', '.join(map(str, d['parents'])) or '-'}   "
           f"children: {', '.join(map(str, d['children'])) or '-'}")
    o.data(f"  author: {d.get('author')}   created: {d['created']}"
           + (f"   updated: {d['updated']}" if "updated" in d else ""))
    if d.get("message"):
        first, *more = d["message"].split("\n")  # each line of it a line (data() escapes a newline)
        o.data(f"  message: {first}")
        for text in more:
            o.data(f"           {text}")
    t = table(("#", "id", "step", "source", "raw", "stored", "%", ""), ("#", "step", "raw", "stored", "%"),
              "snapshots")
    snaps = d["snapshots"]
    shown = set(range(len(snaps))) if len(snaps) <= MAX_SNAPSHOTS else {  # a long run: its ends, and its best
        *range(10), *range(len(snaps) - 20, len(snaps)), *(i for i, s in enumerate(snaps) if s["id"] == d["best"])}
    for i, s in enumerate(snaps):
        if i not in shown:
            if i - 1 in shown:
                n = next((j for j in range(i, len(snaps)) if j in shown), len(snaps)) - i
                row(t, "", f"... {n} more (show --json lists all)", "", "", "", "", "", "")
            continue
        marks = " ".join([m for m, sid in (("latest", d["latest"]), ("best", d["best"])) if sid == s["id"]]
                         + ([f"lossy ({s['lossy']})"] if s.get("lossy") else []))
        row(t, i + 1, s["id"], num(s.get("step")), s.get("source") or "", size(s["raw_bytes"]),
            size(s["stored_bytes"]), pct(s["stored_bytes"], s["raw_bytes"]), marks)
    o.table(t)
    if d["hyperparameters"]:
        t = table(("key", "value"), title="hyperparameters")
        for k, v in flatten(d["hyperparameters"]).items():
            row(t, k, json.dumps(v, ensure_ascii=False))  # é as é; row() escapes controls
        o.table(t)
    if d["metrics"]:
        t = table(("name", "points", "first step", "last step", "last", "min", "max"),
                  ("points", "first step", "last step", "last", "min", "max"), "metrics")
        for k, series in d["metrics"].items():  # last: at the highest step, as query and diff take it
            vals = [v for _, v in series if v is not None]
            steps = [num(min(p[0] for p in series)), num(max(p[0] for p in series))] if series else ["-", "-"]
            extremes = [num(min(vals)), num(max(vals))] if vals else ["-", "-"]
            row(t, k, len(series), *steps, num(last_value(series)), *extremes)
        o.table(t)
    if d["files"]:
        t = table(("name", "size", "sha256"), ("size",), "files")
        for k, f in d["files"].items():
            row(t, k, size(f["size"]), f["sha256"][:16])
        o.table(t)
    net = d.get("network") or {}
    nodes = net.get("nodes", [])
    types: dict[str, int] = {}
    for n in nodes:
        types[n["type"]] = types.get(n["type"], 0) + 1
    o.data(f"network: {len(nodes)} nodes, {len(net.get('edges', []))} edges (from {net.get('source', 'none')}): "
           + " ".join(f"{t}×{c}" if c > 1 else t for t, c in sorted(types.items(), key=lambda x: -x[1])))
    if nodes and (network or len(nodes) <= MAX_NODES):
        names = {n["id"]: n["name"] for n in nodes}
        nxt: dict[int, list[str]] = {}
        for a, b in net.get("edges", []):
            nxt.setdefault(a, []).append(names.get(b, "?"))
        t = table(("node", "type", "next", "attributes"))
        for n in nodes:
            attrs = {k: v for k, v in n.get("attrs", {}).items() if k in SHOWN_ATTRS}
            row(t, n["name"], n["type"], ", ".join(nxt.get(n["id"], [])),
                " ".join(f"{k}={json.dumps(v, separators=(',', ':'), ensure_ascii=False)}" for k, v in attrs.items()))
        o.table(t)
    if d.get("snapshot"):
        s = d["snapshot"]
        o.data(f"storage per layer, snapshot {s['index']} ({s['id']}, delta base {s['base'] or 'none'}):")
        t = table(("layer", "type", "tensors", "params", "raw", "stored", "%", "encoding"),
                  ("tensors", "params", "raw", "stored", "%"))
        for r in d["layers"]:
            row(t, r["layer"], r["type"], r["tensors"], f"{r['params']:,}", size(r["raw_bytes"]),
                size(r["stored_bytes"]), pct(r["stored_bytes"], r["raw_bytes"]),
                " ".join(f"{k}×{n}" if n > 1 else k for k, n in r["enc"].items()))
        raw = sum(r["raw_bytes"] for r in d["layers"])
        stored = sum(r["stored_bytes"] for r in d["layers"])
        count, params = sum(r["tensors"] for r in d["layers"]), sum(r["params"] for r in d["layers"])
        row(t, "total", "", count, f"{params:,}", size(raw), size(stored), pct(stored, raw), "", style="bold")
        o.table(t)
        if tensors:
            t = table(("name", "dtype", "shape", "enc", "raw", "stored", "%", "per plane"), ("raw", "stored", "%"),
                      "tensors")
            for r in d["tensors"]:
                row(t, r["name"], r["dtype"], "x".join(map(str, r["shape"])),
                    r["enc"] + ("+ctx" if r["ctx"] else "") + (f" lossy {r['lossy']}" if r.get("lossy") else ""),
                    size(r["nbytes"]), size(r["stored"]), pct(r["stored"], r["nbytes"]),
                    " ".join(size(x) for x in r["planes"]))
            o.table(t)


def _retyped(r: dict[str, Any]) -> bool:
    """A diff row of a tensor whose shape or dtype changed: ``shape`` is [old, new] (a 0-d tensor's is [])."""
    return bool(r["shape"]) and isinstance(r["shape"][0], list)


def diff(o: Output, d: dict[str, Any], top: int) -> None:
    o.data(f"diff version {d['a']['id']} ({d['a']['name']}) -> version {d['b']['id']} ({d['b']['name']})")
    n = d["network"]
    if any(n.values()):
        o.data(f"network: +{len(n['added'])} layers, -{len(n['removed'])} layers, {len(n['changed'])} changed, "
               f"+{len(n['edges_added'])}/-{len(n['edges_removed'])} edges")
        for x in n["added"]:
            o.data(f"  + {x['name']} ({x['type']})")
        for x in n["removed"]:
            o.data(f"  - {x['name']} ({x['type']})")
        for x in n["changed"]:  # a type that changed is [old, new]
            kind = " -> ".join(x["type"]) if isinstance(x["type"], list) else x["type"]
            attrs = ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in x["attrs"].items())
            o.data(f"  ~ {x['name']} {kind}" + (f": {attrs}" if attrs else ""))
    else:
        o.data("network: same")
    if d["hyperparameters"]:
        t = table(("key", "a", "b"), title="hyperparameters")
        absent = d.get("hyperparameters_absent", {})
        for k, (x, y) in d["hyperparameters"].items():
            gone = absent.get(k, [False, False])  # "-": no such key (null: the value None)
            row(t, k, *("-" if g else json.dumps(z, ensure_ascii=False) for g, z in zip(gone, (x, y))))
        o.table(t)
    else:
        o.data("hyperparameters: same")
    if d["metrics"]:
        t = table(("metric", "a", "b"), ("a", "b"), "metrics (last value)")
        for k, (x, y) in d["metrics"].items():
            row(t, k, num(x), num(y))
        o.table(t)
    for k, (x, y) in d["files"].items():
        o.data(f"file {k}: {(x or '-')[:12]} -> {(y or '-')[:12]}")
    w = d.get("weights")
    if d.get("weights_not_compared"):
        o.data(f"weights: not compared (no snapshots in version {', '.join(map(str, d['weights_not_compared']))})")
    if not w:
        return
    # most changed first; a float tensor that was all zero and changed (rel_l2 None) has no bound: first of all
    rows = sorted(w["tensors"], key=lambda r: -(r.get("rel_l2") or (math.inf if "rel_l2" in r and r["changed"]
                                                                     else 0.0)))
    unlike = sum(1 for r in rows if _retyped(r))
    measured = any("rel_l2" in r for r in rows if not _retyped(r))  # else no L2 change was measured: not "0"
    l2 = ("-" if not measured else f"{w['rel_l2']:.4g}" if w["rel_l2"] is not None
          else "- (the first version's weights are all zero)")
    o.data(f"weights: {len(rows)} common tensors, {w['identical']} identical"
           + (f", {unlike} of another shape or dtype (not compared)" if unlike else "")
           + f", overall relative L2 change {l2}; most changed first:")
    t = table(("tensor", "shape", "changed", "max |Δ|", "mean |Δ|", "rel L2"), ("changed", "max |Δ|", "mean |Δ|",
                                                                              "rel L2"))
    for r in rows[: top or None]:
        if _retyped(r):  # shape and dtype [old, new]: both shown, whichever changed
            was, now = (f"{d} {'x'.join(map(str, sh)) or 'scalar'}" for d, sh in zip(r["dtype"], r["shape"]))
            row(t, r["name"], f"{was} -> {now}", "-", "-", "-", "-")
            continue
        row(t, r["name"], "x".join(map(str, r["shape"])) or "scalar", f"{100 * r['changed']:.1f}%"
            + (f" ({r['not_finite']:,} Inf/NaN)" if r.get("not_finite") else ""),
            num(r.get("max_abs")), num(r.get("mean_abs")), num(r.get("rel_l2")))
    o.table(t)
    if any(r.get("not_finite") for r in rows[: top or None]):
        o.data("  (Inf/NaN: changed values that are or were Inf or NaN; |Δ| and rel L2 leave them out)")
    for sign, names in (("+", w["added"]), ("-", w["removed"])):
        for k in names[: top or None]:
            o.data(f"  {sign} tensor {k}")
        if top and len(names) > top:
            o.data(f"  ... and {len(names) - top} more {'added' if sign == '+' else 'removed'} (--top 0 lists all)")


def query(o: Output, rows: list[dict[str, Any]]) -> None:
    t = table(("id", "name", "parents", "snapshots", "stored", "created", "message"), ("id", "snapshots", "stored"))
    for r in rows:
        row(t, r["id"], r["name"], ", ".join(map(str, r["parents"])) or "-", r["n_snapshots"], size(r["stored_bytes"]),
            r["created"][:19].replace("T", " "), r["message"] or "")
    o.table(t)
    o.note(f"{len(rows)} version(s)")


def stats(o: Output, s: dict[str, Any]) -> None:
    o.data(f"archive {s['location']}: {count(s['versions'], 'version')} ({count(s['names'], 'name')}, "
           f"{count(s['tags'], 'tag')}), {count(s['snapshots'], 'snapshot')}, {count(s['tensors'], 'tensor')}")
    o.data(f"weights: {size(s['raw_bytes'])} raw -> {size(s['stored_bytes'])} stored "
           f"({pct(s['stored_bytes'], s['raw_bytes'])}), saves {size(s['saved_bytes'])}")
    o.data("encodings: mat = stored whole, sub/xor = delta to the base snapshot, pred = delta to an extrapolation")
    for key, col in (("by_encoding", "enc"), ("by_dtype", "dtype")):
        t = table((col, "tensors", "raw", "stored", "%"), ("tensors", "raw", "stored", "%"))
        for r in s[key]:
            row(t, r[col], r["tensors"], size(r["raw_bytes"]), size(r["stored_bytes"]),
                pct(r["stored_bytes"], r["raw_bytes"]))
        o.table(t)
    f = s["files"]
    o.data(f"files: {f['references']} references to {f['blobs']} stored blobs, {size(f['logical_bytes'])} -> "
           f"{size(f['stored_bytes'])} (deduplication saves {size(f['saved_bytes'])})")
    if s["unreferenced_snapshots"] or s["incomplete_snapshots"]:
        o.data(f"not part of any version: {len(s['unreferenced_snapshots'])} complete snapshot(s), "
               f"{size(s['unreferenced_bytes'])} (committed with the Archive API, dropped from a version, or left by a "
               f"killed commit) and {len(s['incomplete_snapshots'])} folder(s) no snapshot names, "
               f"{size(s['incomplete_bytes'])} (interrupted commits, old forms of revised snapshots), tiers included; "
               "`gpupas gc` removes what no version and no kept snapshot needs (`gpupas verify` notes dropped "
               "snapshots and what keeps them)")
    o.data(f"on disk: {size(s['disk_bytes'])} in the archive's own folder (chunks, manifests, records, files, "
           "catalog; not what its tiers hold)")
    if s["unreadable_snapshots"]:
        o.warn(f"{len(s['unreadable_snapshots'])} snapshot(s) whose manifest cannot be read are left out of these "
               f"totals (first: {s['unreadable_snapshots'][0]}); `gpupas verify` says why, gc keeps their data")
