"""``viscy infer``'s output file: created exclusively, never through a link, never replacing a file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from viscy.errors import DataError
from viscy.serve.client import check_new_output, partial_path, write_output

STAIN = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
MASKS = np.eye(8, dtype=np.int32)


@pytest.mark.parametrize("name", ["out.npz", "out.npy", "out.tif"])
def test_writes_a_new_file_and_leaves_no_partial(tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    arrays = {"stain": STAIN} if name.endswith(".npy") else {"stain": STAIN, "masks": MASKS}
    write_output(out, arrays)
    if name.endswith(".npz"):
        with np.load(out) as got:
            assert np.array_equal(got["stain"], STAIN) and np.array_equal(got["masks"], MASKS)
    elif name.endswith(".npy"):
        assert np.array_equal(np.load(out), STAIN)
    else:
        with tifffile.TiffFile(out) as tif:
            assert np.array_equal(tif.series[0].asarray(), STAIN)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    before = out.read_bytes()
    with pytest.raises(DataError, match="exists and is never replaced"):
        write_output(out, {"stain": MASKS})
    assert out.read_bytes() == before


def test_a_link_at_the_partial_path_is_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out.npz"
    partial_path(out).symlink_to(victim)
    with pytest.raises(DataError, match="is a symbolic link; viscy infer never writes through a link"):
        write_output(out, {"stain": STAIN})
    assert victim.read_text() == "precious"
    assert partial_path(out).is_symlink() and not os.path.lexists(out)

    # a dangling link would create its target if followed
    missing = tmp_path / "created_through_link.npz"
    partial_path(out).unlink()
    partial_path(out).symlink_to(missing)
    with pytest.raises(DataError, match="symbolic link"):
        write_output(out, {"stain": STAIN})
    assert not os.path.lexists(missing) and not os.path.lexists(out)


def test_a_dangling_link_at_the_output_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.npz"
    out = tmp_path / "out.npz"
    out.symlink_to(target)
    with pytest.raises(DataError, match="exists and is never replaced"):
        check_new_output(out)
    with pytest.raises(DataError, match="exists and is never replaced"):
        write_output(out, {"stain": STAIN})
    assert not os.path.lexists(target) and out.is_symlink()
    assert not os.path.lexists(partial_path(out))


def test_a_stale_partial_is_refused_and_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "out.tif"
    partial_path(out).write_bytes(b"left by a killed run")
    with pytest.raises(DataError, match="left by a viscy infer that was interrupted.*Remove it"):
        write_output(out, {"stain": STAIN})
    assert partial_path(out).read_bytes() == b"left by a killed run"
    assert not os.path.lexists(out)


def test_without_hard_links_the_answer_is_copied_into_a_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No filesystem without hard links can be mounted by an unprivileged test: os.link fails as exFAT's does.
    def no_hard_links(src: Path, dst: Path, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    out = tmp_path / "out.npz"
    write_output(out, {"stain": STAIN, "masks": MASKS})
    with np.load(out) as got:
        assert np.array_equal(got["stain"], STAIN) and np.array_equal(got["masks"], MASKS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]


def test_without_hard_links_a_file_that_appears_meanwhile_is_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.npy"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")

    def another_writer_then_no_hard_links(src: Path, dst: Path, **kwargs: object) -> None:
        Path(dst).write_text("another writer's")  # the race the exclusive create must lose safely
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "link", another_writer_then_no_hard_links)
    with pytest.raises(DataError, match="appeared while the answer was written; it is never replaced"):
        write_output(out, {"stain": STAIN})
    assert out.read_text() == "another writer's"
    assert not os.path.lexists(partial_path(out))

    # and a link that appears there is not followed either
    out.unlink()

    def link_appears_then_no_hard_links(src: Path, dst: Path, **kwargs: object) -> None:
        Path(dst).symlink_to(victim)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", link_appears_then_no_hard_links)
    with pytest.raises(DataError, match="never replaced"):
        write_output(out, {"stain": STAIN})
    assert victim.read_text() == "precious" and out.is_symlink()
