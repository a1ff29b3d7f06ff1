"""helpers.images: what a model trains on is the picture a person sees: upright by EXIF, 16-bit and float
grayscale scaled rather than clipped (or refused with a reason), the first frame of an animation, said so."""
import numpy as np
import pytest
from dataset_cases import animated_gif, exif_rotated_jpeg, float_tiff, gradient16_png, multipage_tiff
from PIL import Image

from helpers.data import dataset as data
from helpers.data import sources
from helpers.data.images import ImageRefused, open_rgb
from helpers.data.validation import validate


def codes(notes) -> list[str]:
    return [code for _, code, _, _ in notes]


def test_exif_orientation_is_applied_and_reaches_the_size_conditioning(tmp_path):
    stored = exif_rotated_jpeg(tmp_path / "phone.jpg")
    img, notes = open_rgb((tmp_path / "phone.jpg").read_bytes())
    upright = np.rot90(stored, k=-1)  # Orientation 6: turn the stored pixels 90° clockwise to show them
    assert img.size == (40, 60) and np.abs(np.asarray(img, np.int16) - upright).mean() < 6
    assert np.asarray(img)[2, 20, 0] > 200 and np.asarray(img)[50, 20, 2] > 200  # the red third is on top now
    assert codes(notes) == ["exif_orientation"] and "Orientation=6" in notes[0][3]
    # SDXL's micro-conditioning gets the upright (h, w), whether the image comes from the folder or the cache
    (tmp_path / "phone.txt").write_text("a phone photo")
    records = validate(sources.load_source("folder", str(tmp_path)), 32).records
    assert data.TrainDataset(records, data.TrainTransform(32))[0]["original_size"].tolist() == [60, 40]


def test_16bit_gradient_is_scaled_not_clipped(tmp_path):
    values = gradient16_png(tmp_path / "g.png")
    img, notes = open_rgb((tmp_path / "g.png").read_bytes())
    pixels = np.asarray(img)
    assert img.mode == "RGB" and (pixels[..., 0] == pixels[..., 2]).all()
    assert np.array_equal(pixels[..., 0], np.round(values / 257).astype(np.uint8))  # 65535 ↦ 255, 32896 ↦ 128
    assert abs(pixels.mean() - 127.5) < 1  # clipping gave ~254: almost white
    assert codes(notes) == ["high_bit_depth"] and "I;16" in notes[0][3]


def test_float_image_in_0_1_is_scaled_and_any_other_range_refused(tmp_path):
    values = float_tiff(tmp_path / "f.tif")
    img, notes = open_rgb((tmp_path / "f.tif").read_bytes())
    assert np.array_equal(np.asarray(img)[..., 1], np.round(values * 255).astype(np.uint8))  # clipping gave 0/1
    assert codes(notes) == ["high_bit_depth"]
    float_tiff(tmp_path / "f255.tif", top=255.0)
    with pytest.raises(ImageRefused, match="values from 0 to 255") as refused:
        open_rgb((tmp_path / "f255.tif").read_bytes())
    assert refused.value.code == "float_range"
    Image.fromarray(np.arange(64, dtype=np.int32).reshape(8, 8)).save(tmp_path / "i32.tif")
    with pytest.raises(ImageRefused, match="32-bit integer"):
        open_rgb((tmp_path / "i32.tif").read_bytes())


def test_animation_and_pages_keep_the_first_frame_and_say_so(tmp_path):
    animated_gif(tmp_path / "a.gif", colors=("red", "lime", "blue"))
    multipage_tiff(tmp_path / "m.tif", pages=4)
    gif, gif_notes = open_rgb((tmp_path / "a.gif").read_bytes())
    tif, tif_notes = open_rgb((tmp_path / "m.tif").read_bytes())
    assert gif.getpixel((5, 5)) == (255, 0, 0) and tif.getpixel((5, 5)) == (0, 0, 0)  # frame 0 of each
    assert ("warning", "frames_dropped") == gif_notes[0][:2] and gif_notes[0][3] == "GIF, 3 frames"
    assert codes(tif_notes) == ["frames_dropped"] and tif_notes[0][3] == "TIFF, 4 frames"
    Image.new("RGB", (8, 8), "red").save(tmp_path / "still.gif")
    assert "frames_dropped" not in codes(open_rgb((tmp_path / "still.gif").read_bytes())[1])
