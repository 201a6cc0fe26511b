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
import re
import sys
from collections.abc import Mapping

__all__ = ["Version", "installed_peft", "parse", "resolve"]

# A release as comparable numbers: "0.20.0" is (0, 20, 0).
Version = tuple[int, ...]


def parse(text: object, source: str = "peft_version") -> Version:
    """The release numbers at the start of a version string: "0.21.0", "0.21.0.dev0",
    "0.21.0rc1" and "0.21.0+local" are all (0, 21, 0) (a pre-release is read as its release: it
    carries its changes). A release has at least two numbers and ends at the string's end or at a
    suffix that starts with a letter, `+`, `-` or `_`: "0..21", "0.-1", "0,21", "0x21" or "1e9"
    are a ValueError naming `source`, never an old release."""
    if not isinstance(text, str):
        raise TypeError(f"{source} must be a version string such as '0.21.0', not {type(text).__name__}")
    found = _release_pattern().match(text.strip())
    if found is None:
        raise ValueError(f"{source} must be a version string such as '0.21.0', not {text[:40]!r}")
    return tuple(int(part) for part in found.group(1).split("."))


@functools.cache
def _release_pattern() -> re.Pattern[str]:
    # at most 9 digits a number: no huge ints from a stranger's config
    return re.compile(r"v?(\d{1,9}(?:\.\d{1,9})+)(?=$|[+\-_]|\.?[A-Za-z])")


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
    found = _distribution_version()
    return found if isinstance(found, str) else None


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
        try:
            return parse(installed, "the installed peft's version")
        except ValueError:
            return None  # a build that says no release ("unknown"): the newest rules
    saved = _config_version(config)
    if isinstance(saved, str):
        try:
            return parse(saved, "the config's peft_version")
        except ValueError:
            return None  # a hand-written config: the newest rules
    return None
