"""Loading PEFT adapters at the adapter's cost, failing closed (the machinery behind `fastkeys.peft`)."""

from ._old import *  # noqa: F403  (transitional: being split into the package's modules)
from ._old import AdapterLoadResult, load_many, load_one, readable_by_peft  # noqa: F401
