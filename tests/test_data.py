"""helpers.data / .sources / .caches / .validation: bad files are reported (never crash), sources caption correctly,
the transform matches hand computations and is reproducible per (seed, epoch, index), and caches are reused,
rebuilt when stale or corrupt, and hold exactly what the encoders produce."""
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import default_collate
from transformers import CLIPTokenizer

from helpers import models
from helpers.core.presets import get_preset
from helpers.data import caches, captions, images, sources
from helpers.data import dataset as data
from helpers.data.images import open_rgb
from helpers.data.report import DatasetError
from helpers.data.validation import validate
from helpers.tiny import world as tiny


@pytest.fixture(autouse=True)
def storage(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_STORAGE", str(tmp_path / "storage"))
    return tmp_path / "storage"


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(tiny.TOKENIZER_DIR)


def _png(color, size=(80, 60), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- validation of a folder full of problems

GOOD = {"good1.png": "a red square", "good2.png": "a green square", "good3.png": "a blue square"}


@pytest.fixture
def bad_folder(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for (name, caption), color in zip(GOOD.items(), ["red", "green", "blue"]):
        (d / name).write_bytes(_png(color))
        (d / name).with_suffix(".txt").write_text(caption)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, "JPEG")
    files = {
        "truncated.jpg": buf.getvalue()[: len(buf.getvalue()) // 2],
        "empty.png": b"",
        "notes.png": b"this is a text file, not a PNG\n",
        "good1_copy.png": (d / "good1.png").read_bytes(),
        "one_px.png": _png("white", (1, 1)),
        "wide.png": _png("gray", (4200, 8)),
        "no_caption.png": _png("yellow"),
        "empty_caption.png": _png("purple"),
        "long_caption.png": _png("orange"),
    }
    cmyk = io.BytesIO()
    Image.new("CMYK", (70, 70), (0, 255, 255, 0)).save(cmyk, "JPEG")
    files["cmyk.jpg"] = cmyk.getvalue()
    rgba = Image.new("RGBA", (70, 70), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 35, 70))  # left half fully transparent black
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    files["rgba.png"] = buf.getvalue()
    pal = Image.new("P", (70, 70), 0)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (35, 0, 70, 70))
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)  # palette index 0 (the left half) is transparent
    files["palette.png"] = buf.getvalue()
    for name, content in files.items():
        (d / name).write_bytes(content)
        if name != "no_caption.png":
            (d / name).with_suffix(".txt").write_text(f"caption of {name}")
    (d / "empty_caption.txt").write_text("   \n")
    (d / "long_caption.txt").write_text(" ".join(["word"] * 200) + " THE END")
    (d / "orphan.txt").write_text("a caption whose image is missing")
    return d


EXPECTED = {  # file → (code, severity); None = dropped
    "truncated.jpg": ("truncated", "error"), "empty.png": ("empty_file", "error"), "notes.png": ("not_image", "error"),
    "good1_copy.png": ("duplicate", "warning"), "one_px.png": ("small", "warning"), "wide.png": ("large", "warning"),
    "no_caption.png": ("missing_caption", "error"), "empty_caption.png": ("empty_caption", "error"),
    "long_caption.png": ("long_caption", "warning"), "cmyk.jpg": ("mode_converted", "info"),
    "rgba.png": ("transparency", "warning"), "palette.png": ("transparency", "warning"),
    "orphan.txt": ("orphan_caption", "error"),
}
DROPPED = {"truncated.jpg", "empty.png", "notes.png", "good1_copy.png", "no_caption.png", "empty_caption.png",
           "orphan.txt"}


def test_every_bad_file_is_reported_and_skip_keeps_the_rest(bad_folder, tokenizer, tmp_path):
    records = sources.load_source("folder", str(bad_folder))
    report = validate(records, resolution=48, tokenizer=tokenizer, on_error="skip")
    by_file = {}
    for issue in report.issues:
        by_file.setdefault(os.path.basename(issue.key), set()).add((issue.code, issue.severity))
    for name, expected in EXPECTED.items():
        assert expected in by_file.get(name, set()), (name, by_file.get(name))
    assert not {n for n in GOOD} & set(by_file)  # good files are clean
    usable = {os.path.basename(r.key) for r in report.records}
    assert usable == (set(EXPECTED) | set(GOOD)) - DROPPED
    reasons = {os.path.basename(i.key): i.text for i in report.issues if i.code in ("long_caption", "duplicate")}
    assert "longer than 77 tokens" in reasons["long_caption.png"] and "the end" in reasons["long_caption.png"]
    assert "good1.png" in reasons["good1_copy.png"]
    # the report renders grouped, and saves one row per issue
    assert "truncated" in report.summary() and "notes.png" in report._repr_html_()
    assert "orphan.txt" in report.summary()
    csv_path, json_path = report.save(tmp_path / "run")
    assert len(csv_path.read_text().strip().splitlines()) == len(report.issues) + 1
    saved = json.loads(json_path.read_text())
    assert saved["usable"] == len(report.records) and len(saved["issues"]) == len(report.issues)


def test_stop_raises_listing_every_bad_file(bad_folder, tokenizer):
    with pytest.raises(DatasetError) as err:
        validate(sources.load_source("folder", str(bad_folder)), 64, tokenizer, on_error="stop")
    errors = {n for n, (_, severity) in EXPECTED.items() if severity == "error"}
    for name in errors:
        assert name in str(err.value)
    assert "good1_copy.png" not in str(err.value) and "good1.png" not in str(err.value)
    assert {os.path.basename(i.key) for i in err.value.report.errors()} == errors  # still there to save()


def test_transparency_is_composited_on_white_and_cmyk_converted(bad_folder):
    for name in ("rgba.png", "palette.png"):
        img, notes = open_rgb((bad_folder / name).read_bytes())
        assert img.mode == "RGB" and [code for _, code, _, _ in notes] == ["transparency"] and "white" in notes[0][2]
        assert img.getpixel((5, 5)) == (255, 255, 255)  # transparent black became white, not black
        assert img.getpixel((60, 5)) in ((255, 0, 0), (0, 0, 255))
    img, notes = open_rgb((bad_folder / "cmyk.jpg").read_bytes())
    assert img.mode == "RGB" and notes == [("info", "mode_converted", "converted to RGB", "mode CMYK")]


def test_prepare_never_crashes_on_bad_input(bad_folder):
    preset = get_preset("sd15_xattn_cifar10", "tiny", data_source="folder", data_ref=str(bad_folder),
                        cache_latents=False, cache_text=False)
    c = models.load_components(preset, with_text_encoders=False)
    ds = data.prepare_dataset(preset, c)
    assert len(ds) == len(set(EXPECTED) | set(GOOD)) - len(DROPPED)
    batch = default_collate([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (len(ds), 3, 64, 64)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1


# ---------------------------------------------------------------- sources

def test_cifar10_source_captions_from_templates():
    records = sources.load_source("cifar10", "tiny/cifar10", seed=3)
    assert len(records) == 240
    used = set()
    for i, r in enumerate(records):
        name = sources.CIFAR10_CLASSES[r.label]
        assert os.path.basename(r.key).startswith(name + "_")  # label from metadata.jsonl survived imagefolder
        assert r.caption in {sources.fill_template(t, name) for t in sources.TRAIN_TEMPLATES}
        assert r.caption == sources.cifar_caption(name, 3, i)
        used.add(r.caption.replace(name, "{label}").replace(" an {", " a {"))
    assert used == set(sources.TRAIN_TEMPLATES)
    assert sources.fill_template("a photo of a {label}", "airplane") == "a photo of an airplane"
    assert sources.fill_template("a cropped photo of the {label}", "automobile") == "a cropped photo of the automobile"
    assert not set(sources.HELD_OUT_TEMPLATES) & set(sources.TRAIN_TEMPLATES)
    again = sources.load_source("cifar10", "tiny/cifar10", limit=10, seed=3)
    assert [r.caption for r in again] == [r.caption for r in records[:10]]
    other = sources.load_source("cifar10", "tiny/cifar10", limit=40, seed=4)
    assert [r.caption for r in other] != [r.caption for r in records[:40]]
    assert records[0].image_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hub_layout_bytes_in_the_table():
    """The real uoft-cs/cifar10 keeps PNG bytes inside parquet (column `img`, ClassLabel `label`): same records."""
    import datasets
    images = [Image.new("RGB", (32, 32), (20 * k, 0, 0)) for k in range(4)]
    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(sources.CIFAR10_CLASSES))})
    ds = datasets.Dataset.from_dict({"img": images, "label": [0, 3, 8, 3]}, features=features)
    records = sources.records_from_hf(ds, "cifar10", "uoft-cs/cifar10", limit=3, seed=0)
    assert [r.key for r in records] == [f"uoft-cs/cifar10/train/{i}" for i in range(3)]
    names = ["airplane", "cat", "ship"]
    assert [r.caption for r in records] == [sources.cifar_caption(n, 0, i) for i, n in enumerate(names)]
    assert np.array_equal(np.asarray(open_rgb(records[1].image_bytes())[0]), np.asarray(images[1]))
    again = pickle.loads(pickle.dumps(records[2]))  # DataLoader workers get a working lazy handle
    assert again.image_bytes() == records[2].image_bytes()
    item = data.TrainDataset(validate(records, 32).records, data.TrainTransform(32))[0]
    assert torch.allclose(item["pixel_values"], to_t(images[0]))


def test_naruto_source_and_folder_source_agree_with_metadata():
    folder = tiny.resolve("tiny/naruto")
    rows = {json.loads(line)["file_name"]: json.loads(line)["text"]
            for line in open(os.path.join(folder, "train", "metadata.jsonl"))}
    for kind in ("naruto", "folder"):
        records = sources.load_source(kind, "tiny/naruto")
        assert len(records) == len(rows) == 120
        assert all(r.caption == rows[os.path.basename(r.key)] for r in records)


@pytest.mark.parametrize("layout", ["txt", "jsonl", "csv"])
def test_folder_source_caption_layouts(tmp_path, layout):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    names = {"a.png": "first, with a comma", "sub/b.jpg": "second", "c.png": "third"}
    for k, (name, caption) in enumerate(names.items()):
        Image.new("RGB", (40, 30), (k * 80, 0, 0)).save(d / name)
        if layout == "txt":
            (d / name).with_suffix(".txt").write_text(caption + "\n")
    if layout == "jsonl":
        (d / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": c}) + "\n"
                                                  for n, c in names.items()))
    if layout == "csv":
        import csv
        with open(d / "metadata.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "caption"])
            w.writerows(names.items())
    records = sources.load_source("folder", str(d))
    got = {os.path.relpath(r.key, d): r.caption for r in records}
    assert got == names
    assert len(validate(records, 32).records) == 3


def test_metadata_rows_naming_files_the_scan_does_not_use_are_in_the_report(tmp_path, monkeypatch):
    """Issue 27, item 8: rows naming a file outside the folder, in a hidden folder or a non-image vanished from the
    report; and `~/pictures` / `$HOME/pictures` were "does not exist"."""
    d = tmp_path / "home" / "pictures"
    (d / ".thumbs").mkdir(parents=True)
    for path in (d / "a.png", d / ".thumbs" / "b.png", tmp_path / "outside.png"):
        Image.new("RGB", (40, 30), "red").save(path)
    (d / "notes.psd").write_bytes(b"8BPS not an image we read")
    rows = {"a.png": "kept", "../../outside.png": "out", ".thumbs/b.png": "hidden", "notes.psd": "psd"}
    (d / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": c}) + "\n" for n, c in rows.items()))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for ref in ("~/pictures", "$HOME/pictures", str(d)):
        report = validate(sources.load_source("folder", ref), 32)
        assert [r.caption for r in report.records] == ["kept"]
        found = {(os.path.basename(i.key), i.code): i for i in report.issues}
        named = [("outside.png", "outside_folder", 2), ("b.png", "hidden", 3), ("notes.psd", "not_an_image", 4)]
        for name, code, line in named:
            assert found[name, code].detail == f"metadata.jsonl line {line}", found
        summary = report.summary()
        for reason in ("outside the image folder", "hidden (a name starting with '.'", "not an image file"):
            assert reason in summary
    with pytest.raises(DatasetError, match=r"'~/nowhere' does not exist \(read as '.*home/nowhere'\)"):
        sources.load_source("folder", "~/nowhere")


def test_an_empty_dataset_reference_is_an_error_not_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 40)).save(tmp_path / "stray.png")  # what an empty path would have picked up
    for kind, ref in (("folder", ""), ("folder", "  "), ("naruto", ""), ("cifar10", "")):
        with pytest.raises(DatasetError, match="reference is empty"):
            sources.load_source(kind, ref)


def test_an_image_that_changes_or_disappears_after_validation_stops_with_its_path(tmp_path, sd15):
    for name, color in (("gone.png", "red"), ("cut.png", "green"), ("swapped.png", "blue"), ("kept.png", "gray")):
        Image.new("RGB", (48, 40), color).save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text(f"a {color} image")
    records = validate(sources.load_source("folder", str(tmp_path)), 32).records
    assert [os.path.basename(r.key) for r in records] == ["cut.png", "gone.png", "kept.png", "swapped.png"]
    (tmp_path / "gone.png").unlink()
    cut = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(cut[: len(cut) // 2])  # PIL alone says only "image file is truncated"
    Image.new("RGB", (40, 48), "yellow").save(tmp_path / "swapped.png")  # decodes fine: a different picture
    dataset = data.TrainDataset(records, data.TrainTransform(32))
    for index, name, why in ((0, "cut.png", "changed since validation"), (1, "gone.png", "cannot be read any more"),
                             (3, "swapped.png", "changed since validation")):
        with pytest.raises(DatasetError, match=why) as err:
            dataset[index]
        assert str(tmp_path / name) in str(err.value)
    assert dataset[2]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(DatasetError, match="gone.png"):  # the latent cache reads images the same way
        caches.encode_latents(records[1:2], data.TrainTransform(32), sd15[1].vae)
    records[0].content_hash = None  # a record never validated: still named when it does not decode
    with pytest.raises(DatasetError, match="cut.png: cannot be decoded"):
        dataset[0]


# ---------------------------------------------------------------- transform

def test_transform_size_and_crop_conditioning_by_hand():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 100, 3), dtype=np.uint8))  # h 50, w 100
    t = data.TrainTransform(32, center_crop=True)
    out = t.apply(img)
    # short side 50 → 32, long side 100 × 32/50 = 64; centred 32-px crop starts at (64 - 32) / 2 = 16
    assert out["original_size"] == (50, 100) and out["crop_top_left"] == (0, 16)
    resized = img.resize((64, 32), Image.Resampling.BILINEAR)
    expected = torch.tensor(np.asarray(resized.crop((16, 0, 48, 32)))).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(out["pixel_values"], expected) and out["pixel_values"].shape == (3, 32, 32)

    rand = data.TrainTransform(32, center_crop=False, random_flip=True)
    a = rand.apply(img, flip=False, offsets=(0.0, 0.16))  # left = int(0.16 × 33) = 5
    assert a["crop_top_left"] == (0, 5)
    assert torch.equal(a["pixel_values"], to_t(resized.crop((5, 0, 37, 32))))
    b = rand.apply(img, flip=True, offsets=(0.0, 0.16))
    assert torch.equal(b["pixel_values"], a["pixel_values"].flip(-1))  # flip really flips
    # reported crop = where the crop sits in the mirrored resized image: 64 - 32 - 5 = 27
    assert b["crop_top_left"] == (0, 27)
    assert torch.equal(b["pixel_values"], to_t(ImageOps.mirror(resized).crop((27, 0, 59, 32))))
    tall = data.TrainTransform(30).apply(Image.new("RGB", (30, 91)))
    assert tall["original_size"] == (91, 30) and tall["crop_top_left"] == (30, 0)  # 91 → 91, round(61/2) = 30


def to_t(pil):
    return torch.tensor(np.asarray(pil)).permute(2, 0, 1).float() / 127.5 - 1


def test_samples_are_a_function_of_seed_epoch_index():
    records = sources.load_source("naruto", "tiny/naruto", limit=24)
    ds = data.TrainDataset(records, data.TrainTransform(64, center_crop=False, random_flip=True), seed=7)
    first = [ds[i] for i in range(24)]
    ds[5], ds[11]  # drawing other samples, or the global RNG, must not matter
    torch.manual_seed(123)
    fresh = data.TrainDataset(records, data.TrainTransform(64, center_crop=False, random_flip=True), seed=7)
    for i in (0, 5, 23):
        assert torch.equal(fresh[i]["pixel_values"], first[i]["pixel_values"])
        assert torch.equal(fresh[i]["crop_top_left"], first[i]["crop_top_left"])
    flips = [ds.transform.choose(7, 0, i)[0] for i in range(24)]
    assert 4 <= sum(flips) <= 20  # both orientations occur
    ds.set_epoch(1)
    changed = sum(not torch.equal(ds[i]["pixel_values"], first[i]["pixel_values"]) for i in range(24))
    assert changed >= 12  # a new epoch draws new crops and flips
    ds.set_epoch(0)
    assert torch.equal(ds[3]["pixel_values"], first[3]["pixel_values"])
    assert pickle.loads(pickle.dumps(ds))[3]["caption"] == first[3]["caption"]  # DataLoader workers can use it


# ---------------------------------------------------------------- caches

@pytest.fixture(scope="module")
def sd15():
    preset = get_preset("sd15_xattn_cifar10", "tiny", max_train_images=20, random_flip=True)
    return preset, models.load_components(preset)


@pytest.fixture(scope="module")
def sdxl():
    preset = get_preset("sdxl_lora_naruto_256", "tiny", max_train_images=16, random_flip=True)
    return preset, models.load_components(preset)


def test_cache_reused_rebuilt_on_key_change_and_on_corruption(sd15, storage, capsys):
    preset, c = sd15
    ds = data.prepare_dataset(preset, c)
    assert ds.cache_status == {"latents": "built", "text": "built"}
    latent_file = ds.cache_dirs["latents"] / "latents.safetensors"
    mtime, params = latent_file.stat().st_mtime_ns, ds[0]["latent_params"]
    again = data.prepare_dataset(preset, c)
    assert again.cache_status == {"latents": "reused", "text": "reused"}
    assert latent_file.stat().st_mtime_ns == mtime and "reusing cache" in capsys.readouterr().out
    assert torch.equal(again[0]["latent_params"], params)

    other_size = data.prepare_dataset(get_preset(preset.name, "tiny", max_train_images=20, random_flip=True,
                                                 resolution=128), c)
    assert other_size.cache_status == {"latents": "built", "text": "reused"}  # resolution is in the latent key only
    assert other_size.cache_dirs["latents"] != ds.cache_dirs["latents"]
    assert other_size[0]["latent_params"].shape[-1] == 16
    fewer = data.prepare_dataset(get_preset(preset.name, "tiny", max_train_images=12, random_flip=True), c)
    assert fewer.cache_status == {"latents": "built", "text": "built"}  # different records

    for damage in ("truncate", "flip a byte"):
        blob = latent_file.read_bytes()
        latent_file.write_bytes(blob[: len(blob) // 2] if damage == "truncate" else
                                blob[:-10] + bytes([blob[-10] ^ 1]) + blob[-9:])
        capsys.readouterr()
        fixed = data.prepare_dataset(preset, c)
        assert fixed.cache_status["latents"] == "rebuilt" and "is not usable" in capsys.readouterr().out
        assert torch.equal(fixed[0]["latent_params"], params)
    assert data.prepare_dataset(preset, c).cache_status["latents"] == "reused"
    assert "latents" in data.cache_summary(fixed)
    with pytest.raises(ValueError, match="center_crop"):
        data.prepare_dataset(get_preset(preset.name, "tiny", center_crop=False), c)


def test_a_cache_whose_values_went_bad_is_rebuilt_and_named_even_when_its_manifest_matches(sd15, storage, capsys):
    """Issue 27, item 3: a latent cache overwritten with NaN or zero rows (its manifest written to match, as a tool
    or an older version might) was trained on silently, or ended in a NaN stop that blamed the VAE; its values are
    checked when it is read, and an encoder that gives NaN/inf caches nothing."""
    from safetensors.torch import load_file, save_file

    from helpers.core import files
    preset, c = sd15
    ds = data.prepare_dataset(preset, c)
    folder, params = ds.cache_dirs["latents"], ds[0]["latent_params"]
    tensors = load_file(folder / "latents.safetensors")
    tensors["latent_params"][[2, 5]] = float("nan")
    tensors["latent_params"][7] = 0.0

    def fill(tmp):
        save_file(tensors, tmp / "latents.safetensors")
        (tmp / "cache.json").write_bytes((folder / "cache.json").read_bytes())
    files.write_folder(folder, fill)
    capsys.readouterr()
    fixed = data.prepare_dataset(preset, c)
    out = capsys.readouterr().out
    assert fixed.cache_status["latents"] == "rebuilt", out
    assert f"cache {folder} is not usable" in out and "rebuilding it" in out
    assert "latent_params rows [2, 5] (2 of 20) are NaN/inf; latent_params rows [7] (1 of 20) are all zeros" in out
    assert torch.equal(fixed[0]["latent_params"], params) and torch.isfinite(fixed.latents["latent_params"]).all()
    before = sorted((storage / "cache").iterdir())
    broken = {"latent_params": torch.full((3, 8, 8, 8), float("inf"))}
    with pytest.raises(ValueError, match=r"building the cache .*latent_params rows \[0, 1, 2\] \(3 of 3\) are "
                                         r"NaN/inf.*nothing was written"):
        caches.cached("latents", {"a": 1}, 3, lambda: broken, storage)
    assert sorted((storage / "cache").iterdir()) == before


def test_two_builders_finishing_the_same_cache_at_once_the_second_reuses_the_first(storage, monkeypatch, capsys):
    """Issue 27, item 8: the second builder's rename failed with "Directory not empty"."""
    import os

    from helpers.core import files
    mine, theirs = {"x": torch.ones(3, 2)}, {"x": torch.full((3, 2), 2.0)}
    replace, raced, pid = os.replace, [], os.getpid()

    def the_other_builder_first(src, dst):  # the other builder renames its folder into place just before us
        if os.path.basename(src).startswith(".tmp-latents-") and not raced:
            raced.append(dst)
            monkeypatch.setattr(os, "replace", replace)
            monkeypatch.setattr(os, "getpid", lambda: pid + 1)  # another process: its own temp folder
            caches.cached("latents", {"a": 1}, 3, lambda: theirs, storage)  # the other builder, start to end
            monkeypatch.setattr(os, "getpid", lambda: pid)
            monkeypatch.setattr(os, "replace", the_other_builder_first)
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", the_other_builder_first)
    tensors, status, folder = caches.cached("latents", {"a": 1}, 3, lambda: mine, storage)
    assert raced and status == "reused" and torch.equal(tensors["x"], theirs["x"])
    assert "another builder finished cache" in capsys.readouterr().out
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left behind
    files.verify(folder)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cached_items_equal_uncached_encoder_outputs(family, sd15, sdxl):
    preset, c = sd15 if family == "sd15" else sdxl
    cached = data.prepare_dataset(preset, c)
    plain = data.prepare_dataset(get_preset(preset.name, "tiny", max_train_images=preset.max_train_images,
                                            random_flip=True, cache_latents=False, cache_text=False), c)
    assert len(cached) == len(plain) and "pixel_values" not in cached[0] and "latent_params" not in plain[0]
    orientations = set()
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(0, len(cached), 3):
            a, b = cached[i], plain[i]
            with torch.no_grad():
                ref = models.encode_images(c.vae, b["pixel_values"][None])[0]
                hidden, pooled = models.encode_prompts(c.family, c.tokenizers, c.text_encoders, [b["caption"]])
            assert a["caption"] == b["caption"] and a["index"] == b["index"] == i
            assert torch.equal(a["original_size"], b["original_size"])
            assert torch.equal(a["crop_top_left"], b["crop_top_left"])
            assert a["latent_params"].dtype == torch.float32
            assert torch.allclose(a["latent_params"], ref, rtol=2e-3, atol=2e-3)  # fp16 on disk
            assert torch.allclose(a["prompt_embeds"], hidden[0], rtol=2e-3, atol=2e-3)
            if family == "sdxl":
                assert torch.allclose(a["pooled_prompt_embeds"], pooled[0], rtol=2e-3, atol=2e-3)
            else:
                assert "pooled_prompt_embeds" not in a
            orientations.add(cached.transform.choose(preset.seed, epoch, i)[0])
    assert orientations == {True, False}  # both the plain and the mirrored latents were compared
    batch = default_collate([cached[i] for i in range(3)])
    assert batch["latent_params"].shape[0] == 3 and batch["index"].tolist() == [0, 1, 2]
    assert isinstance(batch["caption"], list)


def test_text_cache_off_when_training_the_text_encoder(sd15):
    preset, c = sd15
    ds = data.prepare_dataset(get_preset(preset.name, "tiny", max_train_images=8, train_text_encoder=True), c)
    assert "text" not in ds.cache_status and "prompt_embeds" not in ds[0] and ds[0]["caption"]


def test_preview_and_caption_lengths(tokenizer, tmp_path):
    records = sources.load_source("naruto", "tiny/naruto", limit=6)
    grid = images.preview_grid(records, n=6, columns=3, tile=64, path=tmp_path / "grid.png")
    assert grid.size[0] == 3 * 64 and (tmp_path / "grid.png").is_file()
    lengths = captions.caption_token_lengths(records, tokenizer)
    assert lengths == [len(tokenizer(r.caption).input_ids) for r in records]
    fig = captions.caption_length_figure(lengths, path=tmp_path / "hist.png")
    assert (tmp_path / "hist.png").is_file() and fig.axes


def test_a_local_model_is_known_by_its_contents_not_its_file_times(tmp_path):
    """On Colab every notebook clones the repository afresh: the tiny models' files get new times, and the caches an
    earlier VM left on Drive must still be found. A changed weight file is a new model."""
    import os
    import shutil

    from helpers.data import caches
    from helpers.tiny import world as tiny
    first, second = tmp_path / "clone-1", tmp_path / "clone-2"
    for clone in (first, second):
        shutil.copytree(tiny.resolve("tiny/sdxl-vae-fp16-fix"), clone)
    for path in second.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))
    assert caches.model_fingerprint(str(first))[1:] == caches.model_fingerprint(str(second))[1:]
    weights = next(second.rglob("*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    assert caches.model_fingerprint(str(first))[1:] != caches.model_fingerprint(str(second))[1:]
