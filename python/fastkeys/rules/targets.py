"""PEFT's target selection, as preflight reads it from names alone: `target_modules` (a string is
`re.fullmatch`ed, by the linear-time engine; a list entry matches a whole dotted suffix), the layer index
of `layers_to_transform`/`layers_pattern`, and what `all-linear` takes by name. (Loading does not
guess: it runs PEFT's own matcher, `fastkeys.integrations.loader.plan`.)"""

from __future__ import annotations


def selects(target: object, name: str) -> bool:
    """PEFT's rule: a string is `re.fullmatch`ed against the module name (here by the linear-time
    engine, so that a hostile `(.+)+X` costs linear time), a list entry matches a whole
    dotted suffix."""
    from fastkeys.rules.expressions import user_regex

    if isinstance(target, str):
        return user_regex(target, "target_modules", (r"^(?:{})$", r"\A(?:{})\Z")).search(name)
    if not isinstance(target, (list, tuple, set, frozenset)) or not all(isinstance(t, str) for t in target):
        raise ValueError(f"target_modules must be a str or a list of str, not {type(target).__name__}")
    return any(name == t or name.endswith("." + t) for t in target)


def all_linear_takes(name: str) -> bool:
    """Whether PEFT's `target_modules="all-linear"` takes a module with a 2-D weight, by its name:
    every `nn.Linear` but the output layer (`lm_head`) and the embeddings."""
    last = name.rsplit(".", 1)[-1]
    return last != "lm_head" and "embed" not in last and last not in ("wte", "wpe")


def in_layers(config: dict[str, object], name: str) -> bool:
    """PEFT's `layers_to_transform`/`layers_pattern` for list targets: the module's layer index
    (the first numbered segment, or the one after a `layers_pattern`) must be listed."""
    from fastkeys.rules.expressions import regex_for_engine, user_regex

    wanted = config.get("layers_to_transform")
    if wanted is None or wanted == []:
        return True
    patterns = config.get("layers_pattern") or []
    if isinstance(patterns, str):
        patterns = [patterns]
    # PEFT's expressions, run by the linear-time engine; group 1 is the index (`\d` is ASCII here).
    found = None
    if not patterns:
        found = regex_for_engine(r"^.*?\.[^.]*\.([0-9]+)\.", r"\A.*?\.[^.]*\.([0-9]+)\.").group(name)
    for pattern in patterns:  # type: ignore[attr-defined]
        # Spliced in ungrouped, as PEFT does: `a|b` there splits the whole expression.
        # `re.match` anchors every alternative: the whole is wrapped in `^(?:...)`.
        template = (r"^(?:(?:^|.*?\.){}\.([0-9]+)\.)", r"\A(?:(?:\A|.*?\.){}\.([0-9]+)\.)")
        found = user_regex(pattern, "layers_pattern", template).group(name)
        if found is not None:
            break
    if found is None:
        return False
    index = int(found)
    return index == wanted if isinstance(wanted, int) else index in wanted  # type: ignore[operator]
