"""The Python API's keyword forms: ``slimlm.prune(model, tok, method="wanda", sparsity=0.5)`` builds the same typed
config as ``slimlm.prune(model, tok, PruneConfig(method="wanda", sparsity=0.5))``, so both are refused by the same
rules. Keywords are the config's field names; the names the API used before the configs existed are read too."""
from __future__ import annotations

from dataclasses import MISSING, fields, replace

from slimlm.errors import SlimlmError, closest

RENAMED = {"calib_source": "calib", "sampling": "calib_sampling", "overrides": "override", "mix": "type"}
# old name -> (field, its value from the old one's)
CONVERTED = {"symmetric": ("asym", lambda v: not v), "sequential": ("one_pass", lambda v: not v),
             "compensate": ("no_compensate", lambda v: not v),
             "act_symmetric": ("act_grid", lambda v: None if v is None else "sym" if v else "asym")}
ALLOCATOR_KEYWORDS = {"lamda": "owl_lambda", "epsilon": "alpha_epsilon"}  # allocation_options={...}


def _settings(cls, keywords: dict) -> dict:
    names = {f.name: f for f in fields(cls)}
    settings = {}
    for key, value in keywords.items():
        if key == "allocation_options":
            for option, v in (value or {}).items():
                if option not in ALLOCATOR_KEYWORDS:
                    raise SlimlmError(f"unknown allocation option '{option}'; choose one of lamda (owl), epsilon "
                                      "(alphapruning)")
                settings[ALLOCATOR_KEYWORDS[option]] = v
            continue
        name = RENAMED.get(key, CONVERTED[key][0] if key in CONVERTED else key)
        if name not in names:
            raise SlimlmError(f"unknown setting '{key}'{closest(key, names)} for {cls.__name__}")
        if key in CONVERTED:
            value = CONVERTED[key][1](value)
        elif name == "group_size" and value is None:  # None: one scale per output channel
            value = -1
        elif value is None and names[name].default == "none":  # rotate=None, transform=None
            value = "none"
        settings[name] = value
    return settings


def configure(cls, config=None, keywords: dict | None = None):
    """``config`` (of type ``cls``) with ``keywords`` applied over it, or a new ``cls`` from the keywords alone."""
    if config is not None and not isinstance(config, cls):
        raise SlimlmError(f"expected a {cls.__name__}, got {type(config).__name__}")
    settings = _settings(cls, keywords or {})
    if config is not None:
        return replace(config, **settings)
    missing = [f.name for f in fields(cls) if f.name not in settings and f.default is MISSING]
    if missing:
        raise SlimlmError(f"{cls.__name__} needs {', '.join(missing)}")
    return cls(**settings)
