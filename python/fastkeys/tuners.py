"""The PEFT methods as data: one place, read by whichever implementation runs.

Taken from PEFT 0.21 (`register_peft_method` calls and each tuner's `prefix`). A method's adapter
tensors live in segments that start with its prefix; a few model-level shared tensors do not
start with it and are listed as exact names. Prompt-learning methods keep their tensors under
`prompt_encoder`, which is never reported as missing by a load, so they contribute no prefix.
"""

from __future__ import annotations

import enum
import functools
import sys

__all__ = [
    "ALWAYS",
    "METHODS",
    "SHARED_COPIES",
    "Method",
    "known_methods",
    "resolve",
]


class Method:
    """One PEFT method: its name (PeftType in lower case), the prefix of its tensor names and
    the model-level shared tensors whose names do not start with the prefix."""

    __slots__ = ("exact", "name", "prefix", "prompt_learning")

    def __init__(
        self, name: str, prefix: str, exact: tuple[str, ...] = (), prompt_learning: bool = False
    ) -> None:
        self.name = name
        self.prefix = prefix
        self.exact = exact
        self.prompt_learning = prompt_learning

    def __repr__(self) -> str:
        return f"Method({self.name!r}, prefix={self.prefix!r}, exact={self.exact!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Method) and (
            (self.name, self.prefix, self.exact, self.prompt_learning)
            == (other.name, other.prefix, other.exact, other.prompt_learning)
        )

    def __hash__(self) -> int:
        return hash((self.name, self.prefix, self.exact))


def _methods(*methods: Method) -> dict[str, Method]:
    return {method.name: method for method in methods}


METHODS: dict[str, Method] = _methods(
    Method("lora", "lora_"),
    Method("adalora", "lora_"),
    Method("adamss", "adamss_"),
    Method("adaption_prompt", "adaption_prompt_"),
    Method("beft", "beft_"),
    Method("boft", "boft_"),
    Method("c3a", "c3a_"),
    Method("deft", "deft_"),
    Method("delora", "delora_"),
    Method("fourierft", "fourierft_"),
    Method("frod", "frod_"),
    Method("glora", "glora_"),
    Method("gralora", "gralora_"),
    Method("hira", "hira_"),
    Method("hra", "hra_"),
    Method("ia3", "ia3_"),
    Method("lily", "lily_"),
    Method("ln_tuning", "ln_tuning_"),
    Method("loha", "hada_"),
    Method("lokr", "lokr_"),
    Method("miss", "miss_"),
    Method("oft", "oft_"),
    Method("osf", "osf_"),
    Method("peanut", "peanut_"),
    Method("poly", "poly_"),
    Method("psoft", "psoft_"),
    Method("pvera", "pvera_lambda_", exact=("pvera_A", "pvera_B")),
    Method("randlora", "randlora_"),
    Method("road", "road_"),
    Method("shadow", "shadow_"),
    Method("shira", "shira_"),
    Method("supertuning", "supertuning_"),
    Method("tinylora", "tinylora_"),
    Method("trainable_tokens", "trainable_tokens_"),
    Method("unilora", "unilora_"),
    Method("vblora", "vblora_"),
    Method("vera", "vera_lambda_", exact=("vera_A", "vera_B")),
    Method("waveft", "waveft_"),
    Method("xlora", "xlora_"),
    Method("cartridge", "cartridge_", prompt_learning=True),
    Method("cpt", "cpt_", prompt_learning=True),
    Method("multitask_prompt_tuning", "multitask_prompt_tuning_", prompt_learning=True),
    Method("p_tuning", "p_tuning_", prompt_learning=True),
    Method("prefix_tuning", "prefix_tuning_", prompt_learning=True),
    Method("prompt_tuning", "prompt_tuning_", prompt_learning=True),
)

# Segments that hold adapter tensors under every method (PEFT's ModulesToSaveWrapper and
# TrainableTokensWrapper, which any method can carry).
ALWAYS: tuple[str, ...] = ("modules_to_save", "trainable_tokens_delta")

# Shared tensors that live once at model level (`base_model.vera_A.default`) and that every
# layer also shows as a reference (`...q_proj.vera_A.default`); the references are never saved,
# so they are harmless when missing.
SHARED_COPIES: tuple[str, ...] = (
    "vera_A",
    "vera_B",
    "pvera_A",
    "pvera_B",
    "vblora_vector_bank",
    "tinylora_v",
    "unilora_theta_d",
)


def _registered_at_run_time() -> dict[str, Method]:
    """Methods PEFT knows that the table does not: registered by a newer PEFT or by the user at
    run time. Read only when PEFT is already imported; fastkeys never imports it."""
    mapping_module = sys.modules.get("peft.mapping")
    if mapping_module is None:
        return {}
    mapping = getattr(mapping_module, "PEFT_TYPE_TO_PREFIX_MAPPING", None)
    if not isinstance(mapping, dict):
        return {}
    global _registry_seen
    seen_mapping, seen_size, extra = _registry_seen
    # filter_missing asks on every call; PEFT's registry only grows (re-registering a name is
    # an error there), so its size tells whether anything changed since the last read.
    if seen_mapping is mapping and seen_size == len(mapping):
        return extra
    extra = {}
    for peft_type, prefix in mapping.items():
        name = str(getattr(peft_type, "value", peft_type)).lower()
        if name not in METHODS and isinstance(prefix, str) and prefix and "." not in prefix:
            extra[name] = Method(name, prefix)
    _registry_seen = (mapping, len(mapping), extra)
    return extra


_registry_seen: tuple[object, int, dict[str, Method]] = (None, -1, {})


def known_methods() -> dict[str, Method]:
    """The table plus whatever PEFT registered at run time."""
    extra = _registered_at_run_time()
    return {**METHODS, **extra} if extra else METHODS


def resolve(peft_type: object) -> Method | None:
    """Turns `"lora"`, `"LORA"`, `"LoHa"` or a `peft.PeftType` member into its Method; None
    stays None (every known method)."""
    if peft_type is None:
        return None
    if isinstance(peft_type, enum.Enum):
        peft_type = peft_type.value
    if not isinstance(peft_type, str):
        raise TypeError(
            f"peft_type must be a method name (str), a peft.PeftType or None, not {type(peft_type).__name__}"
        )
    name = peft_type.lower()
    method = METHODS.get(name) or _registered_at_run_time().get(name)
    if method is None:
        known = ", ".join(sorted(known_methods()))
        raise ValueError(f"unknown peft_type {peft_type!r}; known methods: {known}")
    return method


def patterns(method: Method | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (prefixes, exact names) that select a method's tensors; None selects every method.
    Computed once per method (and per state of PEFT's registry): filter_missing asks per call."""
    if method is not None:
        return _patterns((method,))
    extra = _registered_at_run_time()
    return _patterns(tuple(METHODS.values()) + tuple(extra.values()) if extra else ())


@functools.lru_cache(maxsize=256)
def _patterns(methods: tuple[Method, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    chosen = methods or tuple(METHODS.values())
    prefixes: dict[str, None] = {}
    exact: dict[str, None] = {}
    for each in chosen:
        if not each.prompt_learning:
            prefixes[each.prefix] = None
            exact.update(dict.fromkeys(each.exact))
    exact.update(dict.fromkeys(ALWAYS))
    return tuple(prefixes), tuple(exact)
