"""Limits for every parser of untrusted input, in one place.

Recipes (YAML), the recipe JSON inside job tables, model-folder JSON files, label files (CSV,
compressed CSV, Parquet) and checkpoint metadata all come from users or from the network. Each
reader goes through here, so a hostile or broken file is refused quickly, with one located
line, instead of eating memory and time or ending in a RecursionError:

- size: a document is read at most `max_bytes + 1` bytes deep (compressed label files are
  limited after decompression);
- nesting: at most `MAX_DEPTH` nested mappings/lists (checked while YAML is scanned, before a
  recursive composer sees it; for JSON by a scan of the text before `json` parses it);
- expansion: at most `MAX_NODES` values once YAML aliases are expanded (the "billion laughs":
  a few hundred bytes of nested anchors that stand for billions of values), and no recursive
  alias.

Pure Python (ruamel.yaml for YAML, imported when needed); no torch.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import re
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import UserError, located

MiB = 1 << 20
MAX_RECIPE_BYTES = 2 * MiB  # a recipe file (YAML)
MAX_JSON_BYTES = 16 * MiB  # a JSON document: a job table's recipe, model_index.json, chexforge.json, metadata
MAX_DEPTH = 50  # nested mappings and lists (a recipe needs about 7)
MAX_NODES = 1_000_000  # values in a document, aliases expanded
MAX_LABEL_BYTES = 1024 * MiB  # a label file, after decompression
MAX_LABEL_ROWS = 20_000_000  # rows of a Parquet label file (a chexforge manifest)
MAX_LABEL_COLUMNS = 2_000  # columns of a label file
MAX_CELL_CHARS = 10_000  # a label cell that is parsed further (PadChest's label lists)


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n} bytes"


def too_large(what: str, limit: int) -> str:
    return f"{what} is larger than the {_size(limit)} chexforge reads"


# ---- bytes ----------------------------------------------------------------------------------------


def read_bytes(path: str | Path, max_bytes: int, what: str) -> bytes:
    """A file's bytes, refusing one larger than `max_bytes` without reading the rest."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise UserError(f"no such {what}", path) from None
    except (IsADirectoryError, PermissionError, OSError) as e:
        raise UserError(f"cannot read the {what} ({type(e).__name__})", path) from None
    if len(data) > max_bytes:
        raise UserError(too_large(f"the {what}", max_bytes), path)
    return data


def read_text(path: str | Path, max_bytes: int, what: str) -> str:
    data = read_bytes(path, max_bytes, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"the {what} is not UTF-8 text (byte {e.start})", path) from None


class _Limited(io.RawIOBase):
    """A read-only stream that raises a one-line error once more than `limit` bytes came out."""

    def __init__(self, raw: BinaryIO, limit: int, what: str, where: Path):
        self.raw, self.limit, self.what, self.where, self.seen = raw, limit, what, where, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self.raw.read(len(buffer))
        except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, zipfile.BadZipFile) as e:  # damaged compression
            raise UserError(f"the {self.what} is damaged ({type(e).__name__}: {str(e)[:100]})", self.where) from None
        self.seen += len(data)
        if self.seen > self.limit:
            raise UserError(too_large(f"the {self.what} (uncompressed)", self.limit), self.where)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self.raw.close()
        finally:
            super().close()


def open_limited(path: str | Path, max_bytes: int, what: str) -> BinaryIO:
    """A binary stream of the file's contents, decompressed by its suffix (.gz, .bz2, .xz, .zip
    with one member), that refuses to yield more than `max_bytes`: a small compressed file that
    unpacks to gigabytes (a "zip bomb") stops at the limit."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".gz":
            raw: BinaryIO = gzip.open(path, "rb")  # type: ignore[assignment]
        elif suffix == ".bz2":
            raw = bz2.open(path, "rb")  # type: ignore[assignment]
        elif suffix in (".xz", ".lzma"):
            raw = lzma.open(path, "rb")  # type: ignore[assignment]
        elif suffix == ".zip":
            z = zipfile.ZipFile(path)
            names = [n for n in z.namelist() if not n.endswith("/")]
            if len(names) != 1:
                raise UserError(f"expected one file in the zip archive, found {len(names)}", path)
            raw = z.open(names[0])  # type: ignore[assignment]
        else:
            raw = open(path, "rb")  # noqa: SIM115 - closed with the returned stream
    except UserError:
        raise
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise UserError(f"cannot read the {what} ({type(e).__name__}: {str(e)[:100]})", path) from None
    return io.BufferedReader(_Limited(raw, max_bytes, what, path), buffer_size=1 << 20)  # type: ignore[return-value]


# ---- nesting and expansion of a parsed document ----------------------------------------------------


def _children(node: Any) -> Iterable[Any]:
    if isinstance(node, dict):
        yield from node.keys()
        yield from node.values()
    else:
        yield from node


def _is_container(node: Any) -> bool:
    return isinstance(node, (dict, list, tuple))


def check_tree(root: Any, where: str | Path | None, what: str = "the document",
               position: Any = None) -> None:
    """Refuse a parsed document deeper than MAX_DEPTH, with more than MAX_NODES values once shared
    parts (YAML aliases) are counted each time they are used, or that contains itself.

    Iterative, and each distinct container is visited once, so a document that stands for
    billions of values is measured in microseconds. `position(node)` may give the (line, column)
    of a container for the error.
    """
    memo: dict[int, tuple[int, int]] = {}  # id → (values when expanded, height)
    inside: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]

    def fail(node: Any, message: str) -> UserError:
        pos = position(node) if position is not None else None
        place = located(where, *pos) if pos and where is not None else where
        return UserError(f"{what} {message}", place)

    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            inside.discard(key)
            size, height = 1, 1
            for child in _children(node):
                if _is_container(child):
                    s, h = memo[id(child)]
                    size += s
                    height = max(height, h + 1)
                else:
                    size += 1
            memo[key] = (size, height)
            if height > MAX_DEPTH:
                raise fail(node, f"is nested deeper than {MAX_DEPTH} levels")
            if size > MAX_NODES:
                raise fail(node, f"stands for more than {MAX_NODES:,} values (aliases expanded)")
            continue
        if key in memo or not _is_container(node):
            continue
        if key in inside:
            raise fail(node, "refers to itself (a recursive alias)")
        inside.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if _is_container(child) and id(child) not in memo)


# ---- JSON ----------------------------------------------------------------------------------------

# A JSON string, or the rest of the text after an unclosed quote; never backtracks (linear time).
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.?)*+(?:"|\Z)', re.DOTALL)


def _json_depth_problem(text: str) -> int | None:
    """The line where `text` first nests deeper than MAX_DEPTH, if it does (strings skipped).

    An upper bound of the depth `json` would recurse to: up to its first syntax error the text
    is valid JSON, whose bracket balance is its depth."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return None
    import numpy as np

    bare = _JSON_STRING.sub('""', text).encode("utf-8", "surrogatepass")
    chars = np.frombuffer(bare, dtype=np.uint8)
    step = np.isin(chars, (ord("["), ord("{"))).astype(np.int32) - np.isin(chars, (ord("]"), ord("}")))
    depth = np.cumsum(step)
    over = np.flatnonzero(depth > MAX_DEPTH)
    if not len(over):
        return None
    return bare.count(b"\n", 0, int(over[0])) + 1


def load_json(data: bytes | str, where: str | Path | None, what: str = "the JSON",
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse JSON from untrusted bytes: size, nesting and count limits, one-line errors."""
    if isinstance(data, bytes):
        if len(data) > max_bytes:
            raise UserError(too_large(what, max_bytes), where)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{what} is not UTF-8 text (byte {e.start})", where) from None
    else:
        text = data
        if len(text) > max_bytes:
            raise UserError(too_large(what, max_bytes), where)
    deep = _json_depth_problem(text)
    if deep is not None:
        raise UserError(f"{what} is nested deeper than {MAX_DEPTH} levels (at line {deep})", where)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})", where) from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of more digits than Python converts
        raise UserError(f"{what} is not valid JSON ({type(e).__name__}: {str(e)[:100]})", where) from None
    check_tree(value, where, what)
    return value


def read_json(path: str | Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file, read under the limits."""
    return load_json(read_bytes(path, max_bytes, what), path, f"the {what}", max_bytes)


# ---- YAML ----------------------------------------------------------------------------------------


class _TooDeep(Exception):
    def __init__(self, mark: Any):
        super().__init__("nested too deeply")
        self.mark = mark


def _limited_scanner(base: type) -> type:
    """`base` (a ruamel scanner) that stops at MAX_DEPTH open flow collections ([ {) or block
    indentation levels, while it scans: ruamel composes recursively, and its scanner's cost per
    token grows with the flow depth, so depth must be bounded before either runs away."""

    class LimitedScanner(base):  # type: ignore[misc, valid-type]
        def fetch_flow_collection_start(self, *args: Any, **kw: Any) -> None:
            if len(self.flow_context) >= MAX_DEPTH:
                raise _TooDeep(self.reader.get_mark())
            super().fetch_flow_collection_start(*args, **kw)

        def add_indent(self, column: int) -> bool:
            if len(self.indents) >= MAX_DEPTH:
                raise _TooDeep(self.reader.get_mark())
            return super().add_indent(column)

    return LimitedScanner


def _line_col(text: str, index: int) -> tuple[int, int]:
    index = max(0, min(index, len(text)))
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def load_yaml(text: str, source: str | Path, what: str = "the recipe", max_bytes: int = MAX_RECIPE_BYTES) -> Any:
    """Parse YAML from untrusted text with ruamel's round-trip loader (positions kept, no Python
    objects built from tags) under the size, nesting and alias-expansion limits. Every problem is
    one UserError located at `source:line:column`."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError
    from ruamel.yaml.reader import ReaderError

    if len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise UserError(too_large(what, max_bytes), source)
    yaml = YAML(typ="rt")
    yaml.Scanner = _limited_scanner(yaml.Scanner)
    try:
        tree = yaml.load(text)
    except _TooDeep as e:
        raise UserError(f"{what} is nested deeper than {MAX_DEPTH} levels",
                        located(source, e.mark.line + 1, e.mark.column + 1)) from None
    except ReaderError as e:  # a character YAML does not allow (NUL, other control characters)
        char = e.character if isinstance(e.character, str) else chr(e.character)
        raise UserError(f"character {char!r} is not allowed in YAML ({e.reason})",
                        located(source, *_line_col(text, e.position))) from None
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = located(source, mark.line + 1, mark.column + 1) if mark else source
        problem = (e.problem or e.context or "invalid YAML").strip()
        raise UserError(f"YAML syntax error: {' '.join(problem.split())}", where) from None
    except YAMLError as e:
        raise UserError(f"YAML syntax error: {' '.join(str(e).split())[:200]}", source) from None
    except Exception as e:  # noqa: BLE001
        # ruamel turns scalars and tags into Python values, which can fail in many ways (a
        # 5,000-digit integer, a malformed timestamp, a malformed !!omap): all bad input.
        raise UserError(f"cannot read a value in {what} ({type(e).__name__}: {' '.join(str(e).split())[:120]})",
                        source) from None
    check_tree(tree, source, what, position=_rt_position)
    return tree


def _rt_position(node: Any) -> tuple[int, int] | None:
    lc = getattr(node, "lc", None)
    if lc is None or getattr(lc, "line", None) is None:
        return None
    return lc.line + 1, lc.col + 1
