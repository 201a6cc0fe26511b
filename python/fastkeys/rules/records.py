"""The PEFT methods as data: one record per method, read by every part of fastkeys.

Taken from PEFT 0.21 (`register_peft_method` calls, each tuner's `prefix` and layer classes). A
method's adapter tensors live in segments that start with its prefix; a few model-level shared
tensors do not start with it and are listed as exact names. Prompt-learning methods keep their
tensors under `prompt_encoder`, which is never reported as missing by a load, so they contribute
no prefix. The matcher (native or pure) receives the selection and the renames as data
(`patterns`); preflight reads the shape rules; the CLI asks the matcher which method a key has.

Adding a method is one `Method(...)` line below, and its tests.
"""

from __future__ import annotations

import enum
import functools
import sys

__all__ = [
    "ALWAYS",
    "METHODS",
    "MODEL_PREFIX",
    "MODEL_ROOT",
    "SHARED_COPIES",
    "WRAPPERS",
    "Harmless",
    "Method",
    "harmless_candidates",
    "harmless_segments",
    "known_methods",
    "patterns",
    "per_category",
    "resolve",
]

# A dimension of an expected tensor shape: "out" and "in" of the base weight ([out, in] for a
# Linear; an Embedding's [num, dim] is read as in=num, out=dim), "r" the adapter's rank (the same
# in every tensor of a module), or a fixed size.
Dim = str | int
Shapes = dict[str, tuple[Dim, ...]]
# A PEFT release as numbers, (0, 21) (fastkeys.rules.versions reads them).
Release = tuple[int, ...]


class Harmless:
    """Tensors whose absence is harmless on some PEFT releases: `since` (included) to `until`
    (excluded), each None for no bound. There the releases rebuild them at load and read none from
    the checkpoint, yet `load_state_dict` reports them missing. `unless`: a config flag that, when
    true, has PEFT save and read them, so that they matter again; a caller that passes no config
    gets the safe answer (they matter)."""

    __slots__ = ("segments", "since", "unless", "until")

    def __init__(
        self,
        segments: tuple[str, ...],
        *,
        since: Release | None = None,
        until: Release | None = None,
        unless: str | None = None,
    ) -> None:
        self.segments = segments
        self.since = since
        self.until = until
        self.unless = unless

    def holds(self, release: Release | None) -> bool:
        """Whether the rule holds on `release`; None (unknown) is the newest release."""
        if release is None:
            return self.until is None
        return (self.since is None or release >= self.since) and (self.until is None or release < self.until)

    def _fields(self) -> tuple[object, ...]:
        return (self.segments, self.since, self.until, self.unless)

    def __repr__(self) -> str:
        return (
            f"Harmless({self.segments!r}, since={self.since!r}, until={self.until!r}, unless={self.unless!r})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Harmless) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())


class Method:
    """One PEFT method and all of its tensor rules.

    `name`: PeftType in lower case. `prefix`: the start of its tensor segments (`lora_`).
    `exact`: model-level tensors whose names lack the prefix (`vera_A`). `shared`: tensors that
    live once at model level (`base_model.vera_A.<name>`) and that every layer also shows as a
    reference (`...q_proj.vera_A.<name>`); the references are never saved. `suffixes`: (segment,
    parameter) pairs saved without their parameter (DoRA's `L.lora_magnitude_vector` is
    `L.lora_magnitude_vector.<name>.weight` in the model). `shapes` / `embedding_shapes`: tensor
    segment -> expected shape on a Linear / Embedding base weight, checked by `check_base`.
    `kronecker`: the two factors (LoKr's `lokr_w1`, `lokr_w2`; each may be saved as the product
    of `<factor>_a` and `<factor>_b`) whose Kronecker product has the base weight's shape.
    `ranks`: tensor segment -> its number of dimensions, or "base" for as many as the base weight
    (Linear 2, ConvNd N + 2); a saved tensor of another rank is `degenerate` (ZeRO-3 saves the
    parameters it did not gather as 1-D or empty placeholders). `zero_factors`: tensors that make
    their module's update zero when all zero (a factor of a product, or the update itself); PEFT
    initialises one of them to zero, so an untrained adapter has them zero. `standalone`: tensors
    that change the output even then (DoRA's magnitude). `harmless`: tensors that some PEFT
    releases rebuild at load (see Harmless). `per_category`: model-level tensors kept once per
    category of layer, `base_model.<segment>.<category>.<name>` (FRoD's `frod_V`): the name
    follows the category, not the segment.
    """

    __slots__ = (
        "embedding_shapes",
        "exact",
        "harmless",
        "kronecker",
        "name",
        "per_category",
        "prefix",
        "prompt_learning",
        "ranks",
        "shapes",
        "shared",
        "standalone",
        "suffixes",
        "zero_factors",
    )

    def __init__(
        self,
        name: str,
        prefix: str,
        *,
        exact: tuple[str, ...] = (),
        shared: tuple[str, ...] = (),
        prompt_learning: bool = False,
        suffixes: tuple[tuple[str, str], ...] = (),
        shapes: Shapes | None = None,
        embedding_shapes: Shapes | None = None,
        kronecker: tuple[str, str] | None = None,
        ranks: dict[str, int | str] | None = None,
        zero_factors: tuple[str, ...] = (),
        standalone: tuple[str, ...] = (),
        harmless: tuple[Harmless, ...] = (),
        per_category: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.prefix = prefix
        self.exact = exact
        self.shared = shared
        self.prompt_learning = prompt_learning
        self.suffixes = suffixes
        self.shapes: Shapes = shapes or {}
        self.embedding_shapes: Shapes = embedding_shapes or {}
        self.kronecker = kronecker
        self.ranks: dict[str, int | str] = ranks or {}
        self.zero_factors = zero_factors
        self.standalone = standalone
        self.harmless = harmless
        self.per_category = per_category

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, field) for field in self.__slots__)

    def __repr__(self) -> str:
        return f"Method({self.name!r}, prefix={self.prefix!r}, exact={self.exact!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Method) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((self.name, self.prefix, self.exact))


def _methods(*methods: Method) -> dict[str, Method]:
    return {method.name: method for method in methods}


# LoRA's tensors on a Linear [out, in] and on an Embedding; DoRA's magnitude spans `out`.
_LORA_SHAPES: Shapes = {"lora_A": ("r", "in"), "lora_B": ("out", "r"), "lora_magnitude_vector": ("out",)}
_LORA_EMBEDDING_SHAPES: Shapes = {
    "lora_embedding_A": ("r", "in"),
    "lora_embedding_B": ("out", "r"),
    "lora_magnitude_vector": ("out",),
}

_LORA_RANKS: dict[str, int | str] = {
    "lora_A": "base",
    "lora_B": "base",
    "lora_embedding_A": 2,
    "lora_embedding_B": 2,
}
_LORA_FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
_HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def _vera_like(name: str) -> Method:
    """VeRA and PVeRA: per-layer scaling vectors `<name>_lambda_b`/`_d` (zero-initialised `b`)
    around the model-level shared projections `<name>_A`/`<name>_B`. Before PEFT 0.21 the saved
    projections (`base_model.vera_A`, without the adapter name) never reach the model's
    `base_model.vera_A.<name>`: every load, complete or not, reports them missing and the model
    keeps the ones it drew from `projection_prng_key` (PEFT itself refuses a checkpoint without
    them)."""
    vectors = (f"{name}_lambda_b", f"{name}_lambda_d")
    projections = (f"{name}_A", f"{name}_B")
    return Method(
        name,
        f"{name}_lambda_",
        exact=projections,
        shared=projections,
        ranks=dict.fromkeys(vectors, 1),
        zero_factors=vectors,
        harmless=(Harmless(projections, until=(0, 21)),),
    )


METHODS: dict[str, Method] = _methods(
    Method(
        "lora",
        "lora_",
        suffixes=(("lora_magnitude_vector", "weight"),),
        shapes=_LORA_SHAPES,
        embedding_shapes=_LORA_EMBEDDING_SHAPES,
        ranks=_LORA_RANKS,
        zero_factors=_LORA_FACTORS,
        standalone=("lora_magnitude_vector",),
    ),
    Method(
        "adalora",
        "lora_",
        shapes={"lora_A": ("r", "in"), "lora_B": ("out", "r"), "lora_E": ("r", 1)},
        embedding_shapes=_LORA_EMBEDDING_SHAPES,
        ranks={**_LORA_RANKS, "lora_E": 2},
        zero_factors=(*_LORA_FACTORS, "lora_E"),
    ),
    Method("adamss", "adamss_"),
    Method("adaption_prompt", "adaption_prompt_"),
    Method("beft", "beft_"),
    Method("boft", "boft_"),
    Method("c3a", "c3a_"),
    Method("deft", "deft_"),
    Method("delora", "delora_", zero_factors=("delora_A", "delora_B")),
    Method("fourierft", "fourierft_", zero_factors=("fourierft_spectrum",)),
    # The projections, when `save_projection` keeps them: PEFT reports them missing when the
    # checkpoint lacks them, and the model then holds the ones it recomputed from the base weights.
    Method("frod", "frod_", per_category=("frod_V", "frod_s_indices", "frod_s_size")),
    Method("glora", "glora_"),
    Method("gralora", "gralora_"),
    Method("hira", "hira_", zero_factors=("hira_A", "hira_B")),
    Method("hra", "hra_"),
    Method("ia3", "ia3_", ranks={"ia3_l": "base"}),
    Method("lily", "lily_"),
    Method("ln_tuning", "ln_tuning_"),
    Method(
        "loha",
        "hada_",
        shapes={
            "hada_w1_a": ("out", "r"),
            "hada_w1_b": ("r", "in"),
            "hada_w2_a": ("out", "r"),
            "hada_w2_b": ("r", "in"),
        },
        ranks=dict.fromkeys(_HADA, 2),
        zero_factors=_HADA,
    ),
    Method(
        "lokr",
        "lokr_",
        kronecker=("lokr_w1", "lokr_w2"),
        ranks={**dict.fromkeys(_LOKR, 2), "lokr_w2": "base"},
        zero_factors=_LOKR,
    ),
    Method("miss", "miss_"),
    Method("oft", "oft_"),
    Method("osf", "osf_"),
    Method("peanut", "peanut_"),
    Method("poly", "poly_"),
    Method("psoft", "psoft_"),
    _vera_like("pvera"),
    Method("randlora", "randlora_"),
    Method("road", "road_"),
    Method("shadow", "shadow_"),
    Method("shira", "shira_", zero_factors=("shira_weight",)),
    Method("supertuning", "supertuning_"),
    # Before 0.21 the projections are persistent buffers even when `save_projection=False`
    # leaves them out of the checkpoint: they are redrawn from the seed at load.
    Method(
        "tinylora",
        "tinylora_",
        shared=("tinylora_v",),
        harmless=(Harmless(("tinylora_P",), until=(0, 21), unless="save_projection"),),
    ),
    Method("trainable_tokens", "trainable_tokens_"),
    # Likewise the indices and scales before 0.21, unless `save_indices` saved them.
    Method(
        "unilora",
        "unilora_",
        shared=("unilora_theta_d",),
        harmless=(
            Harmless(
                ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"),
                until=(0, 21),
                unless="save_indices",
            ),
        ),
    ),
    Method("vblora", "vblora_", shared=("vblora_vector_bank",)),
    _vera_like("vera"),
    Method("waveft", "waveft_", zero_factors=("waveft_spectrum",)),
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
# Of those, the ones that wrap a whole module copy: `M.modules_to_save.<name>.weight` in the model
# is saved as `M.weight`, so the segment is dropped together with the adapter name.
WRAPPERS: tuple[str, ...] = ("modules_to_save",)

# PEFT's model root: a PeftModel's keys start with `base_model` (its tuner), and those of the
# wrapped model with `base_model.model.`. Model-level tensors sit right under the root
# (`base_model.vera_A.<name>`); the matcher receives the root as data.
MODEL_ROOT = "base_model"
MODEL_PREFIX = f"{MODEL_ROOT}.model."

# Every method's shared tensors (see Method.shared).
SHARED_COPIES: tuple[str, ...] = tuple(name for method in METHODS.values() for name in method.shared)


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


# (prefixes, exact names, shared names, suffixes) that select and rename some methods' tensors:
# what a matcher is built from (with ALWAYS among the exact names and WRAPPERS as wrappers).
Patterns = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[tuple[str, str], ...]]


def patterns(method: Method | None) -> Patterns:
    """What selects and renames a method's tensors; None selects every method. Computed once
    per method (and per state of PEFT's registry): filter_missing asks per call."""
    if method is not None:
        return _patterns((method,))
    extra = _registered_at_run_time()
    return _patterns(tuple(METHODS.values()) + tuple(extra.values()) if extra else ())


@functools.lru_cache(maxsize=256)
def _patterns(methods: tuple[Method, ...]) -> Patterns:
    chosen = methods or tuple(METHODS.values())
    prefixes: dict[str, None] = {}
    exact: dict[str, None] = {}
    shared: dict[str, None] = {}
    suffixes: dict[tuple[str, str], None] = {}
    for each in chosen:
        if not each.prompt_learning:
            prefixes[each.prefix] = None
            exact.update(dict.fromkeys(each.exact))
            shared.update(dict.fromkeys(each.shared))
            suffixes.update(dict.fromkeys(each.suffixes))
    exact.update(dict.fromkeys(ALWAYS))
    return tuple(prefixes), tuple(exact), tuple(shared), tuple(suffixes)


def _chosen(method: Method | None) -> tuple[Method, ...]:
    if method is not None:
        return (method,)
    return tuple(METHODS.values())  # methods registered at run time carry no such rules


@functools.lru_cache(maxsize=256)
def harmless_candidates(method: Method | None) -> frozenset[str]:
    """Every segment that a version-scoped rule of the method (None: of any method) names."""
    return frozenset(name for each in _chosen(method) for rule in each.harmless for name in rule.segments)


@functools.lru_cache(maxsize=256)
def harmless_segments(
    method: Method | None, release: Release | None, unset: frozenset[str] = frozenset()
) -> frozenset[str]:
    """The segments whose missing tensors are harmless on `release` (None: the newest), for a
    config whose flags in `unset` are known to be false (see Harmless.unless)."""
    found: set[str] = set()
    for each in _chosen(method):
        for rule in each.harmless:
            if rule.holds(release) and (rule.unless is None or rule.unless in unset):
                found.update(rule.segments)
    return frozenset(found)


def per_category(method: Method | None) -> tuple[str, ...]:
    """The per-category model-level segments of a method (see Method.per_category)."""
    return tuple(segment for each in _chosen(method) for segment in each.per_category)
