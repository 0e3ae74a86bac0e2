"""Pass spellings: ``name{key=value,...}`` (CLI, recipes) and JSON/YAML recipes.

Grammar: ``name`` or ``name{k=v,k=v}``; a value is a bare word (``4``, ``true``, ``lm_head``), a
quoted string (``"a,b"``), or a list ``[v,v]``. Values are converted to the option's declared type
(int, float, bool, str, Optional[...], tuple[str, ...]); unknown options and bad values raise
:class:`PassOptionError` naming the pass and the option.

A recipe file (``.yaml``/``.yml``/``.json``) is a list whose items are spellings (strings) or
mappings ``{name: rtn, bits: 4}`` / ``{rtn: {bits: 4}}``; a mapping with a ``passes`` key holding
such a list is accepted too. A search recipe (``kind: lowc-search-recipe``, written by ``lowc search``,
:mod:`lowc.passes.search.recipe`) becomes its method pass with per-layer bits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from typing import Any, Callable

import yaml

from lowc.errors import PassOptionError
from lowc.passes.registry import get_pass_class
from lowc.passes.search.recipe import Recipe, is_search_recipe

#: a pass registry: ``lookup(name) -> pass class`` (raises PassOptionError for an unknown name)
Lookup = Callable[[str], type]

_NAME = re.compile(r"[A-Za-z][\w-]*")


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if v is None:
        return "none"
    s = str(v)
    return json.dumps(s) if re.search(r"[\s,{}\[\]=\"]", s) or s == "" else s


def _parse_value(s: str, i: int, spelling: str) -> tuple[Any, int]:
    while i < len(s) and s[i] == " ":
        i += 1
    if i < len(s) and s[i] == "[":
        items, i = [], i + 1
        while True:
            while i < len(s) and s[i] == " ":
                i += 1
            if i < len(s) and s[i] == "]":
                return items, i + 1
            v, i = _parse_value(s, i, spelling)
            items.append(v)
            while i < len(s) and s[i] == " ":
                i += 1
            if i < len(s) and s[i] == ",":
                i += 1
            elif i < len(s) and s[i] == "]":
                return items, i + 1
            else:
                raise PassOptionError(f"bad pass spelling {spelling!r}: unterminated list")
    if i < len(s) and s[i] in "\"'":
        q = s[i]
        j = s.find(q, i + 1)
        if j < 0:
            raise PassOptionError(f"bad pass spelling {spelling!r}: unterminated string")
        return s[i + 1 : j], j + 1
    j = i
    while j < len(s) and s[j] not in ",}]":
        j += 1
    return s[i:j].strip(), j


def parse_spelling(spelling: str) -> tuple[str, dict[str, Any]]:
    """``'rtn{bits=4,ignore=[lm_head]}'`` -> ``('rtn', {'bits': '4', 'ignore': ['lm_head']})``."""
    s = spelling.strip()
    m = _NAME.match(s)
    if not m:
        raise PassOptionError(f"bad pass spelling {spelling!r}: expected name or name{{key=value,...}}")
    name, i = m.group(0), m.end()
    opts: dict[str, Any] = {}
    if i == len(s):
        return name, opts
    while s[i] == " ":  # 'rtn {bits=4}'
        i += 1
    if s[i] != "{" or not s.endswith("}"):
        raise PassOptionError(f"bad pass spelling {spelling!r}: expected name or name{{key=value,...}}")
    i += 1
    while i < len(s) - 1:
        while s[i] in " ,":
            i += 1
        km = _NAME.match(s, i)
        eq = km.end() if km else i
        while eq < len(s) and s[eq] == " ":  # 'bits = 4'
            eq += 1
        if not km or eq >= len(s) or s[eq] != "=":
            raise PassOptionError(f"bad pass spelling {spelling!r}: expected key=value at position {i}")
        key = km.group(0)
        v, i = _parse_value(s, eq + 1, spelling)
        if key in opts:
            raise PassOptionError(f"bad pass spelling {spelling!r}: option {key!r} given twice")
        opts[key] = v
        while i < len(s) - 1 and s[i] == " ":
            i += 1
        if i < len(s) - 1 and s[i] != ",":
            raise PassOptionError(f"bad pass spelling {spelling!r}: expected ',' at position {i}")
    return name, opts


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        errors = []
        for a in args:
            try:
                return _coerce(value, a, where)
            except PassOptionError as e:
                errors.append(str(e))
        raise PassOptionError(errors[0])
    if origin in (tuple, list):
        inner = (typing.get_args(tp) or (str,))[0]
        items = value if isinstance(value, (list, tuple)) else ([] if value in ("", None) else [value])
        return tuple(_coerce(v, inner, where) for v in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise PassOptionError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise PassOptionError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise PassOptionError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise PassOptionError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (list, dict)):
            raise PassOptionError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def build_pass(name: str, options: dict[str, Any] | None = None, lookup: Lookup | None = None):
    """Instantiate the registered pass ``name`` from raw option values (strings or typed).
    ``lookup(name) -> class`` is the registry (default: the passes layer's own,
    :func:`lowc.passes.registry.get_pass_class`; :mod:`lowc.backends.registry` gives every pass)."""
    cls = (lookup or get_pass_class)(name)
    options = dict(options or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise PassOptionError(
            f"pass '{name}': unknown option(s) {', '.join(unknown)} (options: {', '.join(fields) or 'none'})"
        )
    typed = {k: _coerce(v, hints[k], f"pass '{name}' option {k}") for k, v in options.items()}
    try:
        return cls(**typed)
    except PassOptionError:
        raise
    except (TypeError, ValueError) as e:
        raise PassOptionError(f"pass '{name}': {e}") from None


def parse_pass(spelling: str, lookup: Lookup | None = None):
    name, opts = parse_spelling(spelling)
    return build_pass(name, opts, lookup)


def from_json(d: dict[str, Any], lookup: Lookup | None = None):
    return build_pass(d["name"], d.get("options", {}), lookup)


def _item_to_pass(item: Any, where: str, lookup: Lookup | None):
    if isinstance(item, str):
        return parse_pass(item, lookup)
    if isinstance(item, dict):
        if "name" in item:
            opts = item.get("options", {k: v for k, v in item.items() if k != "name"})
            return build_pass(item["name"], opts, lookup)
        if len(item) == 1:
            (name, opts), = item.items()
            return build_pass(name, opts or {}, lookup)
    raise PassOptionError(f"{where}: each recipe item must be a pass spelling or a mapping, got {item!r}")


def load_recipe(path: str, lookup: Lookup | None = None) -> list:
    """Passes from a YAML/JSON recipe file (see module docstring), looked up in ``lookup``."""
    if not os.path.isfile(path):
        raise PassOptionError(f"recipe {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as e:
        raise PassOptionError(f"recipe {path}: cannot parse ({str(e).splitlines()[0]})") from None
    if is_search_recipe(data):  # a per-layer level assignment written by `lowc search`
        return [parse_pass(s, lookup) for s in Recipe.from_json(data, f"recipe {path}").passes()]
    if isinstance(data, dict) and "passes" in data:
        data = data["passes"]
    if not isinstance(data, list):
        raise PassOptionError(f"recipe {path}: expected a list of passes")
    return [_item_to_pass(item, f"recipe {path}", lookup) for item in data]
