"""One safe JSON reader for every untrusted JSON document the library reads.

``config.json``, ``model_index.json``, ``adapter_config.json``, index files and JSON held in metadata
fields all come from files a user downloaded. :func:`read_json_file` and :func:`loads_json` parse them
with bounds on everything the input controls, and raise :class:`~fvtransform.errors.FormatError`
(or :class:`~fvtransform.errors.UnsafeFileError` for a path that is not a regular file) naming the
file and the key:

- size (``max_bytes``), checked on the open file before reading, and read no further;
- memory: the number of containers (``{``/``[``) and of values (``,``) is counted on the raw text
  *before* parsing (an upper bound: brackets and commas inside strings count too), so a file full of
  ``{}`` is refused without building a single dict;
- nesting depth (``max_depth``), integer digits (``max_int_digits``; Python's ``int()`` of a long
  digit string is quadratic), the non-JSON constants ``NaN`` / ``Infinity``, duplicate keys (the
  standard library keeps the last silently), lone surrogates in strings;
- types: ``expect=`` the top-level type, and :func:`check_type` / :func:`get_field` for fields
  (``_class_name: 5`` or a list where a dict belongs), with ``bool`` never accepted as a number.

>>> loads_json('{"a": [1, 2]}', source="x.json")
{'a': [1, 2]}
>>> loads_json('{"a": 1, "a": 2}', source="x.json")
Traceback (most recent call last):
...
fvtransform.errors.FormatError: x.json: key 'a' appears twice; a JSON object must name each key once
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import json
import os
from pathlib import Path
import re
import stat
from typing import Any

import attrs

from fvtransform.errors import FormatError, FvTransformError

__all__ = [
    "unique_keys",
    "JsonLimits",
    "DEFAULT_JSON_LIMITS",
    "read_json_file",
    "loads_json",
    "check_type",
    "get_field",
    "json_path",
]


@attrs.frozen
class JsonLimits:
    """Bounds on one JSON document (pass a changed copy with ``attrs.evolve`` to override one).

    Attributes:
        max_bytes: size of the document in bytes (a real ``config.json`` is a few kB; an index of
            tens of thousands of tensors a few MB).
        max_depth: nesting of objects and arrays (real configs nest two or three levels).
        max_int_digits: digits of one integer literal.
        max_containers: objects plus arrays (counted as ``{`` and ``[`` in the raw text).
        max_values: values in all (counted as ``,`` in the raw text plus containers).
        object_bytes: when set, at most one object and two arrays per this many bytes of the document
            (a safetensors header or index: the smallest real header entry is 48 bytes), so a document
            of ``{}`` or ``[]`` is refused whatever its size.
    """

    max_bytes: int = 8 << 20
    max_depth: int = 32
    max_int_digits: int = 64
    max_containers: int = 100_000
    max_values: int = 500_000
    object_bytes: int | None = None


#: The bounds used unless a caller passes others: configs, model indexes, adapter configs.
DEFAULT_JSON_LIMITS = JsonLimits()

_TYPE_NAMES: dict[type, str] = {
    dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
    bool: "true/false", type(None): "null",
}

_NOT_REGULAR: tuple[tuple[Any, str], ...] = (
    (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
)


def json_path(path: tuple[Any, ...]) -> str:
    """A key path for messages: ``('a', 0, 'b')`` -> ``"a[0].b"``; the empty path is the document.

    >>> json_path(("text_config", "layers", 3))
    'text_config.layers[3]'
    """
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the document)"


def _kind(mode: int) -> str:
    for test, name in _NOT_REGULAR:
        if test(mode):
            return name
    return "not a regular file"


def read_json_file(
    path: str | os.PathLike[str],
    *,
    limits: JsonLimits = DEFAULT_JSON_LIMITS,
    expect: type | tuple[type, ...] | None = dict,
    what: str = "JSON file",
    duplicate: Callable[[str], Exception] | None = None,
) -> Any:
    """Read and parse a JSON file with :func:`loads_json`'s bounds; only regular files are opened.

    The file is opened by :func:`fvtransform.io._open.read_bytes` (non-blocking, so a FIFO never
    blocks; checked with ``fstat`` on the open descriptor) and read up to ``limits.max_bytes``.
    ``what`` names the file in messages (``"index file"``); ``duplicate`` as in :func:`loads_json`.

    Raises:
        NotFoundError: no such file.
        UnsafeFileError: the path is a FIFO, socket, device or directory.
        FormatError: too large, not UTF-8, not JSON, or out of any bound (named with the key path).
    """
    from fvtransform.io._open import read_bytes  # the one way to open untrusted files (imported late: io imports us)

    path = path if isinstance(path, Path) else Path(path)  # a DerivedPath keeps its root
    raw = read_bytes(path, what, limits.max_bytes)
    return loads_json(raw, source=str(path), limits=limits, expect=expect, what=what, duplicate=duplicate)


def loads_json(
    text: str | bytes,
    *,
    source: str,
    limits: JsonLimits = DEFAULT_JSON_LIMITS,
    expect: type | tuple[type, ...] | None = None,
    what: str = "document",
    duplicate: Callable[[str], Exception] | None = None,
) -> Any:
    """Parse untrusted JSON text; ``source`` (a file name, ``"file: metadata key 'x'"``) names it in errors.

    ``what`` names the kind of document in the messages of the ``object_bytes`` bound (``"header"``);
    ``duplicate(key)`` is the error for a key an object names twice, where a reader raises its own
    class (an index's key listed twice is a ``KeyMismatchError``); by default a :class:`FormatError`.

    >>> loads_json('[[[1]]]', source="deep.json", limits=JsonLimits(max_depth=2))
    Traceback (most recent call last):
    ...
    fvtransform.errors.FormatError: deep.json: nesting deeper than 2 levels at [0][0] (JsonLimits.max_depth)
    """
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if len(raw) > limits.max_bytes:
        raise FormatError(f"{source}: {len(raw)} bytes is more than the {limits.max_bytes} bytes a JSON document may have (JsonLimits.max_bytes)")
    braces, brackets = raw.count(b"{"), raw.count(b"[")
    if limits.object_bytes is not None:
        per = len(raw) // limits.object_bytes
        if braces > per + 16 or brackets > 2 * per + 16:
            raise FormatError(
                f"{source}: the {what} holds {braces} JSON objects and {brackets} lists in {len(raw)} bytes, far more than "
                f"any real {what} (one object and two lists per {limits.object_bytes} bytes at most); refusing to parse it"
            )
    containers = braces + brackets
    if containers > limits.max_containers:
        raise FormatError(
            f"{source}: about {containers} objects and arrays, more than {limits.max_containers} (JsonLimits.max_containers); "
            "this is not a config or index file"
        )
    values = raw.count(b",") + containers
    if values > limits.max_values:
        raise FormatError(f"{source}: about {values} values, more than {limits.max_values} (JsonLimits.max_values)")
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{source}: not valid UTF-8 at byte {e.start}; JSON files are UTF-8") from None

    def parse_int(digits: str) -> int:
        n = len(digits.lstrip("-"))
        if n > limits.max_int_digits:
            where = _key_before(raw, rb"-?[0-9]{%d}" % (limits.max_int_digits + 1))
            raise FormatError(
                f"{source}: {where}an integer of {n} digits, more than {limits.max_int_digits} "
                "(JsonLimits.max_int_digits)"
            )
        return int(digits)

    def parse_constant(name: str) -> Any:
        where = _key_before(raw, rb"-?(?:NaN|Infinity)")
        raise FormatError(f"{source}: {where}{name} is not JSON; a value must be a finite number")

    pairs = unique_keys(duplicate or (lambda key: FormatError(f"{source}: key {key!r} appears twice; a JSON object must name each key once")))

    try:
        doc = json.loads(decoded, parse_int=parse_int, parse_constant=parse_constant, object_pairs_hook=pairs)
    except FvTransformError:
        raise
    except json.JSONDecodeError as e:
        raise FormatError(f"{source}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise FormatError(f"{source}: nesting deeper than {limits.max_depth} levels (JsonLimits.max_depth)") from None
    except ValueError as e:  # the interpreter's own int-digits limit, should ours be raised above it
        raise FormatError(f"{source}: not valid JSON ({e})") from None
    # UTF-8 text cannot carry a lone surrogate, only a \\uD800-\\uDFFF escape can: without one, only the depth
    # is checked, a level at a time (a header of 100,000 tensors in a tenth of a second)
    if re.search(rb"\\u[dD][89a-fA-F]", raw) is not None or _depth_exceeds(doc, limits.max_depth):
        _walk(doc, source, limits)
    if expect is not None:
        check_type(doc, expect, source=source, key=())
    return doc


def _key_before(raw: bytes, value: bytes) -> str:
    """``"key 'k': "`` for the key just before the first match of ``value`` in the raw text, else ``""``."""
    found = re.search(value, raw)
    if found is None:
        return ""
    before = raw[max(0, found.start() - 300):found.start()]
    m = re.search(rb'"((?:[^"\\]|\\.)*)"\s*:\s*\Z', before)
    if m is None:
        return ""
    try:
        key = json.loads(b'"' + m.group(1) + b'"')
    except ValueError:
        return ""
    return f"key {key!r}: "


def _depth_exceeds(doc: Any, max_depth: int) -> bool:
    """Whether a container lies ``max_depth`` levels deep or more: one level at a time, no paths built."""
    level = [doc] if type(doc) in (dict, list) else []
    depth = 0
    while level:
        if depth >= max_depth:
            return True
        level = [c for v in level for c in (v.values() if type(v) is dict else v) if type(c) in (dict, list)]
        depth += 1
    return False


def _walk(doc: Any, source: str, limits: JsonLimits) -> None:
    """Depth and string checks naming the key path, iteratively (the parser already bounded the number of nodes)."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(doc, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, (dict, list)):
            if len(path) >= limits.max_depth:
                raise FormatError(f"{source}: nesting deeper than {limits.max_depth} levels at {json_path(path)} (JsonLimits.max_depth)")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                if isinstance(k, str):
                    _check_text(k, source, path, "key")
                stack.append((v, path + (k,)))
        elif isinstance(value, str):
            _check_text(value, source, path, "value")


def _check_text(s: str, source: str, path: tuple[Any, ...], what: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(
            f"{source}: a {what} at {json_path(path)} holds a lone surrogate ({s[:40]!r}); not valid Unicode text"
        ) from None


def _names(types: type | tuple[type, ...]) -> str:
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in ts)


def check_type(value: Any, types: type | tuple[type, ...], *, source: str, key: str | tuple[Any, ...]) -> Any:
    """``value`` if it is one of ``types`` (``bool`` is not a number here), else a FormatError naming the key.

    >>> check_type(5, str, source="config.json", key="_class_name")
    Traceback (most recent call last):
    ...
    fvtransform.errors.FormatError: config.json: key '_class_name' must be a string; found an integer (5)
    """
    ts = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, ts) and not (isinstance(value, bool) and bool not in ts)
    if not ok:
        where = json_path(key) if isinstance(key, tuple) else key
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise FormatError(
            f"{source}: {'the document' if where == '(the document)' else f'key {where!r}'} must be {_names(types)}; "
            f"found {_TYPE_NAMES.get(type(value), type(value).__name__)} ({shown})"
        )
    return value


_MISSING = object()


def get_field(
    doc: Mapping[str, Any], key: str, types: type | tuple[type, ...], *, source: str, default: Any = _MISSING
) -> Any:
    """``doc[key]`` checked with :func:`check_type`; a missing key gives ``default`` or a FormatError.

    >>> get_field({"r": "two"}, "r", int, source="adapter_config.json")
    Traceback (most recent call last):
    ...
    fvtransform.errors.FormatError: adapter_config.json: key 'r' must be an integer; found a string ('two')
    """
    if key not in doc:
        if default is _MISSING:
            raise FormatError(f"{source}: the key {key!r} is missing; it must be {_names(types)}")
        return default
    return check_type(doc[key], types, source=source, key=key)


def unique_keys(refuse: Callable[[str], Exception]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A ``json.loads`` ``object_pairs_hook`` that raises ``refuse(key)`` for a key an object names twice.

    The dict is built in C; only when it comes out shorter than the pairs is the duplicate looked for.

    >>> json.loads('{"a": 1, "b": 2}', object_pairs_hook=unique_keys(KeyError))
    {'a': 1, 'b': 2}
    >>> json.loads('{"a": 1, "a": 2}', object_pairs_hook=unique_keys(KeyError))
    Traceback (most recent call last):
    KeyError: 'a'
    """

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise refuse(key)
                seen.add(key)
        return out

    return hook
