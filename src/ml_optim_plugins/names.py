"""Parameter and module names: the dotted prefixes of a name, and matching them against names or globs.

One rule serves every place where users select parameters or modules by name (LR multipliers, the gradient check's
``params``, the elastic-net ``modules``, the curvature probe's ``params``): a pattern selects a name when it matches
the name itself or any module enclosing it.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase


def name_prefixes(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.b.c", "a.b", "a"]``: the name, then each enclosing module, innermost first (``[]`` for
    the root's empty name).

    Example:
        >>> name_prefixes("encoders.image.conv.weight")
        ['encoders.image.conv.weight', 'encoders.image.conv', 'encoders.image', 'encoders']
    """
    parts = name.split(".") if name else []
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether any pattern (a name or a glob, ``*`` also matching dots) matches ``name`` or a module enclosing it.

    Example:
        >>> name_matches("encoders.image.conv.weight", ["encoders.image"]), name_matches("fusion.bias", ["enc*"])
        (True, False)
    """
    patterns = list(patterns)
    return any(fnmatchcase(prefix, pattern) for prefix in name_prefixes(name) for pattern in patterns)
