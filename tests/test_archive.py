"""Experiment archives are extracted defensively."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest

from fedkube.api.plan import Plan
from fedkube.tasks import archive as archives
from fedkube.tasks.archive import ArchiveError, build_archive, check_archive, safe_extract


def zipped(*members: tuple[str, bytes, int | None]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("plan.yaml", "task: digits-logreg\n")
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode is not None:
                info.external_attr = mode << 16
            z.writestr(info, data)
    return buffer.getvalue()


@pytest.mark.parametrize(("member", "mode", "reason"), [
    ("../escape.py", None, "parent-directory"),
    ("a/../../escape.py", None, "parent-directory"),
    ("/etc/passwd", None, "absolute"),
    ("link", stat.S_IFLNK | 0o777, "links and device"),
    ("dev", stat.S_IFCHR | 0o600, "links and device"),
])
def test_hostile_members_are_refused(tmp_path: Path, member: str, mode: int | None,
                                     reason: str) -> None:
    data = zipped((member, b"x", mode))
    with pytest.raises(ArchiveError, match=reason):
        safe_extract(data, tmp_path / "out")
    with pytest.raises(ArchiveError, match=reason):
        check_archive(data)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_zip_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archives, "MAX_TOTAL_BYTES", 10 << 20)
    bomb = zipped(("zeros.bin", bytes(64 << 20), None))
    assert len(bomb) < 200_000  # small on the wire, 64 MiB unpacked
    with pytest.raises(ArchiveError, match="expands past"):
        safe_extract(bomb, tmp_path)


def test_good_archive_round_trips(tmp_path: Path) -> None:
    data = build_archive(Plan(task="archive:mytask", rounds=3), {"mytask.py": b"x = 1\n"})
    assert check_archive(data).rounds == 3
    files = safe_extract(data, tmp_path)
    assert sorted(p.name for p in files) == ["mytask.py", "plan.yaml"]


def test_not_a_zip_and_missing_plan() -> None:
    with pytest.raises(ArchiveError, match="not a zip"):
        check_archive(b"garbage")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("other.txt", "x")
    with pytest.raises(ArchiveError, match=r"no plan\.yaml"):
        check_archive(buffer.getvalue())
