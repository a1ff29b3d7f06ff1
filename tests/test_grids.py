"""helpers.grids: plain tile grids and comparison sheets (layout, size limit, sheet count, tile pixels, labels)."""
import numpy as np
import pytest
from PIL import Image

from helpers.generate import grids


def _tiles(n, size=(10, 8)):
    return [Image.new("RGB", size, (20 * k, 255 - 20 * k, 7 * k)) for k in range(n)]


def _noise(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_image_grid_layout():
    tiles = _tiles(6)
    grid = grids.image_grid(tiles, rows=2, cols=3)
    assert grid.size == (30, 16)
    for k, tile in enumerate(tiles):
        x, y = (k % 3) * 10, (k // 3) * 8
        assert np.array_equal(np.asarray(grid.crop((x, y, x + 10, y + 8))), np.asarray(tile))
    labelled = grids.image_grid(tiles[:5], rows=2, cols=3, labels=[f"tile {k}" for k in range(5)], title="t")
    assert labelled.width == 30 and labelled.height > 16 + 2 * 8  # title strip and a label strip per row
    with pytest.raises(ValueError):
        grids.image_grid(tiles, rows=1, cols=3)
    with pytest.raises(ValueError):
        grids.image_grid(tiles, rows=2, cols=3, labels=["one"])


def test_many_rows_split_into_full_sheets_of_at_most_max_side(tmp_path):
    n_rows, names = 50, ["base", "crossattn", "lora ×0.5"]
    rows = [_noise(3, seed=r) for r in range(n_rows)]  # 64 px tiny samples
    labels = [f"a low resolution photo of a truck number {r}\nseed {r % 2}" for r in range(n_rows)]
    paths = grids.comparison_sheets(rows, labels, names, tmp_path / "grids" / "cifar_train", title="cifar train")
    layout = grids.sheet_layout((64, 64), labels, names, title="cifar train")
    assert layout.header > grids.sheet_layout((64, 64), labels, names).header  # room for the title
    assert layout.tile == (128, 128)  # 64 px enlarged 2× (a whole factor) to reach MIN_TILE
    assert layout.height(layout.rows_per_sheet) <= grids.MAX_SIDE < layout.height(layout.rows_per_sheet + 1)
    expected = -(-n_rows // layout.rows_per_sheet)
    assert expected >= 3
    assert paths == [tmp_path / "grids" / f"cifar_train_{k}.png" for k in range(1, expected + 1)]
    sizes = [Image.open(p).size for p in paths]
    assert all(max(size) <= grids.MAX_SIDE for size in sizes)
    assert [h for _, h in sizes] == [layout.height(layout.rows_per_sheet)] * (expected - 1) + [
        layout.height(n_rows - (expected - 1) * layout.rows_per_sheet)]
    # every row appears once, in order: row r of sheet s holds the NEAREST-enlarged images of input row r
    for s, path in enumerate(paths):
        sheet = np.asarray(Image.open(path))
        on_sheet = range(s * layout.rows_per_sheet, min(n_rows, (s + 1) * layout.rows_per_sheet))
        for r, index in enumerate(on_sheet):
            for c in range(3):
                x, y = layout.tile_origin(r, c)
                enlarged = np.asarray(rows[index][c]).repeat(2, 0).repeat(2, 1)
                assert np.array_equal(sheet[y:y + 128, x:x + 128], enlarged)
            label = sheet[y:y + 30, : layout.label_width - grids.GAP]
            assert (label < 100).any()  # the prompt is written in the label column
        header = sheet[: layout.header, layout.label_width:]
        assert (header < 100).sum() > 100  # column names (and the title) are drawn


def test_large_images_shrink_and_many_variants_narrow_the_tiles(tmp_path):
    big = [[Image.new("RGB", (1024, 1024), (200, 30, 30))] * 3]
    path, = grids.comparison_sheets(big, ["an SDXL prompt"], ["base", "lora 256", "lora 1024"], tmp_path / "sdxl")
    layout = grids.sheet_layout((1024, 1024), ["an SDXL prompt"], ["base", "lora 256", "lora 1024"])
    assert layout.tile == (grids.MAX_TILE, grids.MAX_TILE) and Image.open(path).size == (layout.width,
                                                                                        layout.height(1))
    names = [f"v{k}" for k in range(20)]  # 20 columns of 64 px do not fit 2000 px at 128: tiles shrink to fit
    wide = grids.sheet_layout((64, 64), ["p"], names)
    assert wide.width <= grids.MAX_SIDE and grids.MIN_READABLE_TILE <= wide.tile[0] < 128
    non_square = grids.sheet_layout((96, 64), ["p"], ["a", "b"])
    assert non_square.tile == (192, 128)
    with pytest.raises(ValueError, match="readably"):
        grids.sheet_layout((64, 64), ["p"], [f"v{k}" for k in range(80)])


def test_comparison_sheets_reject_misaligned_input(tmp_path):
    rows = [_noise(2)]
    with pytest.raises(ValueError, match="one label per row"):
        grids.comparison_sheets(rows, ["a", "b"], ["base", "tuned"], tmp_path / "g")
    with pytest.raises(ValueError, match="one label per row"):
        grids.comparison_sheets([], [], ["base"], tmp_path / "g")
    with pytest.raises(ValueError, match="one image per column"):
        grids.comparison_sheets(rows, ["a"], ["base", "tuned", "other"], tmp_path / "g")
    assert not (tmp_path / "g_1.png").exists()


def test_sheet_reads_image_paths_like_images(tmp_path):
    images = _noise(2, size=128)
    for k, image in enumerate(images):
        image.save(tmp_path / f"{k}.png")
    from_paths, = grids.comparison_sheets([[tmp_path / "0.png", tmp_path / "1.png"]], ["p"], ["a", "b"],
                                          tmp_path / "paths")
    from_images, = grids.comparison_sheets([images], ["p"], ["a", "b"], tmp_path / "images")
    assert np.array_equal(np.asarray(Image.open(from_paths)), np.asarray(Image.open(from_images)))


def test_a_long_title_and_long_names_wrap_inside_the_sheet(tmp_path):
    title = "held-out subjects (anime style): 6 prompts × 4 seeds, base vs two LoRA scales after 765 steps"
    names = ["base", "lora ×0.5 after 765 steps at 1024 px"]
    layout = grids.sheet_layout((64, 64), ["p"], names, title=title)
    one_line = grids.sheet_layout((64, 64), ["p"], ["base", "lora"], title="t")
    assert layout.header >= one_line.header + 2 * 17  # a second title line and a second name line
    path, = grids.comparison_sheets([_noise(2)], ["p"], names, tmp_path / "long", title=title)
    sheet = np.asarray(Image.open(path))
    assert sheet.shape[:2] == (layout.height(1), layout.width)
    assert (sheet[:, -grids.GAP:] == 255).all()  # nothing drawn past the right margin
