"""YAML loading that remembers where each key was, so errors can name file, line and key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from crmsync.errors import CrmsyncError

KeyPath = tuple[str | int, ...]


class YamlDoc:
    """A parsed YAML document plus the line (1-based) of every key path in it."""

    def __init__(self, data: Any, lines: dict[KeyPath, int], path: str, root: yaml.Node | None = None) -> None:
        self.data, self.lines, self.path = data, lines, path
        self.root = root  # the composed document, for checks PyYAML's constructor cannot make (duplicate keys)

    def line(self, keypath: KeyPath) -> int:
        """The line of the nearest known key on ``keypath`` (0 when unknown)."""
        for i in range(len(keypath), -1, -1):
            if keypath[:i] in self.lines:
                return self.lines[keypath[:i]]
        return 0

    def where(self, keypath: KeyPath) -> str:
        """``file:line: a.b.c`` for messages."""
        dotted = ".".join(str(k) for k in keypath)
        return (
            f"{self.path}:{self.line(keypath)}: {dotted}" if dotted else f"{self.path}:{self.line(keypath)}"
        )


def _walk(node: yaml.Node, prefix: KeyPath, lines: dict[KeyPath, int]) -> None:
    lines.setdefault(prefix, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            lines[(*prefix, key)] = key_node.start_mark.line + 1
            _walk(value_node, (*prefix, key), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*prefix, i), lines)


#: libyaml when PyYAML was built with it (the wheels are): the pure-Python parser took 7 ms per pass
#: over the default mapping, on the path of every pull and push.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str, path: str, error: type[CrmsyncError]) -> YamlDoc:
    """Parse ``text`` safely, in one pass; a syntax error becomes ``error`` with the file and line."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else 0
        raise error(f"{path}:{line}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return YamlDoc(data, lines, path, node)


def load_yaml(path: Path, error: type[CrmsyncError]) -> YamlDoc:
    """Read and parse a YAML file (UTF-8, BOM tolerated)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_yaml(text, str(path), error)
