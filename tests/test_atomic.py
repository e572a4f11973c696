"""Writes that survive a crash: data and names reach the disk before a file or directory appears under its
final name, and every rename-into-place in the project goes through `rlhf_core.atomic`."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from rlhf_core import atomic
from rlhf_core.atomic import atomic_replace_dir, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Records every fsync (by the path it flushes) and rename, in order."""
    record: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    names: dict[int, str] = {}
    real_open = os.open

    def tracked_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        names[fd] = os.fspath(path)
        return fd

    def fsync(fd: int) -> None:
        record.append(("fsync", names.get(fd, os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst) -> None:
        record.append(("replace", os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "open", tracked_open)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return record


def test_a_file_is_flushed_before_its_name_appears_and_the_directory_after(
    tmp_path: Path, calls: list[tuple[str, str]]
) -> None:
    target = tmp_path / "pointer.json"
    atomic_write_text(target, "{}")
    assert target.read_text() == "{}"
    assert [kind for kind, _ in calls] == ["fsync", "replace", "fsync"]
    assert calls[1] == ("replace", str(target)) and calls[2] == ("fsync", str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["pointer.json"]


def test_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic.atomic_open(target) as handle:
        handle.write("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_directory_is_flushed_file_by_file_before_the_rename(tmp_path: Path, calls: list[tuple[str, str]]) -> None:
    """Given an existing `model/` and a new one built in `.tmp-model/`, then every new file and the new
    directory are fsync'd, the rename happens, the parent is fsync'd, and `model/` holds only the new files."""
    final, tmp = tmp_path / "model", tmp_path / ".tmp-model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    (tmp / "sub").mkdir(parents=True)
    (tmp / "weights").write_text("new")
    (tmp / "sub" / "config").write_text("new")
    atomic_replace_dir(tmp, final)
    renamed = calls.index(("replace", str(final)))
    flushed_before = {path for kind, path in calls[:renamed] if kind == "fsync"}
    assert {str(tmp / "weights"), str(tmp / "sub" / "config"), str(tmp / "sub"), str(tmp)} <= flushed_before
    assert ("fsync", str(tmp_path)) in calls[renamed:]
    assert sorted(p.name for p in final.rglob("*")) == ["config", "sub", "weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_every_rename_into_place_goes_through_the_helper() -> None:
    """`os.replace` / `.rename(` outside `rlhf_core/atomic.py` would skip the fsyncs."""
    offenders = []
    for folder in ("rlhf_core", "tasks", "flows", "schemas"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "atomic.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"os\.replace\(|os\.rename\(|\.rename\(|shutil\.move\(", line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
