"""A run's settings: layers merged into a `TrainConfig` and checked against what they name.

    config = make_config({"shards": "OUT", "run_dir": "RUN", "method": "ogm_ge"})

The check needs the balancing-method registry (is the method known, does it read a held-out
stream), and the methods read the configuration (G-Blending builds an optimizer from it), so
it cannot live in avtrain.config without a circle: config.py is the dataclass and the checks
that need nothing else, this module looks the method up and runs them.
"""

from __future__ import annotations

import os

from .balance import get_method
from .config import TrainConfig, check, load_yaml, merge
from .recipes import load_recipe
from .rundir import resume_dir


def make_config(*layers: dict) -> TrainConfig:
    """Merge layers of settings left to right (later wins) over the defaults, then check."""
    config = merge(*layers)
    check(config, get_method(config.method))
    return config


def cli_config(overrides: dict, config_file: str | None = None,
               resume: str | None = None) -> TrainConfig:
    """Merge for `avtrain fit`: the recipe's settings, then RUN/config.yaml when resuming, then
    --config, then the flags the user actually typed (`overrides` holds only those)."""
    layers = []
    if resume:
        run = resume_dir(resume)
        saved = os.path.join(run, "config.yaml")
        if os.path.isfile(saved):
            # a run recorded before `sampling` existed streamed with replacement: resume it so
            layers.append({"sampling": "resample", **load_yaml(saved)})
        layers.append({"run_dir": run})
    if config_file:
        layers.append(load_yaml(config_file))
    layers.append(overrides)
    recipe = next((layer["recipe"] for layer in reversed(layers) if layer.get("recipe")), None)
    if recipe:
        layers.insert(0, {**load_recipe(recipe).settings, "recipe": recipe})
    return make_config(*layers)
