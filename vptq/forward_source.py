"""A module class's `forward` as a syntax tree, for the few questions only its source answers before anything runs:
which linears a module reads as weights (vptq.targets.read_as_weights) and what shape a block returns (the
driver's capture of block inputs)."""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap


@functools.cache
def forward_tree(cls: type) -> ast.AST | None:
    """The parsed source of `cls.forward` (through functools.wraps decorators: inspect.unwrap); None where the
    source cannot be read (a builtin, a class defined at run time)."""
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, AttributeError, SyntaxError):
        return None


def self_attr(node: ast.AST, attr: str | None = None) -> str | None:
    """X where node is `self.X` (and X == attr when given)."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr if attr is None or node.attr == attr else None
    return None
