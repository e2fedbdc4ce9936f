"""Reading a user's YAML file (hub files, Nipype plugin files) without letting it exhaust memory.

YAML aliases let a few hundred bytes stand for billions of elements ("billion laughs"): the
loader shares them, but anything that walks or formats the value (a message quoting it, a
comparison) takes time and memory without bound. Hub files have no use for anchors and aliases,
so the first alias is refused, and a file larger than :data:`MAX_YAML_BYTES` is refused before it
is parsed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["MAX_YAML_BYTES", "YamlFileError", "read_yaml"]

# The shipped presets are 2-3 kB; a megabyte leaves room for any hand-written hub file.
MAX_YAML_BYTES = 1 << 20
# Hub files nest flow collections ([...], {...}) two or three deep; PyYAML takes seconds to give
# up on thousands of levels, so they are counted first (quoted brackets count too: harmless).
MAX_FLOW_NESTING = 64
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


class YamlFileError(ValueError):
    """The file is too large, not UTF-8, not YAML, or uses an alias; the message is one line
    that does not repeat the path (the caller names the file)."""


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases (``*name``, and ``<<: *name`` merges)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise YamlFileError(
                f"line {mark.line + 1}, column {mark.column + 1}: YAML aliases (*name) are not "
                "allowed; write the value out"
            )
        return super().compose_node(parent, index)


def _one_line(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return f"{where}{exc.problem or exc.context or 'invalid YAML'}"
    return str(exc).replace("\n", " ")


def read_yaml(path: Path | str, *, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """The content of the YAML file ``path``.

    Raises :class:`OSError` when it cannot be read and :class:`YamlFileError` when it is larger
    than ``max_bytes``, not UTF-8, not valid YAML, nested beyond Python's recursion limit or
    uses an alias.
    """
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise YamlFileError(
            f"larger than {max_bytes} bytes; such a file is a few kilobytes (is it the right one?)"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlFileError(f"not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
    depth = 0
    for bracket in _NOT_BRACKETS.sub("", text):
        depth = depth + 1 if bracket in "[{" else max(depth - 1, 0)
        if depth > MAX_FLOW_NESTING:
            raise YamlFileError("nested too deeply to be a hub or plugin file")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise YamlFileError(f"not valid YAML: {_one_line(exc)}") from exc
    except RecursionError:
        raise YamlFileError("nested too deeply to be a hub or plugin file") from None
