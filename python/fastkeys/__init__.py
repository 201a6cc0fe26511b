"""fastkeys: which state-dict keys matter when PEFT adapters are loaded.

`filter_missing` keeps the missing keys that belong to the adapter being loaded and drops the
rest (base-model keys, other adapters' keys, references to shared tensors). `KeyMatcher` is the
compiled engine behind it. `IMPLEMENTATION` says which engine runs: "rust" or "python".
"""

from ._engine import IMPLEMENTATION
from .matching import KeyMatcher, MissingAdapterKeysWarning, filter_missing
from .tuners import METHODS

__all__ = ["IMPLEMENTATION", "METHODS", "KeyMatcher", "MissingAdapterKeysWarning", "filter_missing"]
__version__ = "0.1.0"
