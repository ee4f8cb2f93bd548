"""Losses and file helpers against brute-force references."""
import os

import pytest
import torch

from utils.files import atomic_path, stable_hash
from utils.loss_utils import scale_loss, tv_loss


def test_tv_loss_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 4, generator=g, dtype=torch.float64)
    b, c, h, w = x.shape
    dh = sum(float(x[i, k, r + 1, s] - x[i, k, r, s]) ** 2
             for i in range(b) for k in range(c) for r in range(h - 1) for s in range(w))
    dw = sum(float(x[i, k, r, s + 1] - x[i, k, r, s]) ** 2
             for i in range(b) for k in range(c) for r in range(h) for s in range(w - 1))
    expected = 2 * (dh / (c * (h - 1) * w) + dw / (c * h * (w - 1))) / b
    assert tv_loss(x).item() == pytest.approx(expected, rel=1e-12)
    assert tv_loss(torch.ones(1, 3, 4, 4)).item() == 0.0


def test_scale_loss_is_mean_of_scales():
    s = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])
    assert scale_loss(s).item() == pytest.approx(3.5)


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(OSError, match=r"could not write .*out.txt \(RuntimeError: disk full\)"):
        with atomic_path(target) as tmp:  # a library's own exception for a failed write names the file
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]


def test_atomic_writes_follow_the_umask(tmp_path):
    """Outputs get the mode any new file would (mkstemp alone gives 0600), folders too, also where the writer is a
    library that creates its files 0600 (safetensors 0.8 does, whatever the umask)."""
    import torch
    from safetensors.torch import save_file

    from utils.files import atomic_folder, atomic_path, current_umask, write_text_atomic
    old = os.umask(0o022)
    try:
        assert current_umask() == 0o022
        write_text_atomic(tmp_path / "a.txt", "x")
        with atomic_folder(tmp_path / "folder") as tmp:
            (tmp / "f").write_text("y")
            (tmp / "sub").mkdir()
            save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "w.safetensors"))
        with atomic_path(tmp_path / "single.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
        os.umask(0o077)
        write_text_atomic(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755 and (tmp_path / "folder" / "f").read_text() == "y"
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "folder" / "sub").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "folder" / "sub" / "w.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "single.safetensors").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "folder", "single.safetensors"]


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_image_grid_tiles_row_by_row_against_a_loop():
    from utils.image_io import image_grid

    g = torch.Generator().manual_seed(0)
    for channels in (3, 1):
        images = torch.rand(5, channels, 3, 4, generator=g)
        grid = image_grid(images, cols=2)
        assert grid.shape == (3, 3 * 3, 2 * 4)  # ceil(5 / 2) rows of 2
        for k in range(6):
            row, col = divmod(k, 2)
            cell = grid[:, row * 3:(row + 1) * 3, col * 4:(col + 1) * 4]
            expected = images[k].expand(3, -1, -1) if k < 5 else torch.zeros(3, 3, 4)  # the last cell: black
            assert torch.equal(cell, expected)
