"""The generated shapes dataset and MNIST-5k captions: determinism, held-out combinations,
captions that agree with the pictures' attributes, registration and fixed splits."""

import pytest
import torch

from nearfar.data import ImageDataset, load_dataset, train_test_split
from nearfar.data.captions import (
    DIGIT_WORDS,
    MNIST_PROMPTS,
    load_mnist5k_captions,
    prompt_templates,
    with_captions,
)
from nearfar.data.shapes import (
    COLORS,
    HELD_OUT,
    POSITIONS,
    PROMPTS,
    SHAPES,
    load_shapes,
    predefined_split,
    render_shapes,
)
from nearfar.nn.text import utf8_to_texts


@pytest.fixture(scope="module")
def shapes():
    return load_shapes(600, 300, seed=3)


def test_same_seed_same_bytes_other_seed_other_bytes(shapes):
    again = load_shapes(600, 300, seed=3)
    assert torch.equal(again.images, shapes.images)
    assert again.meta == shapes.meta and again.sha256() == shapes.sha256()
    other = load_shapes(600, 300, seed=4)
    assert other.sha256() != shapes.sha256()
    assert shapes.images.shape == (900, 3, 32, 32) and shapes.images.dtype == torch.uint8
    assert load_shapes(20, 10, image_size=48).images.shape == (30, 3, 48, 48)


def test_held_out_combinations_never_in_train_and_present_in_test(shapes):
    train, test = predefined_split(shapes)
    assert len(train) == 600 and len(test) == 300
    held = set(HELD_OUT)
    train_combos = set(zip(train.meta["color"], train.meta["shape"]))
    test_combos = set(zip(test.meta["color"], test.meta["shape"]))
    assert not train_combos & held
    assert held <= test_combos
    assert not any(train.meta["held_out"])
    assert [(c, s) in held for c, s in zip(test.meta["color"], test.meta["shape"])] == \
        test.meta["held_out"]
    # every other combination is trained on; captions of train never name a held-out pair
    assert len(train_combos) == len(COLORS) * len(SHAPES) - len(held)
    for caption in train.meta["caption"]:
        assert not any(f"{c} {s}" in caption for c, s in held)
    assert train.split["part"] == "train" and test.split["part"] == "test"
    assert train.split["parent_sha256"] == shapes.sha256()


def test_captions_labels_groups_and_bytes_agree(shapes):
    m = shapes.meta
    assert shapes.classes == list(SHAPES)
    assert [SHAPES[y] for y in shapes.labels.tolist()] == m["shape"]
    for i in range(len(shapes)):
        cap = m["caption"][i]
        assert m["shape"][i] in cap and m["color"][i] in cap and m["size"][i] in cap
        assert POSITIONS[m["position"][i]] in cap
    assert utf8_to_texts(shapes.extras["text"]) == m["caption"]
    key = list(zip(m["shape"], m["color"], m["size"], m["position"]))
    by_group = {}
    for g, k in zip(m["caption_group"], key):
        assert by_group.setdefault(g, k) == k          # one group, one attribute combination
    assert len(set(by_group.values())) == len(by_group)


def test_pictures_show_the_attributes():
    """Colour and place are where the caption says: the shape's pixels are near the named
    colour, and its centre of mass is in the named third of the image."""
    n = len(COLORS) * 9
    color = torch.arange(n) % len(COLORS)
    position = torch.arange(n) // len(COLORS)
    shape = torch.zeros(n, dtype=torch.long)          # circles
    size = torch.ones(n, dtype=torch.long)            # large
    g = torch.Generator().manual_seed(0)
    images = render_shapes(shape, color, size, position, generator=g).float()
    rgb = torch.tensor(list(COLORS.values()), dtype=torch.float32)
    for i in range(n):
        x = images[i]
        fg = (x - x.amin((1, 2), keepdim=True)).sum(0) > 150  # shape pixels
        assert fg.sum() > 40
        mean = x[:, fg].mean(1)
        assert int(((rgb - mean) ** 2).sum(1).argmin()) == int(color[i])
        ys, xs = torch.nonzero(fg, as_tuple=True)
        row, col = int(ys.float().mean() // (32 / 3)), int(xs.float().mean() // (32 / 3))
        assert (row, col) == divmod(int(position[i]), 3)


def test_registered_names_prompts_and_errors():
    ds = load_dataset("shapes", n_train=30, n_test=10)
    assert len(ds) == 40 and ds.name == "shapes" and "held out" in ds.source
    assert prompt_templates("shapes") == PROMPTS
    assert prompt_templates("unknown-data") == ("a {}",)
    with pytest.raises(ValueError, match="held_out: expected \\(color, shape\\) pairs"):
        load_shapes(10, 10, held_out=[("blue", "hexagon")])
    with pytest.raises(ValueError, match="n_train: expected an integer >= 1"):
        load_shapes(0, 10)
    with pytest.raises(ValueError, match="expected a 'split' column"):
        predefined_split(ImageDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8)))


def test_subsets_keep_caption_bytes_aligned(shapes):
    sub = shapes.subset([5, 2, 7])
    assert utf8_to_texts(sub.extras["text"]) == [shapes.meta["caption"][i] for i in (5, 2, 7)]
    assert sub.sha256() != shapes.subset([2, 5, 7]).sha256()
    # the hash covers the captions: same pixels and labels, other captions, other hash
    other = with_captions(sub, ["x", "y", "z"])
    assert other.sha256() != sub.sha256()
    assert "text" in sub.describe()["extras"]


def test_mnist_captions_name_the_digit():
    ds = load_mnist5k_captions()
    assert len(ds) == 5000 and ds.classes == list(DIGIT_WORDS) and ds.name == "mnist5k_captions"
    for y, cap in zip(ds.labels.tolist()[:500], ds.meta["caption"][:500]):
        words = cap.replace(",", " ").split()
        assert DIGIT_WORDS[y] in words or str(y) in words
    assert ds.meta["caption_group"] == ds.labels.tolist()
    assert len(set(ds.meta["caption"])) == 40         # 10 digits x 4 templates
    assert load_dataset("mnist5k_captions").meta["caption"] == ds.meta["caption"]
    assert prompt_templates("mnist5k_captions") == MNIST_PROMPTS
    train, test = train_test_split(ds, 1000, seed=0)
    assert utf8_to_texts(test.extras["text"][:20]) == test.meta["caption"][:20]
