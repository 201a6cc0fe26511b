"""fastkeys: which state-dict keys matter when PEFT adapters are loaded.

`filter_missing` keeps the missing keys that belong to the adapter being loaded and drops the
rest (base-model keys, other adapters' keys, references to shared tensors). `KeyMatcher` is the
compiled engine behind it. `IMPLEMENTATION` says which engine runs: "rust" or "python".

Checkpoints are known from their headers alone: `read_keys`, `scan` (`Checkpoint`),
`insert_adapter_name` / `remove_adapter_name`, and the preflight checks `check_adapter`,
`check_base` and `check_many`. Those load on first use, so that `import fastkeys` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastkeys.engine import IMPLEMENTATION
from fastkeys.rules.matching import (
    KeyMatcher,
    MissingAdapterKeysWarning,
    filter_missing,
    insert_adapter_name,
    remove_adapter_name,
)
from fastkeys.rules.records import METHODS

if TYPE_CHECKING:
    __version__: str

    from fastkeys.checkpoints.scan import Checkpoint, Tensor, read_keys, scan
    from fastkeys.preflight.checks import AdapterCheck, Finding, check_adapter, check_base, check_many

__all__ = [
    "IMPLEMENTATION",
    "METHODS",
    "AdapterCheck",
    "Checkpoint",
    "Finding",
    "KeyMatcher",
    "MissingAdapterKeysWarning",
    "Tensor",
    "check_adapter",
    "check_base",
    "check_many",
    "filter_missing",
    "insert_adapter_name",
    "read_keys",
    "remove_adapter_name",
    "scan",
]

_LAZY = {
    "Checkpoint": "checkpoints.scan",
    "Tensor": "checkpoints.scan",
    "read_keys": "checkpoints.scan",
    "scan": "checkpoints.scan",
    "AdapterCheck": "preflight.checks",
    "Finding": "preflight.checks",
    "check_adapter": "preflight.checks",
    "check_base": "preflight.checks",
    "check_many": "preflight.checks",
}


def __getattr__(name: str) -> object:
    if name == "__version__":
        # From the installed distribution's metadata, which both wheels (compiled and pure) get
        # from Cargo.toml's version; read on first use because importlib.metadata is slow to import.
        from importlib.metadata import version

        globals()[name] = value = version("fastkeys")
        return value
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastkeys' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
