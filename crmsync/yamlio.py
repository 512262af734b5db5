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
        return f"{self.path}:{self.line(keypath)}: {dotted}" if dotted else f"{self.path}:{self.line(keypath)}"


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


#: Budgets for one document. Anchors and aliases stay usable (``<<: *defaults``), but a file whose
#: aliases expand into a huge tree (a "billion laughs" bomb) or nest absurdly deep is refused
#: before anything walks the expanded data.
MAX_ALIASES = 100
MAX_NODES = 100_000
MAX_DEPTH = 64


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def check_budget(root: yaml.Node, path: str, error: type[CrmsyncError]) -> None:
    """Refuse a composed document beyond the alias, expanded-size or depth budget (file:line).

    Composing shares an aliased node instead of copying it, so this walk is linear in the file
    even when the expanded tree would not fit in memory.
    """
    sizes: dict[int, int] = {}  # expanded size of every node done, by identity
    on_path = {id(root)}
    aliases, line = 0, root.start_mark.line + 1
    stack = [(root, iter(_children(root)))]
    while stack:
        node, pending = stack[-1]
        child = next(pending, None)
        if child is None:
            stack.pop()
            on_path.discard(id(node))
            size = sizes[id(node)] = 1 + sum(sizes[id(c)] for c in _children(node))
            if size > MAX_NODES:
                where = node.start_mark.line + 1
                raise error(f"{path}:{where}: YAML aliases expand this to more than {MAX_NODES} nodes")
            continue
        if id(child) in on_path:
            raise error(f"{path}:{line}: a YAML alias refers to a node that contains it")
        if id(child) in sizes:
            aliases += 1
            if aliases > MAX_ALIASES:
                raise error(f"{path}:{line}: more than {MAX_ALIASES} YAML aliases")
            continue
        line = child.start_mark.line + 1
        if len(stack) >= MAX_DEPTH:
            raise error(f"{path}:{line}: nested deeper than {MAX_DEPTH} levels")
        on_path.add(id(child))
        stack.append((child, iter(_children(child))))


def parse_yaml(text: str, path: str, error: type[CrmsyncError]) -> YamlDoc:
    """Parse ``text`` safely, in one pass; a syntax error or a blown budget becomes ``error`` with file:line."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            check_budget(node, path, error)
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


def load_data(text: str, path: str, error: type[CrmsyncError]) -> Any:
    """Only the data of a YAML text, under the same budgets (every YAML crmsync reads goes through here)."""
    return parse_yaml(text, path, error).data


def load_yaml(path: Path, error: type[CrmsyncError]) -> YamlDoc:
    """Read and parse a YAML file (UTF-8, BOM tolerated)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_yaml(text, str(path), error)
