"""The framework's ablation variants (attention over taps, class adversary on or off): one list for the demo,
the ablation, run tags and the CLI.
"""

from __future__ import annotations

from pipeline.config import Config, with_values

VARIANTS: dict[str, tuple[bool, bool]] = {
    "baseline": (False, False),
    "+attention": (True, False),
    "+adversary": (False, True),
    "+both": (True, True),
}
"""Variant name -> (attention on, adversary on). The baseline is the last layer alone with the plain DML loss."""


def with_variant(cfg: Config, variant: str) -> Config:
    """The same config with the framework's parts switched as the variant says."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    attention, adversary = VARIANTS[variant]
    return with_values(cfg, {"model.attention.enabled": attention, "model.adversary.enabled": adversary})


def variant_of(cfg: Config) -> str:
    """The variant a config is."""
    parts = (cfg.model.attention.enabled, cfg.model.adversary.enabled)
    return next(name for name, flags in VARIANTS.items() if flags == parts)


def slug(variant: str) -> str:
    """The variant as it goes into run names ('+both' -> 'both')."""
    return variant.lstrip("+")
