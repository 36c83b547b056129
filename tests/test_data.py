"""nearfar.data: loaders on small files written here, bundled data, split, batches."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nearfar.data import (
    BatchLoader,
    ImageDataset,
    ImageReadError,
    available_datasets,
    batches,
    load_dataset,
    load_digits,
    load_image_folder,
    load_manifest,
    load_mnist5k,
    train_test_split,
)

MNIST5K_SHA256 = "9fb4ea50634f9d2ba995a23ccd3ef4f62f347cbdc81ca8f386854480570951be"


def _png(path: Path, value: int, size=(6, 5), mode="L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    if mode == "L":
        arr = np.full((h, w), value, dtype=np.uint8)
    else:
        arr = np.full((h, w, 3), value, dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path)
    return path


def _corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    return path


# ------------------------------------------------------------------- dataset
def test_dataset_basics_subset_and_describe():
    images = torch.arange(4 * 1 * 2 * 2, dtype=torch.uint8).view(4, 1, 2, 2)
    ds = ImageDataset(images, torch.tensor([0, 1, 0, 1]),
                      meta={"id": ["a", "b", "c", "d"], "group": ["x", "y", "x", "y"]},
                      name="toy", label_names=["even", "odd"])
    assert len(ds) == 4 and ds.meta["label"] == [0, 1, 0, 1]
    sub = ds.subset([3, 0])
    assert sub.meta["id"] == ["d", "a"] and sub.meta["group"] == ["y", "x"]
    assert sub.meta["label"] == [1, 0] and sub.labels.tolist() == [1, 0]
    assert torch.equal(sub.images[0], images[3])
    f = ds.float_images()
    assert f.dtype == torch.float32 and float(f.max()) == pytest.approx(15 / 255)
    d = ds.describe()
    assert d["name"] == "toy" and d["n_items"] == 4 and d["image_shape"] == [1, 2, 2]
    assert d["classes"] == ["even", "odd"] and d["class_counts"] == [2, 2]
    assert len(d["sha256"]) == 64


def test_dataset_rejects_bad_input():
    with pytest.raises(ValueError, match="4-D"):
        ImageDataset(torch.zeros(3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="labels: expected shape"):
        ImageDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"meta\['group'\]"):
        ImageDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), meta={"group": [1]})
    with pytest.raises(ValueError, match="unique ids"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), meta={"id": ["a", "a"]})


def test_sha256_depends_on_pixels_and_labels_only():
    images = torch.randint(0, 256, (5, 1, 3, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    a = ImageDataset(images.clone(), torch.tensor([0, 1, 2, 3, 4]), name="a")
    b = ImageDataset(images.clone(), torch.tensor([0, 1, 2, 3, 4]), name="b",
                     meta={"id": list("vwxyz")})
    assert a.sha256() == b.sha256()
    c = ImageDataset(images.clone(), torch.tensor([0, 1, 2, 3, 3]))
    assert c.sha256() != a.sha256()
    images[0, 0, 0, 0] ^= 1
    assert ImageDataset(images, torch.tensor([0, 1, 2, 3, 4])).sha256() != a.sha256()


# ------------------------------------------------------------------- bundled
@pytest.fixture(scope="module")
def mnist():
    return load_mnist5k()


def test_mnist5k_loads(mnist):
    assert mnist.images.shape == (5000, 1, 28, 28) and mnist.images.dtype == torch.uint8
    assert torch.bincount(mnist.labels).tolist() == [500] * 10
    assert int(mnist.images.max()) == 255
    assert mnist.sha256() == load_mnist5k().sha256()  # stable across loads
    # pinned: a change here means the bundled data changed (the card's hash would too)
    assert mnist.sha256() == MNIST5K_SHA256


def test_mnist5k_split_is_stratified_and_deterministic(mnist):
    train, test = train_test_split(mnist, test_size=1000, seed=0)
    assert (len(train), len(test)) == (4000, 1000)
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert not set(train.meta["id"]) & set(test.meta["id"])
    train2, test2 = train_test_split(mnist, test_size=0.2, seed=0)
    assert test2.meta["id"] == test.meta["id"] and train2.sha256() == train.sha256()
    _, test3 = train_test_split(mnist, test_size=1000, seed=1)
    assert test3.meta["id"] != test.meta["id"]
    assert test.split["part"] == "test" and test.split["parent_sha256"] == mnist.sha256()
    assert test.describe()["split"]["seed"] == 0
    # labels stay aligned with images through the split
    ids = torch.tensor(test.meta["id"])
    assert torch.equal(test.images, mnist.images[ids])
    assert torch.equal(test.labels, mnist.labels[ids])


def test_split_rejects_bad_sizes(mnist):
    with pytest.raises(ValueError, match="test_size"):
        train_test_split(mnist, test_size=5000)
    with pytest.raises(ValueError, match="test_size"):
        train_test_split(mnist, test_size=1.5)


def test_digits_loads():
    ds = load_digits()
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == torch.uint8
    assert int(ds.images.max()) == 255 and ds.num_classes == 10
    assert ds.sha256() == load_digits().sha256()


def test_registry_and_unknown_name(tmp_path):
    assert {"mnist5k", "digits"} <= set(available_datasets())
    assert len(load_dataset("digits")) == 1797
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*digits.*mnist5k"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="unexpected argument.*image_size; allowed: none"):
        load_dataset("digits", image_size=4)
    _png(tmp_path / "imgs" / "a.png", 10)
    assert len(load_dataset(str(tmp_path / "imgs"))) == 1


# ------------------------------------------------------------------- folders
def test_class_subfolders(tmp_path):
    _png(tmp_path / "dog" / "1.png", 50)
    _png(tmp_path / "cat" / "2.png", 100)
    _png(tmp_path / "cat" / "nested" / "3.jpg", 150, size=(10, 12))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = load_image_folder(tmp_path)
    assert ds.label_names == ["cat", "dog"]
    assert ds.images.shape == (3, 1, 6, 5)  # resized to the first image's size
    assert ds.meta["id"] == ["cat/2.png", "cat/nested/3.jpg", "dog/1.png"]
    assert ds.labels.tolist() == [0, 0, 1]
    assert ds.meta["label_name"] == ["cat", "cat", "dog"]
    sub = ds.subset([2, 0])
    assert sub.meta["label_name"] == ["dog", "cat"] and int(sub.images[0].float().mean()) == 50


def test_flat_folder_rgb_and_size(tmp_path):
    _png(tmp_path / "b.png", 30, mode="RGB")
    _png(tmp_path / "a.png", 60, mode="RGB")
    ds = load_image_folder(tmp_path, image_size=4)
    assert ds.labels is None and ds.images.shape == (2, 3, 4, 4)
    assert ds.meta["id"] == ["a.png", "b.png"]
    gray = load_image_folder(tmp_path, image_size=(3, 5), grayscale=True)
    assert gray.images.shape == (2, 1, 3, 5)


def test_corrupt_image_skipped_with_warning_or_raises(tmp_path):
    _png(tmp_path / "ok.png", 40)
    _corrupt(tmp_path / "broken.png")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) of 2.*broken\.png"):
        ds = load_image_folder(tmp_path)
    assert len(ds) == 1 and ds.meta["id"] == ["ok.png"]
    with pytest.raises(ImageReadError, match="broken.png"):
        load_image_folder(tmp_path, strict=True)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        load_image_folder(tmp_path / "empty")
    _corrupt(tmp_path / "allbad" / "x.png")
    with pytest.raises(ValueError, match="no readable images"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_image_folder(tmp_path / "allbad")


# ------------------------------------------------------------------ manifests
def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_manifest_with_string_labels_and_extras(tmp_path):
    _png(tmp_path / "img" / "a.png", 10)
    _png(tmp_path / "img" / "b.png", 20)
    _png(tmp_path / "img" / "c.png", 30)
    rows = [
        {"path": "img/a.png", "label": "zebra", "id": "A", "group": "g1", "site": "north"},
        {"path": "img/b.png", "label": "ant", "id": "B", "group": "g2", "site": "south"},
        {"path": str((tmp_path / "img" / "c.png").resolve()), "label": "zebra", "id": "C",
         "group": "g1", "site": "east"},
    ]
    ds = load_manifest(_write_csv(tmp_path / "m.csv", rows))
    assert ds.label_names == ["ant", "zebra"] and ds.labels.tolist() == [1, 0, 1]
    assert ds.meta["id"] == ["A", "B", "C"] and ds.meta["site"] == ["north", "south", "east"]
    assert ds.meta["label_name"] == ["zebra", "ant", "zebra"]
    sub = ds.subset([2, 1])
    assert sub.meta["id"] == ["C", "B"] and sub.meta["group"] == ["g1", "g2"]
    assert sub.meta["site"] == ["east", "south"] and sub.labels.tolist() == [1, 0]
    assert int(sub.images[0].float().mean()) == 30


def test_jsonl_manifest_int_labels_root_and_missing_file(tmp_path):
    _png(tmp_path / "data" / "a.png", 10)
    _png(tmp_path / "data" / "b.png", 20)
    lines = [
        {"path": "a.png", "label": 3, "group": "g1", "score": 0.5},
        {"path": "gone.png", "label": 1, "group": "g2"},
        {"path": "b.png", "label": 7, "group": "g2", "score": 0.9},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    with pytest.warns(UserWarning, match="skipped 1 unreadable.*gone.png"):
        ds = load_manifest(manifest, root=tmp_path / "data")
    assert ds.labels.tolist() == [3, 7] and ds.label_names is None
    assert ds.meta["id"] == ["a.png", "b.png"]  # defaults to path
    assert ds.meta["score"] == [0.5, 0.9] and ds.meta["group"] == ["g1", "g2"]
    assert ds.subset([1]).meta["score"] == [0.9]
    with pytest.raises(ImageReadError, match="gone.png"):
        load_manifest(manifest, root=tmp_path / "data", strict=True)


def test_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such manifest"):
        load_manifest(tmp_path / "missing.csv")
    bad = tmp_path / "list.txt"
    bad.write_text("a.png\n")
    with pytest.raises(ValueError, match=r"unsupported manifest format '\.txt'.*\.csv.*\.jsonl"):
        load_manifest(bad)
    nopath = _write_csv(tmp_path / "nopath.csv", [{"file": "a.png", "label": 1}])
    with pytest.raises(ValueError, match=r"missing the required 'path' column.*'file'"):
        load_manifest(nopath)
    header_only = tmp_path / "empty.csv"
    header_only.write_text("path,label\n")
    with pytest.raises(ValueError, match="no images"):
        load_manifest(header_only)
    badjson = tmp_path / "bad.jsonl"
    badjson.write_text('{"path": "a.png"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_manifest(badjson)


# -------------------------------------------------------------------- batches
def _toy(n=10):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return ImageDataset(images, torch.arange(n) % 3)


def test_batches_shapes_and_coverage():
    ds = _toy(10)
    out = list(batches(ds, 4, generator=torch.Generator().manual_seed(0)))
    assert len(out) == 2 and all(b.images.shape == (4, 1, 2, 2) for b in out)
    assert out[0].images.dtype == torch.float32
    b = out[0]
    assert torch.equal(b.images[:, 0, 0, 0], b.indices.float() / 255)
    assert torch.equal(b.labels, b.indices % 3)
    evals = list(batches(ds, 4, shuffle=False, drop_last=False))
    assert [len(b.indices) for b in evals] == [4, 4, 2]
    assert torch.cat([b.indices for b in evals]).tolist() == list(range(10))


def test_batch_loader_resumes_exactly():
    ds = _toy(20)
    full = BatchLoader(ds, 3, seed=5)
    reference = [b.indices.tolist() for _ in range(3) for b in full]
    run = BatchLoader(ds, 3, seed=5)
    seen = []
    it = iter(run)
    for _ in range(8):  # one epoch is 6 batches; stop inside the second
        try:
            seen.append(next(it).indices.tolist())
        except StopIteration:
            it = iter(run)
            seen.append(next(it).indices.tolist())
    state = run.state_dict()
    resumed = BatchLoader(ds, 3, seed=123)  # seed comes from the state
    resumed.load_state_dict(state)
    rest = [b.indices.tolist() for b in resumed] + [b.indices.tolist() for b in resumed]
    assert seen + rest == reference
    assert resumed.epoch == 3
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(ds, 4).load_state_dict(state)


def test_batch_size_errors():
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1"):
        list(batches(_toy(), 0))
    with pytest.raises(ValueError, match="larger than the dataset"):
        BatchLoader(_toy(5), 8)
