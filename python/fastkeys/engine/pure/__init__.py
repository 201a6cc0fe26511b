"""The pure-Python mirror of `fastkeys._native`, module for module as the Rust core is split:
`matcher` (rust/matcher.rs, rename.rs: `KeyMatcher`), `safetensors` (rust/safetensors.rs:
`read_headers`), `values` (rust/values.rs: `read_values`, loaded when first asked for) and
`regex` (the linear-time engine standing in for the `regex` crate: `Regex`). Same arguments, answers
and errors as the native module; `fastkeys.engine.contract.Engine` is what both provide.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from fastkeys.engine.pure.matcher import KeyMatcher
from fastkeys.engine.pure.regex import Regex
from fastkeys.engine.pure.safetensors import read_headers

__all__ = ["KeyMatcher", "Regex", "read_headers", "read_values"]


def read_values(
    paths: Sequence[str | os.PathLike[str]], threads: int | None = None
) -> list[tuple[list[str], list[bool], list[bool]]]:
    """See `fastkeys._native.read_values` (in `values`, loaded when first asked for)."""
    from fastkeys.engine.pure.values import read_values as read

    return read(paths, threads)
