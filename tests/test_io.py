"""halo_jax.io: atomic writes leave the old file or the whole new one, and no temporary behind."""

import pytest

from halo_jax import io


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_write_text_and_bytes_replace_and_leave_no_temp(tmp_path):
    path = tmp_path / "a.json"
    io.atomic_write_text(path, "one é")
    assert path.read_text(encoding="utf-8") == "one é"
    io.atomic_write_bytes(path, b"two", durable=True)
    assert path.read_bytes() == b"two"
    assert _listing(tmp_path) == ["a.json"]


def test_temp_names_are_hidden_unique_and_keep_the_suffix_on_request(tmp_path):
    a, b = io.temp_beside(tmp_path / "v.mp4"), io.temp_beside(tmp_path / "v.mp4")
    assert a != b and a.parent == tmp_path and a.name.startswith(".v.mp4.tmp-")
    kept = io.temp_beside(tmp_path / "v.mp4", keep_suffix=True)
    assert kept.name.startswith(".v.tmp-") and kept.suffix == ".mp4"


def test_atomic_path_commits_on_success_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "frames.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(path) as tmp:
            assert tmp.suffix == ".png"
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert path.read_bytes() == b"old" and _listing(tmp_path) == ["frames.png"]
    with io.atomic_path(path, durable=True) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and _listing(tmp_path) == ["frames.png"]


def test_atomic_dir_creates_replaces_and_cleans_up(tmp_path):
    out = tmp_path / "ckpt"
    (tmp_path / ".ckpt.tmp").mkdir()  # a stale folder of a killed run is cleared
    (tmp_path / ".ckpt.tmp" / "junk").write_text("x")
    with io.atomic_dir(out) as tmp:
        tmp.mkdir()
        (tmp / "w").write_text("1")
    assert _listing(out) == ["w"] and _listing(tmp_path) == ["ckpt"]
    with pytest.raises(RuntimeError):
        with io.atomic_dir(out) as tmp:
            tmp.mkdir()
            (tmp / "w").write_text("half")
            raise RuntimeError("export failed")
    assert (out / "w").read_text() == "1" and _listing(tmp_path) == ["ckpt"]
    with io.atomic_dir(out) as tmp:
        tmp.mkdir()
        (tmp / "v").write_text("2")
    assert _listing(out) == ["v"] and _listing(tmp_path) == ["ckpt"]
