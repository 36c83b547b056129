"""Sharded tar input (nearfar.data.shards): writing, brace patterns, full loading, streaming
across ranks and DataLoader workers, the shuffle buffer, damaged input."""

import io
import tarfile
import warnings

import pytest
import torch
from PIL import Image

from nearfar.data import ImageDataset, load_mnist5k
from nearfar.data.shards import (
    ShardReadError,
    ShardStream,
    expand_braces,
    load_shards,
    shard_paths,
    write_shards,
)


@pytest.fixture(scope="module")
def digits():
    ds = load_mnist5k()
    return ds.subset(range(53))          # 53 items: the last shard of 5 is short


@pytest.fixture(scope="module")
def shards(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("shards")
    write_shards(digits, out, items_per_shard=5)
    return out


def rgb_dataset(n=12):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 6, 7), generator=g, dtype=torch.uint8)
    return ImageDataset(images, torch.arange(n) % 3, meta={"id": [f"item{i}" for i in range(n)]})


def stream_indices(stream, worker=None):
    out = []
    for b in stream:
        out += b["index"].tolist()
    return out


# ------------------------------------------------------------------------ names


def test_brace_expansion():
    assert expand_braces("data-{000000..000002}.tar") == [
        "data-000000.tar", "data-000001.tar", "data-000002.tar"]
    assert expand_braces("s-{8..10}-{a,b}.tar") == [
        "s-8-a.tar", "s-8-b.tar", "s-9-a.tar", "s-9-b.tar", "s-10-a.tar", "s-10-b.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad, match in (("d-{3..1}.tar", "runs backwards"), ("d-{1..2.tar", "unbalanced"),
                       ("d-{x}.tar", "cannot expand")):
        with pytest.raises(ValueError, match=match):
            expand_braces(bad)


def test_writer_names_and_format(shards, digits):
    paths = shard_paths(shards)
    assert [p.name for p in paths] == [f"data-{i:06d}.tar" for i in range(11)]
    assert shard_paths(str(shards / "data-{000000..000010}.tar")) == paths
    with tarfile.open(paths[0]) as tf:
        names = tf.getnames()
    assert names[:3] == ["000000.cls", "000000.json", "000000.png"] and len(names) == 15
    with pytest.raises(FileNotFoundError, match="data-000011.tar: no such shard"):
        shard_paths(str(shards / "data-{000000..000011}.tar"))


# ------------------------------------------------------------------------ loading


def test_round_trip_equals_the_dataset(shards, digits):
    back = load_shards(shards)
    assert torch.equal(back.images, digits.images)
    assert torch.equal(back.labels, digits.labels)
    assert back.meta["id"] == digits.meta["id"]


def test_round_trip_rgb_and_brace_pattern(tmp_path):
    ds = rgb_dataset()
    write_shards(ds, tmp_path, items_per_shard=4, prefix="rgb")
    back = load_shards(str(tmp_path / "rgb-{000000..000002}.tar"))
    assert back.images.shape == (12, 3, 6, 7)
    assert torch.equal(back.images, ds.images) and torch.equal(back.labels, ds.labels)
    assert back.meta["id"] == ds.meta["id"]


# ------------------------------------------------------------------------ streaming


def test_stream_yields_uint8_batches(shards, digits):
    batches = list(ShardStream(shards, batch_size=8, shuffle_buffer=0))
    assert [len(b["index"]) for b in batches] == [8] * 6 + [5]
    b = batches[0]
    assert b["images"].dtype == torch.uint8 and b["images"].shape == (8, 1, 28, 28)
    assert torch.equal(b["images"], digits.images[:8])
    assert torch.equal(b["labels"], digits.labels[:8])
    assert b["index"].tolist() == list(range(8))


def test_every_item_once_per_epoch_across_two_ranks_and_two_workers(shards, digits):
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            stream = ShardStream(shards, batch_size=4, shuffle_buffer=16, seed=3, rank=rank,
                                 world_size=2)
            stream.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
            for b in loader:
                seen += b["index"].tolist()
                # images match their index: nothing is mixed up in transit
                assert torch.equal(b["images"], digits.images[b["index"]])
        assert sorted(seen) == list(range(len(digits))), epoch   # no duplicates, none lost


def test_readers_partition_the_shards(shards):
    stream = ShardStream(shards, batch_size=4, seed=1, rank=1, world_size=2)
    parts = [set(stream.reader_shards(w, 2)) for w in (0, 1)]
    other = ShardStream(shards, batch_size=4, seed=1, rank=0, world_size=2)
    parts += [set(other.reader_shards(w, 2)) for w in (0, 1)]
    assert set().union(*parts) == set(shard_paths(shards))
    assert sum(len(p) for p in parts) == 11


def test_shuffle_buffer_shuffles_deterministically(shards, digits):
    def order(seed, epoch=0, buffer=20):
        s = ShardStream(shards, batch_size=7, shuffle_buffer=buffer, seed=seed)
        s.set_epoch(epoch)
        return stream_indices(s)

    a = order(0)
    assert sorted(a) == list(range(len(digits)))
    assert a == order(0)                              # same seed, same order
    assert a != order(1) and a != order(0, epoch=1)   # another seed or epoch, another order
    assert a != sorted(a)
    # the buffer mixes items across shard boundaries, not only the shard order: some item
    # leaves more than a shard (5 items) away from where its shard's run would put it
    plain = order(0, buffer=0)
    assert plain == list(range(len(digits)))
    within_shard = ShardStream(shards, batch_size=7, shuffle_buffer=1, seed=0)
    runs = stream_indices(within_shard)               # shards shuffled, items in order
    assert sorted(runs) == plain and runs != plain
    assert max(abs(runs.index(i) - a.index(i)) for i in plain) > 5


# ------------------------------------------------------------------------ damage


def _corrupt_copy(shards, tmp_path):
    """Shards 0-1 copied; item 000002's PNG replaced by junk, item 000007 without a PNG."""
    for src in shard_paths(shards)[:2]:
        with tarfile.open(src) as tf_in, tarfile.open(tmp_path / src.name, "w") as tf_out:
            for info in tf_in:
                data = tf_in.extractfile(info).read()
                if info.name == "000002.png":
                    data = b"not a png at all"
                if info.name == "000007.png":
                    continue
                info.size = len(data)
                tf_out.addfile(info, io.BytesIO(data))
    return tmp_path


def test_corrupt_members_are_skipped_with_a_count(shards, tmp_path):
    bad = _corrupt_copy(shards, tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable item\(s\)"):
        ds = load_shards(bad)
    assert len(ds) == 8 and ds.meta["id"] == [0, 1, 3, 4, 5, 6, 8, 9]
    stream = ShardStream(bad, batch_size=4, shuffle_buffer=0)
    with pytest.warns(UserWarning, match="cannot decode 000002.png"):
        got = stream_indices(stream)
    assert got == [0, 1, 3, 4, 5, 6, 8, 9] and stream.skipped == 2


def test_strict_raises_naming_shard_and_member(shards, tmp_path):
    bad = _corrupt_copy(shards, tmp_path)
    with pytest.raises(ShardReadError, match=r"data-000000.tar: cannot decode 000002.png"):
        load_shards(bad, strict=True)
    with pytest.raises(ShardReadError, match=r"item '000007' has no image member"):
        list(ShardStream(bad / "data-000001.tar", batch_size=4, strict=True))


def test_truncated_shard(shards, tmp_path):
    data = shard_paths(shards)[0].read_bytes()
    (tmp_path / "data-000000.tar").write_bytes(data[:len(data) // 2])
    with pytest.raises(ShardReadError, match="damaged tar"):
        load_shards(tmp_path, strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_shards(tmp_path)
    assert 0 < len(ds) < 5 and any("damaged tar" in str(w.message) for w in caught)


def test_items_without_labels_or_json(tmp_path):
    img = io.BytesIO()
    Image.new("L", (4, 4), 7).save(img, format="PNG")
    with tarfile.open(tmp_path / "x-000000.tar", "w") as tf:
        for key in ("a", "b", "c"):
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(img.getvalue())
            tf.addfile(info, io.BytesIO(img.getvalue()))
    ds = load_shards(tmp_path)
    assert ds.labels is None and ds.meta["id"] == ["a", "b", "c"]
    (b,) = list(ShardStream(tmp_path, batch_size=8, shuffle_buffer=0))
    assert b["labels"] is None and b["index"].tolist() == [-1, -1, -1]
    assert (b["images"] == 7).all()


def test_bad_arguments_name_themselves(shards, digits):
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1"):
        ShardStream(shards, batch_size=0)
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < world_size"):
        ShardStream(shards, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="items_per_shard: expected an integer >= 1"):
        write_shards(digits, "/tmp/unused", items_per_shard=0)


def test_recipe_source_shards(shards, digits):
    from nearfar.api import load_source
    from nearfar.recipe import RecipeError, load_recipe

    values = load_recipe(None, ["data.source=shards",
                                f"data.path={shards}/data-{{000000..000010}}.tar"]).values
    ds = load_source(values["data"])
    assert torch.equal(ds.images, digits.images) and torch.equal(ds.labels, digits.labels)
    values = load_recipe(None, ["data.source=shards"]).values
    with pytest.raises(RecipeError, match="recipe.data.path: expected tar shards"):
        load_source(values["data"])


def test_meta_columns_travel_in_json_unless_json_cannot_hold_them(tmp_path):
    ds = rgb_dataset(6)
    ds = ImageDataset(ds.images, ds.labels, label_names=["a", "b", "c"],
                      meta={"id": ds.meta["id"], "label_name": ["abc"[k] for k in range(3)] * 2,
                            "source": ["x", "y"] * 3, "handle": [object()] * 6})
    write_shards(ds, tmp_path, items_per_shard=4)
    back = load_shards(tmp_path)
    assert back.meta["source"] == ["x", "y"] * 3 and "handle" not in back.meta
    assert back.label_names == ["a", "b", "c"]


# ------------------------------------------------------------------------ training


def _simclr():
    from nearfar.methods import build_method
    from nearfar.train import seed_everything

    seed_everything(0)
    return build_method("simclr", encoder="small_cnn", hidden_dim=32, out_dim=16,
                        encoder_kwargs={"widths": (8, 16)})


def _config(**kw):
    from nearfar.train import TrainConfig

    return TrainConfig(**{**dict(steps=14, batch_size=16, lr=1e-2, warmup_steps=2,
                                 progress=False, tensorboard=False, log_every=1), **kw})


def _weights(run):
    from nearfar.train.checkpoint import load_weights

    return load_weights(run)


def test_trainer_streams_shards_across_epochs_and_resumes_exactly(shards, tmp_path):
    from nearfar.train import Trainer

    # 53 items, batches of 16 with drop_last: 3 batches per reader pass (shard order and
    # the shuffle change per epoch); 14 steps cross 4 epoch boundaries
    def stream():
        return ShardStream(shards, batch_size=16, shuffle_buffer=20, seed=0, drop_last=True)

    full = Trainer(_simclr(), stream(), _config(), run_dir=tmp_path / "full")
    result = full.fit()
    assert result.steps_run == 14 and full.epoch == 4 and full.cursor == 2
    losses = [float(x.split('"loss": ')[1].split(",")[0]) for x in
              (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-4:]) < sum(losses[:4])          # it learns from the stream

    part = tmp_path / "part"
    Trainer(_simclr(), stream(), _config(checkpoint_every=5), run_dir=part).fit(stop_at_step=5)
    rest = Trainer(_simclr(), stream(), _config(checkpoint_every=5), run_dir=part)
    rest.fit(resume=True)
    for k, v in _weights(tmp_path / "full").items():
        assert torch.equal(_weights(part)[k], v), k     # resumed mid-epoch, bitwise equal


def test_trainer_stream_errors(shards):
    from nearfar.train import Trainer

    with pytest.raises(ValueError, match="TrainConfig.epochs: a stream of batches"):
        Trainer(_simclr(), ShardStream(shards, batch_size=16), _config(epochs=1))
    odd = ShardStream(shards, batch_size=16, shuffle_buffer=0)        # no drop_last: 5 left
    with pytest.raises(ValueError, match="a batch of 5 items, expected TrainConfig.batch_size"):
        Trainer(_simclr(), odd, _config(steps=4)).fit()
