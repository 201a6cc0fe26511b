"""Chooses the implementation: the compiled extension, or the pure-Python mirror.

`FASTKEYS_IMPLEMENTATION=python` forces the mirror; `=rust` insists on the extension (an
ImportError if it is missing); unset means the extension when it imports, else the mirror.
"""

from __future__ import annotations

import os

__all__ = ["IMPLEMENTATION", "core"]

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastkeys.engine.contract import Engine


def _choose() -> tuple[str, Engine]:
    wanted = os.environ.get("FASTKEYS_IMPLEMENTATION", "").strip().lower()
    if wanted not in ("", "rust", "python"):
        raise ImportError(f"FASTKEYS_IMPLEMENTATION must be 'rust', 'python' or unset, not {wanted!r}")
    if wanted != "python":
        try:
            from fastkeys import _native
        except ImportError as error:
            if wanted == "rust":
                raise ImportError(
                    "FASTKEYS_IMPLEMENTATION=rust, but the compiled extension fastkeys._native "
                    f"does not import ({error}); install a compiled wheel or build it with "
                    "`make build`, or unset FASTKEYS_IMPLEMENTATION to use the pure-Python fallback"
                ) from error
        else:
            return "rust", _native
    from fastkeys.engine import pure

    return "python", pure


IMPLEMENTATION, core = _choose()
