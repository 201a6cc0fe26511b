"""Which PEFT release's rules apply: the one that loads the adapter.

A few rules hold only for some PEFT releases (`records.Harmless`). The release is, in order: the
`peft_version=` a caller passes; the installed PEFT (its `__version__` when it is imported, else
its distribution metadata, read without importing it); the `peft_version` of an
adapter_config.json dict when no PEFT is installed; else none, and the newest rules apply.

The lookup runs on first use, and only for a method that has version-scoped rules:
`importlib.metadata` costs more than `import fastkeys` itself.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping

__all__ = ["Version", "installed_peft", "parse", "resolve"]

# A release as comparable numbers: "0.20.0" is (0, 20, 0).
Version = tuple[int, ...]


def parse(text: object, source: str = "peft_version") -> Version:
    """The release numbers at the start of a version string: "0.21.0", "0.21.0.dev0" and
    "0.21.0rc1" are all (0, 21, 0) (a pre-release is read as its release: it carries its
    changes)."""
    if not isinstance(text, str):
        raise TypeError(f"{source} must be a version string such as '0.21.0', not {type(text).__name__}")
    numbers: list[int] = []
    for part in text.strip().split("."):
        digits = ""
        for character in part:
            if not character.isascii() or not character.isdigit():
                break
            digits += character
        if not digits:
            break
        numbers.append(int(digits))
        if len(digits) < len(part):  # "0rc1": the release ends here
            break
    if not numbers:
        raise ValueError(f"{source} must be a version string such as '0.21.0', not {text!r}")
    return tuple(numbers)


@functools.cache
def _distribution_version() -> str | None:
    from importlib import metadata  # here only: it costs more than `import fastkeys`

    try:
        return metadata.version("peft")
    except metadata.PackageNotFoundError:
        return None


def installed_peft() -> str | None:
    """The version of the PEFT this process loads adapters with, or None without one."""
    module = sys.modules.get("peft")
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    return _distribution_version()


def _config_version(config: object) -> object:
    if isinstance(config, Mapping):
        return config.get("peft_version")
    return getattr(config, "peft_version", None)


def resolve(explicit: object, config: object) -> Version | None:
    """The release whose rules apply (see the module docstring); None: the newest rules."""
    if explicit is not None:
        return parse(explicit)
    installed = installed_peft()
    if installed is not None:
        return parse(installed, "the installed peft's version")
    saved = _config_version(config)
    if isinstance(saved, str):
        try:
            return parse(saved, "the config's peft_version")
        except ValueError:
            return None  # a hand-written config: the newest rules
    return None
