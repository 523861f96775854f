"""Bounds on a parsed YAML/JSON document before anything walks it: nesting depth and size.

YAML aliases make a document a graph: nine lines of anchors (a "billion laughs") stand for
~400 million nodes, which ``yaml.safe_load`` builds cheaply as shared objects but every later
walk (type checks, model parsing) expands. ``problem`` counts nodes as a walk would see them,
visiting each distinct container once (memoised), so the check itself costs what the text
holds. Sans-IO.
"""
from __future__ import annotations

from typing import Any

MAX_DEPTH = 64  # Kubernetes objects nest about 10 deep; Go configs 6
MIN_BUDGET = 1_000_000  # nodes a document may expand to, besides one per byte of its text


class _TooBig(Exception):
    pass


def problem(doc: Any, text_len: int, max_depth: int = MAX_DEPTH) -> str:
    """Why ``doc`` (parsed from ``text_len`` bytes) is refused, or "" when it is fine."""
    budget = MIN_BUDGET + text_len
    seen: dict[int, tuple[int, int]] = {}  # id → (expanded nodes, height)

    def walk(node: Any, depth: int) -> tuple[int, int]:
        if not isinstance(node, dict | list):
            return 1, 0
        known = seen.get(id(node))
        if known is None:
            if depth > max_depth:
                raise _TooBig(f"nested deeper than {max_depth} levels")
            children = node.values() if isinstance(node, dict) else node
            size, height = 1, 0
            for child in children:
                n, h = walk(child, depth + 1)
                size, height = size + n, max(height, h + 1)
                if size > budget:
                    raise _TooBig(f"expands to over {budget} nodes (YAML aliases?)")
            known = seen[id(node)] = (size, height)
        if depth + known[1] > max_depth:
            raise _TooBig(f"nested deeper than {max_depth} levels")
        return known

    try:
        walk(doc, 0)
    except _TooBig as e:
        return str(e)
    return ""
