"""Recipes: a paper's whole training protocol under one name (`avtrain fit --recipe NAME`).

A recipe is a YAML file shipped beside this module. Its `settings` are `avtrain fit` settings
(the TrainConfig fields; the method's own options under `method_options:`, by their short
names) and sit between the defaults and the user's `--config` file and flags, so any flag
still overrides them (a method option one by one: `--olm-reduction mean` keeps the rest). Its `data` block says which shards the protocol needs
(dataset, preset, the preset parameters that make its tensors the released loader's, the
released class order, the split lists and the val policy the shards must have been built
with): `check_shards` refuses shards built otherwise, in one line that says how to build the
right ones, so nothing trains on a half-configured protocol, and shards written by an older
avprep (before a parameter existed) are read with that parameter's old default and refused
the same way. `differences` lists, in words, what still differs from the released code and
why; `released_reports` what the released run printed beside what `fit` reports; `published`
the numbers to compare with.

    recipe = load_recipe("ogm_ge-cremad")
    config = make_config(recipe.settings, {"shards": "OUT", "run_dir": "RUN"})
    check_shards(recipe, open_shards("OUT").index)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources

import yaml

from avprep.errors import UserError

LEGACY = "legacy"  # the released code picked the best epoch on the test split

# What an index.json written before a preset parameter existed means: the behaviour avprep had
# then (ffmpeg resampled, the STFT padded with zeros, stereo mixed down in float).
PRESET_DEFAULTS = {"resampler": "ffmpeg", "spectrogram.pad_mode": "constant",
                   "mono_mix": "float"}
DATA_KEYS = {"dataset", "preset", "preset_params", "classes", "split_files", "split_source", "val",
             "prepare"}


@dataclass
class Recipe:
    name: str
    summary: str
    paper: str
    code: str
    protocol: str  # "legacy" (best epoch on test, as released), "val" or "folds"
    settings: dict
    data: dict = field(default_factory=dict)
    differences: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)
    released_reports: list[str] = field(default_factory=list)

    @property
    def legacy(self) -> bool:
        return self.protocol == LEGACY

    def describe(self) -> str:
        """The recipe in full, for `avtrain recipes NAME`."""
        lines = [f"{self.name}: {self.summary}", f"  paper: {self.paper}",
                 f"  code:  {self.code}", f"  protocol: {protocol_label(self.protocol)}"]
        if self.data:
            lines.append("  data:")
            lines += [f"    {k}: {v}" for k, v in self.data.items()]
        lines.append("  settings:")
        lines += [f"    {k}: {_flow(v)}" for k, v in self.settings.items()]
        if self.differences:
            lines.append("  still differs from the released code:")
            lines += [f"    - {d}" for d in self.differences]
        if self.released_reports:
            lines.append("  what the released run printed, and what fit reports:")
            lines += [f"    - {r}" for r in self.released_reports]
        if self.published:
            lines.append("  published numbers to compare with:")
            lines += [f"    - {p}" for p in self.published]
        return "\n".join(lines)


def _flow(value) -> str:
    """A mapping as the recipe writes it (`{reduction: sum}`), anything else as it prints."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


def protocol_label(protocol: str | None) -> str:
    """How a table or summary names the model-selection protocol of a run."""
    if protocol == LEGACY:
        return "LEGACY: best epoch chosen on the test split, as the released code does"
    if protocol == "folds":
        return "k-fold cross-validation over train+val; test reported for each fold's best"
    return "best epoch chosen on val; test reported for it"


def _files() -> dict[str, str]:
    folder = resources.files(__name__)
    return {p.name[:-5]: p.name for p in folder.iterdir() if p.name.endswith(".yaml")}


def recipe_names() -> list[str]:
    return sorted(_files())


def load_recipe(name: str) -> Recipe:
    files = _files()
    if name not in files:
        raise UserError(f"unknown recipe {name!r}; choose one of: {', '.join(sorted(files))}")
    text = (resources.files(__name__) / files[name]).read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    unknown = set(data) - {"summary", "paper", "code", "protocol", "settings", "data",
                           "differences", "published", "released_reports"}
    if unknown:  # a shipped file: a typo here is a bug, caught by the tests
        raise ValueError(f"recipe {name}: unknown keys {sorted(unknown)}")
    for key in ("differences", "published", "released_reports"):
        if not all(isinstance(line, str) for line in data.get(key) or []):
            # an unquoted "words: more words" item is a YAML mapping, shown as a dict
            raise ValueError(f"recipe {name}: every item of {key} must be a string")
    block = data.get("data") or {}
    unknown = (set(block) - DATA_KEYS) | (set(block.get("preset_params") or {})
                                          - set(PRESET_DEFAULTS))
    if unknown:
        raise ValueError(f"recipe {name}: unknown data keys {sorted(unknown)}")
    return Recipe(name=name, summary=data["summary"], paper=data["paper"], code=data["code"],
                  protocol=data["protocol"], settings=dict(data["settings"]),
                  data=dict(data.get("data") or {}),
                  differences=list(data.get("differences") or []),
                  published=list(data.get("published") or []),
                  released_reports=list(data.get("released_reports") or []))


def _prepare_hint(recipe: Recipe) -> str:
    return f"; build them with: {recipe.data['prepare']}" if recipe.data.get("prepare") else ""


def preset_param(preset: dict, path: str):
    """A preset parameter of index.json by dotted path (`spectrogram.pad_mode`); absent: the
    default of the avprep that wrote it (PRESET_DEFAULTS), or None."""
    node = preset or {}
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return PRESET_DEFAULTS.get(path)
        node = node[part]
    return node


def check_shards(recipe: Recipe, index: dict, where: str = "shards") -> None:
    """Refuse shards that were not built the way the recipe's protocol needs, in one line."""
    need = recipe.data
    hint = _prepare_hint(recipe)
    dataset = need.get("dataset")
    if dataset and index.get("dataset") != dataset:
        raise UserError(f"recipe {recipe.name} trains on {dataset} shards; {where} hold "
                        f"{index.get('dataset')!r}{hint}")
    preset = need.get("preset")
    have_preset = (index.get("preset") or {}).get("name")
    if preset and have_preset != preset:
        raise UserError(f"recipe {recipe.name} needs the {preset!r} preset; {where} were built "
                        f"with {have_preset!r}{hint}")
    wanted = list(need.get("split_files") or [])
    if wanted:
        built = [os.path.basename(f.get("name", "")) for f in
                 (index.get("args") or {}).get("split_files") or []]
        if sorted(built) != sorted(wanted):
            origin = need.get("split_source", "the paper's repository")
            raise UserError(f"recipe {recipe.name} needs shards built with the split lists "
                            f"{' and '.join(wanted)} (from {origin}); {where} were built with "
                            f"{' and '.join(built) if built else 'no split list'}{hint}")
    splits = index.get("splits") or {}
    if need.get("val") == "none" and (splits.get("val") or {}).get("samples"):
        raise UserError(f"recipe {recipe.name} trains on the whole train list, as released; "
                        f"{where} carve a val split out of it (build with --val-fraction 0)"
                        f"{hint}")
    params = need.get("preset_params") or {}
    wrong = [(k, v, preset_param(index.get("preset"), k)) for k, v in params.items()]
    wrong = [w for w in wrong if w[1] != w[2]]
    if wrong:
        got = ", ".join(f"{k} {have!r} (needs {want!r})" for k, want, have in wrong)
        raise UserError(f"recipe {recipe.name} needs the released inputs; {where} were built "
                        f"with {got}, by an older avprep or another preset{hint}")
    classes = [str(c) for c in need.get("classes") or []]
    have_classes = [str(c) for c in index.get("classes") or []]
    if classes and have_classes != classes:
        if len(classes) <= 8:
            want = ", ".join(f"{c} {i}" for i, c in enumerate(classes))
            have = ", ".join(f"{c} {i}" for i, c in enumerate(have_classes))
        else:  # a long list: the first id that differs
            i = next((i for i, (a, b) in enumerate(zip(classes, have_classes)) if a != b),
                     min(len(classes), len(have_classes)))
            want = f"{len(classes)} classes, {classes[i] if i < len(classes) else '-'} {i}"
            have = (f"{len(have_classes)} classes, "
                    f"{have_classes[i] if i < len(have_classes) else '-'} {i}")
        raise UserError(f"recipe {recipe.name} needs the released class ids ({want}); "
                        f"{where} number them ({have}){hint}")
