"""Where an install keeps the historian's files (under ``data_dir/historian/`` unless configured)."""

from __future__ import annotations

from pathlib import Path

from flowline.core.config import FlowlineConfig


def dead_letter_path(config: FlowlineConfig) -> Path:
    """The dead-letter file: ``historian.dead_letter_file`` or ``data_dir/historian/dead-letter.jsonl``."""
    historian = config.historian
    if historian is not None and historian.dead_letter_file is not None:
        return historian.dead_letter_file
    return config.data_dir / "historian" / "dead-letter.jsonl"


def rollup_checkpoint_path(config: FlowlineConfig) -> Path:
    return config.data_dir / "historian" / "rollups.json"
