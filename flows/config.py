"""The pipeline config, as the flows and the CLI see it.

The config itself lives in `schemas/config.py`, below the tasks that read it (tasks never import flows). This
module re-exports it and renders the reference config:

    python -m flows.config --reference > configs/reference.yaml
"""

from __future__ import annotations

import sys

from schemas.config import (
    AUTO_LENGTHS,
    STAGE_ORDER,
    TINY_BASE,
    USER_TRACKING_URI,
    ConfigError,
    DatasetSource,
    PipelineConfig,
    apply_override,
    canonical_hash,
    dump_config,
    load_config,
    parse_config,
)
from schemas.reference_config import render_reference_config

__all__ = [
    "AUTO_LENGTHS",
    "STAGE_ORDER",
    "TINY_BASE",
    "USER_TRACKING_URI",
    "ConfigError",
    "DatasetSource",
    "PipelineConfig",
    "apply_override",
    "canonical_hash",
    "dump_config",
    "load_config",
    "parse_config",
    "render_reference_config",
]

if __name__ == "__main__":
    if sys.argv[1:] == ["--reference"]:
        sys.stdout.write(render_reference_config())
    else:
        sys.exit("usage: python -m flows.config --reference")
