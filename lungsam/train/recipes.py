"""Named training recipes for ``lungsam train --recipe NAME`` (torch-free).

A recipe is a set of :class:`~lungsam.train.config.TrainConfig` values applied before the user's explicit options:
an option given on the command line always wins, and the run records the recipe's name and the values it set
(``run.json``: ``config.recipe``, ``config.recipe_values``). Edit a recipe here, in its one dict; the tests build a
valid ``TrainConfig`` from every recipe.

* ``recommended``: today's best measured recipe (results/README.md, results/montgomery_cv5, results/quality):
  LiteMedSAM, learned point prompts (3 per lung), Adam lr 1e-4, the threshold swept 0.05-0.95 and the mask
  clean-up chosen on validation. 5-fold test F1 0.979 Montgomery, 0.960 Shenzhen (2-core CPU, 2026-11-27); run
  as this recipe on the same Montgomery folds 0.9790, HD95 3.4 px (results/montgomery_cv5/recommended_cv5,
  2026-12-01). Capping it at 15 epochs transfers +0.001 better to Shenzhen but costs 0.0008 in-domain: not taken.
* ``paper``: Carvalho & Almeida, CIARP 2024, as ``lungsam reproduce`` runs it (lungsam/reproduce/paper.py and
  protocol.py): SAM ViT-B (its weights are not downloadable: pass ``--checkpoint sam_vit_b_01ec64.pth``), learned
  point prompts (3 per lung), the grid's chosen lr 1e-5 and weight decay 0, at most 100 epochs with patience 15,
  batch 8, 5 folds, the paper's threshold range 0.50-0.70 and no mask clean-up.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import ArgumentError
from .config import DEFAULT_THRESHOLDS, TrainConfig

#: Today's best measured recipe: edit this dict when a measured option beats it (say where it was measured).
RECOMMENDED: dict[str, Any] = {
    "backbone": "lite_medsam",  # +0.013 F1 over MobileSAM, 27 of 28 images (results/options/montgomery_split0)
    "prompt": "points",
    "points_per_lung": 3,       # 5 per lung: -0.0007, within noise (same split)
    "lr": 1e-4,                 # +0.003 over 1e-5 with LiteMedSAM (same split)
    "weight_decay": 0.0,
    "thresholds": DEFAULT_THRESHOLDS,  # 0.05-0.95: the choice is no longer at the sweep's edge (issue 22)
    "cleanup": "validation",
}

#: The paper's settings, as lungsam reproduce uses them (reproduce/paper.py GRID_BEST and THRESHOLD_RANGE,
#: reproduce/protocol.py Settings; tests/test_recipes.py checks they agree).
PAPER: dict[str, Any] = {
    "backbone": "vit_b",
    "prompt": "points",
    "points_per_lung": 3,
    "lr": 1e-5,
    "weight_decay": 0.0,
    "epochs": 100,
    "patience": 15,
    "batch_size": 8,
    "folds": 5,
    "thresholds": (0.50, 0.55, 0.60, 0.65, 0.70),
    "cleanup": "off",
}


@dataclass(frozen=True)
class Recipe:
    """A named set of :class:`TrainConfig` values; ``summary``: one line for ``--help`` and error messages."""

    name: str
    summary: str
    values: Mapping[str, Any]


RECIPES: Mapping[str, Recipe] = MappingProxyType({
    "recommended": Recipe("recommended", "LiteMedSAM, 3 learned points per lung, lr 1e-4, thresholds 0.05-0.95, "
                                         "clean-up chosen on validation (5-fold F1 0.979 MC, 0.960 SZ)",
                          MappingProxyType(RECOMMENDED)),
    "paper": Recipe("paper", "Carvalho & Almeida 2024: SAM ViT-B (--checkpoint), 3 points per lung, lr 1e-5, 100 "
                             "epochs, patience 15, batch 8, thresholds 0.50-0.70, no clean-up",
                    MappingProxyType(PAPER)),
})


def recipe_list() -> str:
    """Every recipe with its summary, one per line (for ``--help`` and the error of an unknown name)."""
    return "\n".join(f"  {r.name}: {r.summary}" for r in RECIPES.values())


def get_recipe(name: str) -> Recipe:
    """The recipe ``name``; :class:`ArgumentError` listing the recipes when there is none of that name."""
    if name not in RECIPES:
        raise ArgumentError(f"--recipe {name!r}: choose one of\n{recipe_list()}")
    return RECIPES[name]


def apply_recipe(name: str | None, given: Mapping[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The :class:`TrainConfig` keyword arguments of a run: ``given`` (every option's value, defaults included)
    with recipe ``name``'s values put in for the fields the user did not set (``explicit``: the names they gave).

    The result also holds ``recipe`` (the name) and ``recipe_values`` (what it set, JSON-ready: tuples as lists);
    without a recipe it is ``given`` unchanged."""
    if name is None:
        return dict(given)
    recipe = get_recipe(name)
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(recipe.values) - known
    if unknown:  # a mistyped key in the dicts above
        raise ValueError(f"recipe {name!r}: TrainConfig has no field {', '.join(sorted(unknown))}")
    applied = {k: v for k, v in recipe.values.items() if k not in explicit}
    return {**given, **applied, "recipe": name,
            "recipe_values": {k: list(v) if isinstance(v, tuple) else v for k, v in applied.items()}}


def recipe_config(name: str, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of recipe ``name`` with ``overrides`` given explicitly (the Python API of
    ``lungsam train --recipe NAME --opt value ...``)."""
    base = {f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig)
            if f.name not in ("recipe", "recipe_values")}
    return TrainConfig(**apply_recipe(name, {**base, **overrides}, set(overrides)))
