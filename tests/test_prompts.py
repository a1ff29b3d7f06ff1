"""helpers.prompts: prompt sets as data, their constructors and the checks on a user's list."""
from pathlib import Path

import pytest

from helpers.data import sources
from helpers.evaluation import prompts


def test_cifar_sets_are_templates_times_classes():
    train = prompts.cifar_prompts("train")
    assert (train.name, train.split) == ("cifar train", "train")
    assert train.prompts == tuple(sources.fill_template(t, c) for t in sources.TRAIN_TEMPLATES
                                  for c in sources.CIFAR10_CLASSES)
    held_out = prompts.cifar_prompts("held-out", n_templates=2)
    assert len(held_out) == 2 * 10 and held_out.split == "held-out"
    assert held_out.prompts[:2] == ("a painting of an airplane", "a painting of an automobile")
    assert not set(held_out.prompts) & set(train.prompts)  # held-out wording never appears in training captions
    two = prompts.cifar_prompts("train", classes=["cat", "ship"], n_templates=1)
    assert two.prompts == ("a photo of a cat", "a photo of a ship")
    with pytest.raises(ValueError, match="unknown CIFAR split"):
        prompts.cifar_prompts("test")
    with pytest.raises(ValueError, match="n_templates"):
        prompts.cifar_prompts("train", n_templates=0)


def test_written_sets_are_valid_and_distinct():
    sets = [prompts.get_prompt_set(name) for name in prompts.STANDARD]
    assert [s.name for s in sets] == list(prompts.STANDARD)
    assert len(prompts.naruto_prompts()) == 8 and len(prompts.held_out_subjects()) == 8 and len(prompts.generic_prompts()) == 8
    subjects = " ".join(prompts.HELD_OUT_SUBJECTS + prompts.GENERIC)
    assert [c for c in sources.CIFAR10_CLASSES if c in subjects] == ["horse"]  # only ridden by an astronaut
    styled = prompts.held_out_subjects("anime style")
    assert styled.name == "held-out subjects (anime style)"
    assert styled.prompts[0] == "a lighthouse on a cliff, anime style"
    with pytest.raises(ValueError, match="unknown prompt set"):
        prompts.get_prompt_set("imagenet")


def test_user_list_is_checked():
    mine = prompts.user_prompts(["  a red bicycle ", "a blue door"], name="mine")
    assert mine == prompts.PromptSet("mine", ("a red bicycle", "a blue door"), "custom")  # stripped, a tuple
    with pytest.raises(ValueError, match="not one string"):
        prompts.user_prompts("a red bicycle")
    with pytest.raises(ValueError, match="no prompts"):
        prompts.user_prompts([])
    with pytest.raises(ValueError, match="non-empty strings"):
        prompts.user_prompts(["a cat", "   "])
    with pytest.raises(ValueError, match="non-empty strings"):
        prompts.user_prompts(["a cat", 3])
    with pytest.raises(ValueError, match="repeats"):
        prompts.user_prompts(["a cat", "a cat "])
    with pytest.raises(ValueError, match="name"):
        prompts.user_prompts(["a cat"], name="")
    with pytest.raises(ValueError, match="split"):
        prompts.user_prompts(["a cat"], split=" ")


def test_spread_picks_from_first_to_last_across_classes_and_templates():
    from helpers.evaluation.prompts import spread
    full = prompts.cifar_prompts("train")
    three = spread(full, 3)
    assert three.name == full.name and three.prompts[0] == full.prompts[0] and len(set(three.prompts)) == 3
    assert len({p.split()[-1] for p in three.prompts}) == 3  # three classes
    assert len({p.rsplit(" ", 1)[0].replace(" an", " a") for p in three.prompts}) == 3  # three templates
    for size in range(1, 8):  # never a repeat, whatever the sizes
        for n in range(1, size + 1):
            picked = spread(prompts.PromptSet("s", [f"p{i}" for i in range(size)]), n).prompts
            assert len(set(picked)) == n
    assert spread(full, 999).prompts == full.prompts
    with pytest.raises(ValueError):
        spread(full, 0)


def test_tiny_naruto_prompts_are_held_out_captions_of_the_tiny_naruto_set():
    """The tiny profile's Naruto-style set speaks the tiny world's words, in combinations its folder never shows."""
    import json

    from helpers.tiny import world as tiny
    tiny_set = prompts.naruto_prompts("tiny")
    assert tiny_set.name == prompts.naruto_prompts().name and len(tiny_set) == 16
    folder = Path(tiny.resolve("tiny/naruto")) / "train" / "metadata.jsonl"
    captions = {json.loads(line)["text"] for line in folder.read_text().splitlines()}
    assert not captions & set(tiny_set.prompts)
    assert all("ninja" in p or "anime character" in p for p in tiny_set.prompts)
