"""What a trainer leaves on disk holds no pickle: a replaced pickle file would run code when loaded."""

from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = (".pkl", ".pt", ".bin", ".pth")


def assert_no_pickles(output_dir: Path) -> None:
    """No pickle-format file anywhere under a stage's `output_dir` (checkpoints, final model, caches), and at
    least one checkpoint was looked at."""
    files = [p for p in output_dir.rglob("*") if p.is_file()]
    pickles = [str(p.relative_to(output_dir)) for p in files if p.suffix in PICKLE_SUFFIXES]
    assert not pickles, f"pickle files in {output_dir}: {pickles}"
    assert any(p.parent.parent.name == "checkpoints" for p in files), f"no checkpoint under {output_dir}"
