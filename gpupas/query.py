"""DQL's ``select``: versions chosen by name, time, lineage, hyperparameters, metrics and network shape.

A hand-written tokenizer and recursive-descent parser turn one statement into one
parameterized SQL query over the catalog (never ``eval``, never string-pasted values)::

    select m where m.name like "cnn_%" and m.created > "2026-01-01"
        and m.hp.lr < 0.01 and m.metric.accuracy >= 0.9
        and m["conv[1-3]"].next has POOL("MAX")
        order by m.created desc limit 10

Grammar (keywords in any case)::

    query     := SELECT var [WHERE expr] [ORDER BY field [ASC|DESC]] [LIMIT int]
    expr      := term (OR term)* ;  term := factor (AND factor)* ;  factor := NOT factor | '(' expr ')' | pred
    pred      := field op literal | field [NOT] LIKE string [ESCAPE string]
               | var ['[' string ']'] [.next | .prev] HAS template | var '[' string ']'
    field     := var.id | var.name | var.created | var.author | var.message | var.snapshots | var.layers
               | var.raw_bytes | var.stored_bytes | var.parent | var.tag
               | var.hp.KEY[.KEY...] | var.hp[string]               (hyperparameters; nested keys dotted)
               | var.metric.NAME[.last|.min|.max|.count] | var.metric[string][...]   (default: last value;
                                                               var.metric["grad.max"]: the metric named grad.max)
    op        := = | == | != | <> | < | <= | > | >=
    template  := NAME ['(' [string] ')']   e.g. POOL("MAX"), CONV, RELU, FC, NORM("batch"), TYPE("MaxPool2d")

``var["re"]`` selects the layers whose name matches the regular expression as a whole;
``.next`` follows the data flow to the following layers, also through activations and dropout (``conv1 -> relu ->
max_pool``: conv1's next layers are the relu and the max pooling); ``.prev`` goes the other way. ``LIKE`` is SQL's
(``%`` any run, ``_`` any one character; case counts; ``ESCAPE "!"`` makes ``!%``, ``!_`` and ``!!`` plain
characters). A hyperparameter matches a literal of its own type only (``true`` is not 1, ``"1"`` is not 1; ``null``
finds None); ``m.created`` takes dates and times as `gpupas log` shows them (UTC). A metric's last value is the one
at its highest step (not a number where that was NaN); ``.count`` counts every point. ``m.parent != 1`` and
``m.tag != "x"`` ask for *some* parent or tag other than that one (``not m.parent = 1``: none is). ``m.id``,
``m.snapshots``, ``m.layers``, ``m.raw_bytes``, ``m.stored_bytes`` and ``m.parent`` compare with numbers, the other
fixed fields with quoted strings (LIKE: only they and m.hp.KEY): anything else is refused, naming the field;
``m.stored_bytes`` is what the snapshots' manifests say now (after a compaction or tier move too, as `gpupas log`
shows it). ``ORDER BY`` takes any field but ``parent`` and ``tag``; versions without the hyperparameter or metric
come last either way, and a hyperparameter's numbers sort below its strings.
NOT and parentheses nest 40 levels deep at most; a statement past SQLite's limits is refused as input.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gpupas.catalog import STORED_NOW, Catalog
from gpupas.errors import InvalidInputError
from gpupas.network import _ACTIVATIONS

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<num>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>==|!=|<>|<=|>=|[=<>()\[\].,])
""", re.VERBOSE)
_KEYWORDS = {"select", "where", "and", "or", "not", "like", "has", "order", "by", "asc", "desc", "limit",
             "true", "false", "null"}
_COLUMNS = {"id": "id", "name": "name", "created": "created", "author": "author", "message": "message",
            "snapshots": "n_snapshots", "layers": "n_layers", "raw_bytes": "raw_bytes", "stored_bytes": "stored_bytes",
            "latest": "latest", "best": "best"}
_NUMERIC = {"id", "snapshots", "layers", "raw_bytes", "stored_bytes", "parent"}  # fixed fields that are numbers
_TEXT = {"name", "created", "author", "message", "latest", "best", "tag"}  # and those that are text
_OPS = {"=": "=", "==": "=", "!=": "!=", "<>": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_AGGS = {"last", "min", "max", "count"}
_KINDS = {"conv", "pool", "linear", "norm", "act", "dropout", "embedding", "attention", "reshape", "io", "op",
          "other"}
_KIND_ALIASES = {"fc": "linear", "dense": "linear", "innerproduct": "linear", "batchnorm": ("norm", "batch"),
                 "layernorm": ("norm", "layer"), "activation": "act", "input": ("io", "input"),
                 "output": ("io", "output")}
MAX_NESTING = 40  # NOTs and parentheses inside one another; SQLite's parser stops at about 90 levels
_NOW = {"stored_bytes": STORED_NOW.format(v="v")}  # fields whose value is not the version record's


def _column(field: str) -> str:
    """The SQL value of fixed field ``field`` of version ``v``."""
    return _NOW.get(field, f"v.{_COLUMNS[field]}")


RESULT_COLUMNS = ("id, name, created, author, message, n_snapshots, raw_bytes, "
                  f"{_NOW['stored_bytes']} AS stored_bytes, latest, best")


@dataclass
class Token:
    kind: str  # str, num, name, kw, op, end
    value: Any
    pos: int
    raw: str = ""  # a number's text


def tokenize(text: str) -> list[Token]:
    """Tokens of a DQL statement; InvalidInputError points at the first character it cannot read."""
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            what = (f"the string opened at position {pos} is not closed: end it with {text[pos]}"
                    if text[pos] in "\"'" else f"cannot read {text[pos:pos + 12]!r} at position {pos}")
            raise InvalidInputError(f"DQL: {what}; see `gpupas query --help`")
        kind = m.lastgroup or ""
        raw = m.group()
        if kind == "str":
            out.append(Token("str", re.sub(r"\\(.)", r"\1", raw[1:-1]), pos))
        elif kind == "num":
            # float() of the text, not of the int: past a double's range it is inf (as 1e400 is), where float(int)
            # raises OverflowError; past 4300 digits int() refuses the text (ValueError)
            value = float(raw) if any(c in raw for c in ".eE") or len(raw) > 4000 else int(raw)
            if isinstance(value, int) and not -(2**63) <= value < 2**63:  # SQLite's integers
                value = float(raw)  # compared as a number still; LIMIT refuses it below
            out.append(Token("num", value, pos, raw))
        elif kind == "name":
            low = raw.lower()
            out.append(Token("kw", low, pos) if low in _KEYWORDS else Token("name", raw, pos))
        elif kind == "op":
            out.append(Token("op", raw, pos))
        pos = m.end()
    out.append(Token("end", None, len(text)))
    return out


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = tokenize(text)
        self.i = 0
        self.params: list[Any] = []
        self.var = ""
        self.depth = 0

    # -- token helpers -------------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.toks[self.i]

    def fail(self, what: str, tok: Token | None = None) -> InvalidInputError:
        t = tok or self.tok
        near = self.text[t.pos:t.pos + 20] or "the end"
        return InvalidInputError(f"DQL: {what} at position {t.pos} (near {near!r}); see `gpupas query --help`")

    def accept(self, kind: str, value: Any = None) -> Token | None:
        t = self.tok
        if t.kind == kind and (value is None or t.value == value):
            self.i += 1
            return t
        return None

    def expect(self, kind: str, value: Any = None, what: str = "") -> Token:
        t = self.accept(kind, value)
        if t is None:
            raise self.fail(f"expected {what or value or kind}")
        return t

    def lookahead_is(self, kind: str, value: Any = None, k: int = 0) -> bool:
        t = self.toks[min(self.i + k, len(self.toks) - 1)]
        return t.kind == kind and (value is None or t.value == value)

    # -- grammar -------------------------------------------------------------------------
    def query(self) -> tuple[str, list[Any]]:
        self.expect("kw", "select")
        self.var = str(self.expect("name", what="a variable name after select").value)
        where = "1"
        if self.accept("kw", "where"):
            where = self.expr()
        order = "id"
        if self.accept("kw", "order"):
            self.expect("kw", "by")
            at = len(self.params)
            col = self.order_field()
            self.params += self.params[at:]  # the value appears twice below
            direction = "DESC" if self.accept("kw", "desc") else "ASC"
            self.accept("kw", "asc")
            order = f"{col} IS NULL, {col} {direction}, id"  # versions without the value last, either way
        limit = ""
        if self.accept("kw", "limit"):
            n = self.expect("num", what="a row count")
            if not isinstance(n.value, int) or n.value < 0:
                raise self.fail("LIMIT takes a whole number", n)
            limit = f" LIMIT {n.value}"
        if self.tok.kind != "end":
            raise self.fail("unexpected text")
        return f"SELECT {RESULT_COLUMNS} FROM versions v WHERE {where} ORDER BY {order}{limit}", self.params

    def expr(self) -> str:
        parts = [self.term()]
        while self.accept("kw", "or"):
            parts.append(self.term())
        return _joined(parts, "OR")

    def term(self) -> str:
        parts = [self.factor()]
        while self.accept("kw", "and"):
            parts.append(self.factor())
        return _joined(parts, "AND")

    def factor(self) -> str:
        t = self.tok
        if not self.lookahead_is("kw", "not") and not self.lookahead_is("op", "("):
            return self.predicate()
        if self.depth >= MAX_NESTING:  # else RecursionError here, or SQLite's "parser stack overflow"
            raise self.fail(f"NOT and parentheses nest deeper than {MAX_NESTING} levels", t)
        self.depth += 1
        try:
            if self.accept("kw", "not"):
                return f"NOT {self.factor()}"
            self.expect("op", "(")
            e = self.expr()
            self.expect("op", ")")
            return f"({e})"
        finally:
            self.depth -= 1

    def var_name(self) -> None:
        t = self.expect("name", what=f"{self.var!r} (the selected variable)")
        if t.value != self.var:
            raise self.fail(f"unknown variable {t.value!r}; the statement selects {self.var!r}", t)

    def predicate(self) -> str:
        start = self.tok
        self.var_name()
        if self.accept("op", "["):  # a layer selector
            pattern = str(self.expect("str", what="a quoted layer name pattern").value)
            self.expect("op", "]")
            try:
                re.compile(pattern)
            except (re.error, OverflowError, ValueError, RecursionError) as exc:  # a{9999999999}, (?a)(?u), ((((...
                raise self.fail(f"bad layer pattern {pattern!r:.80} ({exc})", start) from None
            direction = None
            if self.lookahead_is("op", ".") and self.lookahead_is("name", k=1):
                self.i += 1
                d = self.expect("name").value.lower()
                if d not in ("next", "prev"):
                    raise self.fail(f"a layer selector has .next or .prev, not .{d}", self.toks[self.i - 1])
                direction = d
            if not self.accept("kw", "has"):
                if direction:
                    raise self.fail(f"expected HAS after .{direction}")
                self.params.append(pattern)
                return "EXISTS (SELECT 1 FROM layers a WHERE a.version=v.id AND a.name REGEXP ?)"
            return self.has(pattern, direction)
        if self.accept("kw", "has"):
            return self.has(None, None)
        self.expect("op", ".", "'.' and a field")
        return self.comparison()

    def template(self) -> tuple[str, list[Any]]:
        t = self.expect("name", what='a layer template such as POOL("MAX")')
        name = str(t.value).lower()
        arg = None
        if self.accept("op", "("):
            if not self.accept("op", ")"):
                a = self.expect("str", what="a quoted template argument")
                arg = str(a.value)
                self.expect("op", ")")
        if name == "type":
            if arg is None:
                raise self.fail('TYPE needs a type name, as in TYPE("MaxPool2d")', t)
            return "lower(b.type)=?", [arg.lower()]
        alias = _KIND_ALIASES.get(name, name)
        if isinstance(alias, tuple):
            kind, variant = alias
            return "b.kind=? AND b.variant=?", [kind, variant]
        if alias in _KINDS:
            if arg is None:
                return "b.kind=?", [alias]
            return "b.kind=? AND b.variant=?", [alias, arg.lower().replace("_", "")]
        if name in _ACTIVATIONS:
            return "b.kind='act' AND b.variant=?", [name.replace("_", "")]
        raise self.fail(f"unknown layer template {t.value!r}; use one of "
                        f"{', '.join(sorted(k.upper() for k in _KINDS | set(_KIND_ALIASES)))}, RELU..., TYPE(\"...\")",
                        t)

    def has(self, pattern: str | None, direction: str | None) -> str:
        cond, args = self.template()
        if pattern is None:
            self.params.extend(args)
            return f"EXISTS (SELECT 1 FROM layers b WHERE b.version=v.id AND {cond})"
        if direction is None:
            self.params.extend([pattern, *args])
            return (f"EXISTS (SELECT 1 FROM layers b WHERE b.version=v.id AND b.name REGEXP ? AND {cond})")
        src, dst = ("src", "dst") if direction == "next" else ("dst", "src")
        self.params.extend([pattern, *args])
        return ("EXISTS (SELECT 1 FROM layers a JOIN flow f ON f.version=a.version AND f." + src + "=a.node "
                "JOIN layers b ON b.version=f.version AND b.node=f." + dst + " "
                f"WHERE a.version=v.id AND a.name REGEXP ? AND {cond})")

    def dotted(self) -> str:
        """KEY(.KEY)* or ["key"](.KEY)* after hp/metric."""
        return ".".join(self.key_parts())

    def key_parts(self) -> list[str]:
        """The parts of :meth:`dotted`: a quoted ``["key"]`` is one part, dots and all."""
        if self.accept("op", "["):
            key = str(self.expect("str", what="a quoted key").value)
            self.expect("op", "]")
            parts = [key]
        else:
            self.expect("op", ".", "'.' and a key")
            parts = [str((self.accept("kw") or self.expect("name", what="a key")).value)]  # m.hp.order: a key
        while self.lookahead_is("op", ".") and (self.lookahead_is("name", k=1) or self.lookahead_is("kw", k=1)):
            self.i += 1
            parts.append(str(self.tok.value))
            self.i += 1
        return parts

    def order_field(self) -> str:
        """The SQL value ORDER BY sorts on: a column, a hyperparameter (numbers and booleans by value, then
        strings) or a metric summary; NULL where a version lacks it."""
        self.var_name()
        self.expect("op", ".", "'.' and a field")
        t = self.expect("name", what="a field")
        if t.value == "hp":
            self.params.append(self.dotted())
            return ("(SELECT CASE WHEN h.type IN ('num', 'bool') THEN h.num WHEN h.type='str' THEN h.text END "
                    "FROM hparams h WHERE h.version=v.id AND h.key=?)")
        if t.value == "metric":
            name, col = self.metric_key()
            self.params.append(name)
            return f'(SELECT s."{col}" FROM metric_summary s WHERE s.version=v.id AND s.name=?)'
        if t.value not in _COLUMNS:
            raise self.fail(f"cannot order by {t.value!r}; use one of {', '.join(_COLUMNS)}, hp.KEY or "
                            "metric.NAME", t)
        return _column(t.value)

    def metric_key(self) -> tuple[str, str]:
        """A metric's name and its metric_summary column, after ``metric``: NAME[.last|.min|.max|.count]
        (``["grad.max"]`` names the metric grad.max, its last value; ``.max`` after it, its highest)."""
        parts = self.key_parts()
        agg = parts.pop() if len(parts) > 1 and parts[-1] in _AGGS else "last"
        return ".".join(parts), "n" if agg == "count" else agg

    def literal(self, null: bool = False) -> Any:
        """A number, a quoted string, true or false (and ``null`` where ``null``: None)."""
        t = self.tok
        if t.kind in ("str", "num"):
            self.i += 1
            return t.value
        if t.kind == "kw" and t.value in ("true", "false"):
            self.i += 1
            return t.value == "true"
        if null and t.kind == "kw" and t.value == "null":
            self.i += 1
            return None
        raise self.fail("expected a value (a number or a quoted string" + (", true, false or null)" if null else ")"))

    def operator(self) -> tuple[str, bool]:
        if self.accept("kw", "not"):
            self.expect("kw", "like")
            return "NOT LIKE", True
        if self.accept("kw", "like"):
            return "LIKE", True
        t = self.expect("op", what="a comparison (=, !=, <, <=, >, >=, like)")
        if t.value not in _OPS:
            raise self.fail(f"expected a comparison, not {t.value!r}", t)
        return _OPS[t.value], False

    def escape(self, like: bool) -> str:
        """After a LIKE pattern: ``ESCAPE "c"`` (one character; not a keyword elsewhere) as SQL and its parameter,
        else ''."""
        t = self.tok
        if not like or t.kind != "name" or str(t.value).lower() != "escape":
            return ""
        self.i += 1
        at = self.tok
        val = self.literal()
        if not isinstance(val, str) or len(val) != 1:
            raise self.fail('ESCAPE takes one quoted character, as in m.name like "a!_%" escape "!"', at)
        self.params.append(val)
        return " ESCAPE ?"

    def comparison(self) -> str:
        t = self.expect("name", what="a field (name, created, hp..., metric..., parent, tag...)")
        field = str(t.value)
        if field == "hp":  # a literal matches values of its own type: true is not 1, "1" is not 1
            key = self.dotted()
            op, like = self.operator()
            lit = self.tok
            val = self.literal(null=True)
            if like and not isinstance(val, str):
                raise self.fail("LIKE needs a quoted pattern")
            found = "EXISTS (SELECT 1 FROM hparams h WHERE h.version=v.id AND h.key=? AND "
            if val is None:
                if op not in ("=", "!="):
                    raise self.fail("null compares with = or != only")
                self.params.append(key)
                return found + f"h.type {op} 'null')"
            if isinstance(val, bool) and op not in ("=", "!="):
                raise self.fail("true and false compare with = or != only")
            if isinstance(val, (int, float)) and not isinstance(val, bool):  # exactly: 2**53 + 1 is not 2**53,
                if isinstance(val, float) and re.fullmatch(r"-?\d+", lit.raw):  # nor 10**18 other than 1e18, as
                    val = lit.raw  # doubles would have it; an integer past SQLite's: its digits, not a double
                self.params.extend([key, val])
                return found + f"h.type='num' AND numcmp(h.text, ?) {op} 0)"
            self.params.extend([key, val if isinstance(val, str) else float(val)])
            kind, col = ("str", "text") if isinstance(val, str) else ("bool", "num")
            return found + f"h.type='{kind}' AND h.{col} {op} ?{self.escape(like)})"
        if field == "metric":
            name, col = self.metric_key()
            op, like = self.operator()
            val = self.literal()
            if like or isinstance(val, (str, bool)):
                raise self.fail("metrics compare with numbers")
            self.params.extend([name, val])
            return (f'EXISTS (SELECT 1 FROM metric_summary s WHERE s.version=v.id AND s.name=? AND s."{col}" {op} ?)')
        if field in ("parent", "tag"):
            op, like = self.operator()
            val = self.column_literal(field, like, t)
            self.params.append(val)
            if field == "parent":
                return f"EXISTS (SELECT 1 FROM parents p WHERE p.version=v.id AND p.parent {op} ?)"
            return f"EXISTS (SELECT 1 FROM tags t WHERE t.version=v.id AND t.tag {op} ?{self.escape(like)})"
        if field not in _COLUMNS:
            raise self.fail(f"unknown field {field!r}; use {', '.join([*_COLUMNS, 'parent', 'tag', 'hp', 'metric'])}",
                            t)
        op, like = self.operator()
        val = self.column_literal(field, like, t)
        if field == "created" and not like:
            val = self.instant(val)
        self.params.append(val)
        return f"{_column(field)} {op} ?{self.escape(like)}"

    def column_literal(self, field: str, like: bool, at: Token) -> Any:
        """The literal after a fixed field's operator, of the field's type (an id, a count, a size: a number;
        the rest: a quoted string), else InvalidInputError naming the field: SQLite would convert "1" to 1
        for m.parent and match nothing for m.name = 1."""
        val = self.literal()
        numeric = field in _NUMERIC
        if like and numeric:
            raise self.fail(f"m.{field} is a number: LIKE matches text fields ({', '.join(sorted(_TEXT))}, hp) "
                            "with a quoted pattern; compare numbers with =, !=, <, <=, >, >=", at)
        if like and not isinstance(val, str):
            raise self.fail(f'LIKE needs a quoted pattern, as in m.{field} like "a%"', at)
        if isinstance(val, bool) or isinstance(val, str) == numeric:
            raise self.fail(f"m.{field} compares with {'numbers' if numeric else 'quoted strings'}, not {val!r}",
                            at)
        return val

    def instant(self, val: Any) -> str:
        """A time literal as gpupas writes times (``datetime.isoformat`` in UTC: microseconds where not 0), so
        that text order is time order: "2026-12-06", "2026-12-06 12:00" (as `gpupas log` shows them; UTC),
        with an offset too."""
        try:
            t = datetime.fromisoformat(val) if isinstance(val, str) else None
        except ValueError:
            t = None
        if t is None:
            raise self.fail(f"m.created compares with a date or time such as \"2026-12-06\" or \"2026-12-06 12:00\", "
                            f"not {val!r}")
        return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


def _joined(parts: list[str], op: str) -> str:
    """``parts`` joined by AND or OR as a balanced tree: SQLite refuses an expression deeper than 1000
    ("Expression tree is too large"), which a flat chain of a thousand conditions is."""
    if len(parts) == 1:
        return parts[0]
    half = len(parts) // 2
    return f"({_joined(parts[:half], op)} {op} {_joined(parts[half:], op)})"


def compile_query(text: str) -> tuple[str, list[Any]]:
    """The SQL (with ``?`` parameters) that a DQL ``select`` statement runs on the catalog.

    >>> sql, params = compile_query('select m where m.hp.lr < 0.01')
    >>> params
    ['lr', 0.01]
    """
    if not isinstance(text, str) or not text.strip():
        what = "empty statement" if isinstance(text, str) else f"a statement is text, not {type(text).__name__}"
        raise InvalidInputError(f'DQL: {what}; write e.g. select m where m.name like "cnn%"')
    return _Parser(text).query()


def run_query(catalog: Catalog, text: str) -> list[dict[str, Any]]:
    """The versions a DQL ``select`` statement picks, as dicts (id, name, created, ... parents)."""
    sql, params = compile_query(text)
    try:
        rows = [dict(r) for r in catalog.query(sql, params)]
    except sqlite3.OperationalError as exc:  # past SQLite's limits: its parser stack, 32766 values
        if not re.search(r"too large|too many|stack overflow", str(exc)):
            raise
        raise InvalidInputError(f"DQL: the statement is too large for the catalog ({exc}); split it into "
                                "smaller ones") from None
    parents: dict[int, list[int]] = {}
    for p in catalog.query("SELECT version, parent FROM parents ORDER BY version, pos"):
        parents.setdefault(p["version"], []).append(p["parent"])
    for r in rows:
        r["parents"] = parents.get(r["id"], [])
    return rows
