"""helpers.variations on a finished tiny image-conditioned run: the held-out check draws what it says (true
embeddings with the empty caption, base SD1.5 with the class caption, same seeds) and measures those very images,
variations start from the given picture's CLIP embedding and are scored by the closeness rule, interpolation strips
run A → B on one seed, and each writes its PNGs and one readable sheet."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_runs import train_tiny_ip_adapter_run

from helpers.data.embeddings import EmbeddingSet, cosine_matrix, embedding_set
from helpers.data.sources import fill_template
from helpers.generate import sampling
from helpers.methods import runs
from helpers.prior.variations import (
    CAPTION,
    Ends,
    closer_to_own,
    held_out_check,
    interpolations,
    spread_held_out,
    variations,
)

STEPS = 2  # denoising steps: the images only need to be the same as a direct call, not good


def _array(image):
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAB_STORAGE", str(root))
        run = train_tiny_ip_adapter_run(root)
        preset = runs.run_preset(run)
        es = embedding_set(preset, root=root, device="cpu")
    board = runs.RunSet(sampling.load_pipeline(preset, "cpu", progress=False))
    return board, board.add(run), es, run


# ---------------------------------------------------------------- pure rules

def _set(labels, held):
    n = len(labels)
    return EmbeddingSet("tiny/clip", torch.zeros(n, 4), torch.zeros(n, 4), torch.zeros(1, 77, 4),
                        torch.ones(1, 77, dtype=torch.bool), torch.zeros(n, dtype=torch.long), [""] * n,
                        torch.tensor(labels), ("a", "b", "c"), torch.tensor(held), [str(i) for i in range(n)])


def test_spread_takes_the_classes_in_turn():
    es = _set([0, 0, 1, 1, 2, 0, 2, 1], [True, True, True, False, True, True, True, True])
    assert spread_held_out(es, 8) == [0, 2, 4, 1, 7, 6, 5]  # round 1: classes 0, 1, 2; round 2; round 3
    assert spread_held_out(es, 3) == [0, 2, 4]
    unlabelled = _set([-1] * 4, [False, True, True, True])
    assert spread_held_out(unlabelled, 2) == [1, 2]
    with pytest.raises(ValueError, match="at least one held-out"):
        spread_held_out(_set([0, 1], [False, False]), 2)


def test_closer_to_own_counts_every_other_source():
    sims = torch.tensor([[0.9, 0.1, 0.95],   # image of source 0: beats 1, loses to 2
                         [0.2, 0.5, 0.4],    # source 1: beats both
                         [0.3, 0.3, 0.3]])   # source 2: ties count as not closer
    assert closer_to_own(sims, torch.tensor([0, 1, 2])) == pytest.approx(3 / 6)
    assert closer_to_own(torch.eye(3), torch.tensor([0, 1, 2])) == 1.0
    with pytest.raises(ValueError, match="two sources"):
        closer_to_own(torch.ones(2, 1), torch.tensor([0, 0]))


# ---------------------------------------------------------------- drawing and measuring

def test_held_out_check_draws_true_embeddings_and_the_base_caption_and_measures_them(drawn, tmp_path):
    board, name, es, _ = drawn
    rows, seeds = spread_held_out(es, 4), [0, 1]
    check = held_out_check(board, name, es, rows, seeds, STEPS, tmp_path, sheet_rows=3)
    pairs = [(r, s) for r in rows for s in seeds]
    adapter = [Image.open(m["file"]) for m in sampling.read_manifest(tmp_path / "adapter" / "manifest.csv")]
    base = [Image.open(m["file"]) for m in sampling.read_manifest(tmp_path / "base" / "manifest.csv")]
    assert len(adapter) == len(base) == len(pairs)
    board.use(name)
    direct = sampling.generate(board.pipe, [CAPTION] * 2, [0, 1], STEPS, image_embeds=es.image_embeds[[rows[1]] * 2])
    assert all(np.abs(_array(a) - _array(d)).max() <= 2 for a, d in zip(adapter[2:4], direct))
    board.use(None)
    caption = fill_template("a photo of a {label}", es.class_names[int(es.labels[rows[0]])])
    base_direct = sampling.generate(board.pipe, [caption], [1], STEPS)[0]
    assert np.abs(_array(base[1]) - _array(base_direct)).max() <= 2
    truth = es.labels[[r for r, _ in pairs]]
    assert check.adapter_rate == pytest.approx(float((es.zero_shot(adapter) == truth).float().mean()))
    assert check.base_rate == pytest.approx(float((es.zero_shot(base) == truth).float().mean()))
    pictures = [es.records[r].image() for r in rows]
    assert check.source_rate == pytest.approx(float((es.zero_shot(pictures) == es.labels[rows]).float().mean()))
    own = torch.cosine_similarity(es.encode_images(adapter), es.image_embeds[[r for r, _ in pairs]]).mean()
    assert check.adapter_cosine == pytest.approx(float(own), abs=1e-5)
    sheet = Image.open(check.sheet)
    assert check.sheet.parent == tmp_path and max(sheet.size) <= 2000 and sheet.height < sheet.width * 3
    assert "class kept" in str(check) and f"{len(rows)} held-out pictures × 2 seeds" in str(check)


def test_variations_start_from_the_given_pictures_embedding(drawn, tmp_path):
    board, name, es, _ = drawn
    rows = spread_held_out(es, 2)
    own = Image.new("RGB", (40, 40), (200, 30, 30))  # a picture from outside the data set
    pictures = [es.records[r].image() for r in rows] + [own]
    result = variations(board, name, es, pictures, ["a", "b", "mine"], [0, 1, 2], STEPS, tmp_path)
    assert [len(r) for r in result.images] == [3, 3, 3]
    board.use(name)
    direct = sampling.generate(board.pipe, [CAPTION] * 3, [0, 1, 2], STEPS,
                               image_embeds=es.encode_images([own]).expand(3, -1))
    assert all(np.abs(_array(a) - _array(d)).max() <= 2 for a, d in zip(result.images[2], direct))
    flat = [im for row in result.images for im in row]
    sims = cosine_matrix(es.encode_images(flat), es.encode_images(pictures))
    assert result.closer_rate == pytest.approx(closer_to_own(sims, torch.arange(3).repeat_interleave(3)))
    assert len(sampling.read_manifest(tmp_path / "manifest.csv")) == 9 and result.sheet.is_file()
    with pytest.raises(ValueError, match="at least two pictures"):
        variations(board, name, es, pictures[:1], ["a"], [0], STEPS, tmp_path)


def test_an_interpolation_strip_runs_from_a_to_b_on_one_seed(drawn, tmp_path):
    board, name, es, _ = drawn
    a, b = spread_held_out(es, 2)
    end = Ends("a → b", es.image_embeds[a], es.image_embeds[b], es.records[a].image(), es.records[b].image())
    strips = interpolations(board, name, es, [end], 5, 7, STEPS, tmp_path)
    assert len(strips.images[0]) == 5 and len(strips.drift[0]) == 5
    board.use(name)
    ends = sampling.generate(board.pipe, [CAPTION] * 2, [7, 7], STEPS, image_embeds=es.image_embeds[[a, b]])
    assert np.abs(_array(strips.images[0][0]) - _array(ends[0])).max() <= 2  # t = 0 is A's embedding
    assert np.abs(_array(strips.images[0][-1]) - _array(ends[1])).max() <= 2  # t = 1 is B's
    assert [m["seed"] for m in sampling.read_manifest(tmp_path / "strip_1" / "manifest.csv")] == [7] * 5
    sims = cosine_matrix(es.encode_images(strips.images[0]), es.image_embeds[[a, b]])
    np.testing.assert_allclose(strips.drift[0], (sims[:, 0] - sims[:, 1]).numpy(), atol=1e-5)
    for count in (4, 8):
        with pytest.raises(ValueError, match="5 to 7 steps"):
            interpolations(board, name, es, [end], count, 0, STEPS, tmp_path)
