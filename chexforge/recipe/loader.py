"""Loading recipes from YAML with errors that point at file:line:column.

ruamel.yaml's round-trip loader keeps the position of every key and value (and constructs no
Python objects from tags, so it is as safe as a safe loader). Pydantic's error locations are
walked through that tree to find the line to blame.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.emitter import Emitter

from ..contracts.limits import MAX_RECIPE_BYTES, load_yaml, read_bytes
from ..errors import UserError, located
from .schema import Recipe, semantic_problems


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = read_bytes(path, MAX_RECIPE_BYTES, "recipe file")
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError("cannot read the recipe (UnicodeDecodeError); expected a UTF-8 YAML file", path) from None
    except UserError as e:
        if e.message.startswith("cannot read"):
            raise UserError(f"{e.message}; expected a UTF-8 YAML file", e.where) from None
        raise
    base_dir = path.parent.resolve()
    recipe = parse_recipe(text, source=str(path), base_dir=base_dir)
    if recipe.model is not None:  # not part of any job id, so safe to make absolute for --jobs runs
        recipe.model = recipe.resolve_path(recipe.model).resolve()
        if not recipe.model.is_dir():
            line = _position(_parse_yaml(text, str(path)), ("model",))
            raise UserError("expected a local model folder here (no such folder)", located(path, *line))
    return recipe


def parse_recipe(text: str, source: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    """A recipe from YAML text. `base_dir`: the folder relative paths in it start from (the
    recipe file's folder); with it, files the recipe names (QC models) are checked too."""
    tree = _parse_yaml(text, source)
    return _validated(_plain(tree), source, lambda loc: _position(tree, loc), base_dir)


def recipe_from_json(data: Any, source: str = "<recipe>") -> Recipe:
    """A recipe from its resolved JSON form (a job table carries one): validated like a recipe
    file, every problem one line at `source` naming the key."""
    if not isinstance(data, dict):
        raise UserError("expected a recipe (a JSON object with name, cohorts, ...)", source)
    return _validated(data, source, None, None)


def _validated(plain: dict, source: str, position: Any, base_dir: Path | None) -> Recipe:
    def problem(loc: tuple, message: str, more: int) -> UserError:
        where = located(source, *position(loc)) if position is not None else source
        return _problem(where, loc, message, more)

    try:
        recipe = Recipe.model_validate(plain)
    except ValidationError as e:
        errors = _one_branch(e.errors())
        first = errors[0]
        loc = tuple(first["loc"]) + (("[key]",) if first["type"] == "extra_forbidden" else ())
        raise problem(loc, _message(first), len(errors) - 1) from None
    recipe._base_dir = base_dir
    problems = semantic_problems(recipe)
    if problems:
        loc, message = problems[0]
        raise problem(loc, message, len(problems) - 1)
    return recipe


def _parse_yaml(text: str, source: str) -> Any:
    tree = load_yaml(text, source)  # size, nesting and alias limits; one located line per problem
    if not isinstance(tree, dict):
        raise UserError("expected a YAML mapping with name, cohorts, ... at the top level", located(source, 1, 1))
    return tree


def _plain(node: Any) -> Any:
    """ruamel's commented containers and scalar subclasses → plain Python values."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, bool) or node is None:
        return node
    for t in (int, float, str):
        if isinstance(node, t):
            return t(node)
    return node


# ---- locating and wording errors -------------------------------------------------------------


def _problem(where: str, loc: tuple, message: str, more: int) -> UserError:
    place = _dotted(loc)
    text = f"{place}: {message}" if place else message
    if more > 0:
        text += f" (and {more} more problem{'s' if more > 1 else ''})"
    return UserError(text, where)


def _position(tree: Any, loc: tuple) -> tuple[int, int]:
    """1-based line and column of the deepest node of `loc` that exists in the YAML tree."""
    node, pos = tree, (0, 0)
    parent, key = None, None
    for part in loc:
        if part == "[key]":
            if parent is not None and hasattr(parent, "lc") and key in parent:
                pos = parent.lc.key(key)
            continue
        if isinstance(node, dict) and hasattr(node, "lc"):
            match = _key_in(node, part)
            if match is None:
                continue  # a union tag or a key pydantic added: stay on the parent
            pos = node.lc.value(match) if not isinstance(node[match], (dict, list)) else node.lc.key(match)
            parent, key, node = node, match, node[match]
        elif isinstance(node, list) and hasattr(node, "lc") and isinstance(part, int) and part < len(node):
            pos = node.lc.item(part)
            parent, key, node = node, part, node[part]
    return pos[0] + 1, pos[1] + 1


def _key_in(mapping: dict, part: Any) -> Any:
    from ..contracts.vocabulary import ALIASES

    if part in mapping:
        return part
    for k in mapping:  # a key the schema renamed (finding aliases) or typed (numbers)
        if ALIASES.get(str(k)) == part or str(k) == str(part):
            return k
    return None


def _is_tag(part) -> bool:
    """Pydantic names union branches in error locations (`dict[...]`, `literal['natural']`)."""
    return isinstance(part, str) and "[" in part and part != "[key]"


def _one_branch(errors: list[dict]) -> list[dict]:
    """For a value that may be one of several types, keep the errors of the branch whose type
    the value has (a mapping's errors, not "expected 'natural'")."""
    kept = []
    for err in errors:
        tags = [p for p in err["loc"] if _is_tag(p)]
        if tags and tags[-1].startswith("literal[") and not isinstance(err.get("input"), str):
            continue
        kept.append(err)
    return kept or errors


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part == "[key]" or _is_tag(part):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part)[:1].isupper() and " " not in str(part) and part in _MODEL_TAGS:
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


_MODEL_TAGS: set[str] = {"Age", "FindingSpec", "Layout", "ExplicitBox", "Demographics", "Output", "Cohort"}


def _message(err: dict) -> str:
    kind, msg, value = err["type"], err["msg"], err.get("input")
    loc = err["loc"]
    if kind == "extra_forbidden":
        name = str(loc[-1])
        allowed = _fields_at(Recipe, loc[:-1])
        hint = difflib.get_close_matches(name, allowed, n=1, cutoff=0.5)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"unknown key {name!r}{suggestion} (expected one of: {', '.join(allowed)})"
    if kind == "missing":
        return f"missing required key {str(loc[-1])!r}"
    if kind == "literal_error" and "[key]" in loc:
        expected = err.get("ctx", {}).get("expected", "")
        names = [s.strip().strip("'") for s in expected.replace(" or ", ", ").split(",")]
        hint = difflib.get_close_matches(str(value), names, n=1, cutoff=0.5)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"unknown finding {value!r}{suggestion} (expected one of: {', '.join(names)})"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind == "assertion_error":
        return msg.removeprefix("Assertion failed, ")
    if msg.startswith("Input should be "):
        msg = "expected " + msg.removeprefix("Input should be ")
    return f"{msg}, got {_short(value)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model(s) found by following `loc` from `model` (for did-you-mean)."""
    candidates: list[Any] = [model]
    for part in loc:
        nxt: list[Any] = []
        for c in candidates:
            for t in _unwrap(c):
                if isinstance(t, type) and issubclass(t, BaseModel) and isinstance(part, str) and part in t.model_fields:
                    nxt.append(t.model_fields[part].annotation)
                elif typing.get_origin(t) in (list, tuple) and isinstance(part, int):
                    nxt.extend(typing.get_args(t)[:1])
                elif typing.get_origin(t) is dict:
                    nxt.append(typing.get_args(t)[1])
        candidates = nxt or candidates
    names: list[str] = []
    for c in candidates:
        for t in _unwrap(c):
            if isinstance(t, type) and issubclass(t, BaseModel):
                names += [n for n in t.model_fields if n not in names]
    return names


def _unwrap(t: Any) -> list[Any]:
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return [u for a in typing.get_args(t) for u in _unwrap(a)]
    return [t]


# ---- writing and hashing -----------------------------------------------------------------------


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe (defaults filled, weights normalized) as plain data."""
    return json.loads(recipe.model_dump_json(exclude_none=True))


def recipe_to_yaml(recipe: Recipe) -> str:
    buf = io.StringIO()
    yaml_writer().dump(recipe_dict(recipe), buf)
    return buf.getvalue()


def yaml_writer() -> YAML:
    """A YAML writer whose output always loads back as what was written: block style, ASCII
    (other characters escaped), and no mapping key or quoted scalar wrapped across lines (ruamel
    wraps a long key, which then does not load, and can mangle escapes at a fold)."""
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False
    yaml.allow_unicode = False
    yaml.Emitter = _UnwrappedKeysEmitter
    return yaml


class _UnwrappedKeysEmitter(Emitter):
    """ruamel's emitter, except that it never wraps a mapping key or a quoted scalar (plain
    values still wrap at the width, as before)."""

    def _unwrapped(self, write: Any, text: Any) -> None:
        width = self.best_width
        self.best_width = sys.maxsize
        try:
            write(text, False)
        finally:
            self.best_width = width

    def write_plain(self, text: Any, split: Any = True) -> None:
        if split:
            super().write_plain(text, split)
        else:
            self._unwrapped(super().write_plain, text)

    def write_double_quoted(self, text: Any, split: Any = True) -> None:
        self._unwrapped(super().write_double_quoted, text)

    def write_single_quoted(self, text: Any, split: Any = True) -> None:
        self._unwrapped(super().write_single_quoted, text)


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest of a JSON-able object, independent of dict order and platform."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.blake2b(blob, digest_size=n).hexdigest()
