"""The CLIP embedding cache (helpers.embeddings) on the tiny world: built once and reused, rows aligned with the
training dataset, the same CLIP for cached and new inputs, a fixed stratified held-out split, slerp."""
from __future__ import annotations

import math

import pytest
import torch
from dataset_cases import picture

from helpers.core import presets
from helpers.data import dataset as data
from helpers.data import embeddings
from helpers.data.embeddings import ClipEncoder, cosine_matrix, embedding_set, held_out_split, slerp
from helpers.data.report import DatasetError
from helpers.data.validation import Record
from helpers.models import encode_prompts, load_components


@pytest.fixture(scope="module")
def preset():
    return presets.get_preset("prior_sd15", "tiny")


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="module")
def es(preset, storage):
    return embedding_set(preset, root=storage)


def test_cache_is_built_once_then_reused_with_the_same_tensors(preset, storage, es):
    assert es.status == "built" and es.folder.parent == storage / "cache"
    again = embedding_set(preset, root=storage)
    assert again.status == "reused" and again.folder == es.folder
    for name in ("text_embeds", "image_embeds", "text_states", "text_masks", "text_state_index", "labels", "held_out"):
        assert torch.equal(getattr(again, name), getattr(es, name)), name
    other = embedding_set(preset, root=storage, held_out_fraction=0.2)  # another split is another cache
    assert other.status == "built" and other.folder != es.folder


def test_shapes_and_dims_come_from_the_clip_config(es):
    clip = embeddings.clip_config("tiny/clip")
    n, d, width = len(es), clip.projection_dim, clip.text_config.hidden_size
    assert es.dim == d == embeddings.embed_dim("tiny/clip")
    assert es.text_embeds.shape == es.image_embeds.shape == (n, d)
    assert es.text_states.shape == (len(set(es.captions)), 77, width)  # one row per DISTINCT caption
    assert es.text_masks.shape == es.text_states.shape[:2] and es.text_masks.dtype == torch.bool
    assert [es.captions[i] for i in range(n)] == [list(dict.fromkeys(es.captions))[j]
                                                  for j in es.text_state_index.tolist()]
    assert es.labels.min() >= 0 and set(es.labels.tolist()) == set(range(10))
    assert es.class_names[3] == "cat"
    assert embeddings.embed_dim(presets.CLIP_L14) == 768  # ViT-L/14, from helpers.core.configs (no download)


def test_rows_follow_the_training_dataset_and_its_records(preset, storage, es):
    c = load_components(preset)
    ds = data.prepare_dataset(preset, c, root=storage)
    assert es.keys == [r.key for r in ds.records]
    assert es.captions == [r.caption for r in ds.records]
    given = embedding_set(preset, root=storage, records=ds.records)
    assert given.status == "reused"  # the same records → the same cache key
    # the token states are SD1.5's conditioning: the tiny SD1.5's text encoder is this CLIP's text tower
    rows = [0, 7, 100]
    hidden, _ = encode_prompts("sd15", c.tokenizers, c.text_encoders, [es.captions[i] for i in rows])
    states, masks = es.states_of(rows)
    torch.testing.assert_close(states, hidden.float(), atol=2e-2, rtol=1e-2)  # fp16 on disk
    assert masks.sum(1).tolist() == [len(c.tokenizers[0](es.captions[i]).input_ids) for i in rows]


def test_new_inputs_are_encoded_by_the_same_clip(es):
    rows = [0, 5, 50]
    torch.testing.assert_close(es.encode_images([es.records[i].image() for i in rows]), es.image_embeds[rows],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(es.encode_text([es.captions[i] for i in rows]), es.text_embeds[rows],
                               atol=1e-4, rtol=1e-4)
    states, masks = es.encode_text_states([es.captions[0]])
    torch.testing.assert_close(states, es.states_of([0])[0], atol=2e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="empty"):
        es.encode_images([])
    text_only = ClipEncoder(es.clip_ref, text_only=True)  # the text tower alone gives the same numbers
    captions = [es.captions[i] for i in rows]
    for ours, full in zip(text_only.text(captions), es.encoder.text(captions)):
        torch.testing.assert_close(ours, full, atol=0, rtol=0)
    assert sum(p.numel() for p in text_only.model.parameters()) < sum(p.numel() for p in es.encoder.model.parameters())
    with pytest.raises(ValueError, match="text_only"):
        text_only.images([es.records[0].image()])


def test_the_tiny_clip_classifies_the_held_out_images(es):
    held = es.held_out_indices
    predicted = es.zero_shot([es.records[i].image() for i in held])
    accuracy = float((predicted == es.labels[held]).float().mean())
    print(f"tiny CLIP zero-shot on the {len(held)} held-out pairs: {accuracy:.0%}")
    assert accuracy >= 0.8
    # matched caption/image pairs are closer than mismatched ones
    sims = cosine_matrix(es.image_embeds[held], es.text_embeds[held])
    same = es.labels[held][:, None] == es.labels[held][None, :]
    assert sims[same].mean() > sims[~same].mean() + 0.05


def test_held_out_split_is_stratified_fixed_and_location_free(es):
    n_per_class = {c: int((es.labels == c).sum()) for c in range(10)}
    for c, n in n_per_class.items():
        assert int((es.held_out & (es.labels == c)).sum()) == math.ceil(0.1 * n)
    records = es.records
    moved = [Record("/elsewhere/" + r.key.rsplit("/", 1)[-1], r.load, r.caption, r.label, content_hash=r.content_hash)
             for r in records]
    assert torch.equal(held_out_split(moved), es.held_out)  # the bytes decide, not where the files live
    shuffled = list(reversed(records))
    assert torch.equal(held_out_split(shuffled).flip(0), es.held_out)  # nor the order
    lonely = [Record("a", records[0].load, "x", 7, content_hash="1"), Record("b", records[1].load, "y", 8,
                                                                              content_hash="2")]
    assert held_out_split(lonely).tolist() == [False, False]  # a class of one image is never all held out
    with pytest.raises(ValueError, match="fraction"):
        held_out_split(records, 1.0)


def test_a_user_folder_without_labels(tmp_path, storage):
    folder = tmp_path / "mine"
    for i, color in enumerate(["red", "green", "blue", "yellow", "purple"]):
        picture(folder / f"img{i}.png", color, f"a {color} square")
    es = embedding_set(("folder", str(folder)), "tiny/clip", "cpu", root=storage)
    assert len(es) == 5 and es.class_names == () and es.labels.tolist() == [-1] * 5
    assert int(es.held_out.sum()) == 1
    with pytest.raises(ValueError, match="class names"):
        es.zero_shot([es.records[0].image()])


def test_bad_input_is_refused_up_front(tmp_path, storage):
    with pytest.raises(ValueError, match="no CLIP"):
        embedding_set(("folder", str(tmp_path)), None, "cpu", root=storage)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError):
        embedding_set(("folder", str(tmp_path / "empty")), "tiny/clip", "cpu", root=storage)


def test_slerp_keeps_the_ends_spaces_the_angle_evenly_and_lerps_the_length():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, generator=g), 3 * torch.randn(64, generator=g)
    path = slerp(a, b, 6)
    assert path.shape == (6, 64)
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(path.norm(dim=1), torch.linspace(float(a.norm()), float(b.norm()), 6))
    unit = torch.nn.functional.normalize(path, dim=1)
    steps = torch.arccos(torch.clamp((unit[:-1] * unit[1:]).sum(1), -1, 1))
    torch.testing.assert_close(steps, steps.mean().expand(5), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(slerp(a, 2 * a, 3)[1], 1.5 * a)  # same direction: no division by sin 0
    with pytest.raises(ValueError, match="2 steps"):
        slerp(a, b, 1)
    with pytest.raises(ValueError, match="widths"):
        slerp(a, b[:10], 3)

