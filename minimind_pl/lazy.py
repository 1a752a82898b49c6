"""Names a module exports but imports only when first used (a module ``__getattr__``, PEP 562).

The package, ``minimind_pl.data`` and ``minimind_pl.cli`` export names whose modules are slow to import (torch,
Lightning): ``python main.py --help`` and the data tools must not pay for them. Plain Python, no dependencies.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(module: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``module``: ``exports`` maps each lazily exported name to the module
    that defines it (an absolute module name). A name is imported on first use and then kept in ``module``'s
    namespace, so later lookups are ordinary attribute reads."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[module], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[module])) | set(exports))

    return __getattr__, __dir__
