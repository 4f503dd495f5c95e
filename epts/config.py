"""Typed configuration with the defaults of METHOD.md and PROTOCOL.md; loadable from YAML/JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from .importance import Pattern


@dataclass
class CalibConfig:
    """Calibration windows: PROTOCOL.md's standard is 32 windows of 256 tokens, seed 0."""

    nsamples: int = 32
    seqlen: int = 256
    seed: int = 0
    batch_size: int = 8  # windows per forward pass while propagating streams

    def __post_init__(self):
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")


@dataclass
class PruneConfig:
    """A single-sparsity baseline run."""

    method: str = "wanda"
    pattern: Pattern = dataclasses.field(default_factory=lambda: Pattern(sparsity=0.5))
    calib: CalibConfig = dataclasses.field(default_factory=CalibConfig)


def load_config_file(path: str | Path) -> dict:
    """A YAML or JSON mapping of config fields."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of field names to values")
    return data

