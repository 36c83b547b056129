"""The bundled synthetic signals and temporal positives (adjacent windows of a sequence)."""

import pytest
import torch

from nearfar.data import (
    SIGNAL_CLASSES,
    SignalDataset,
    available_datasets,
    load_dataset,
    load_signals,
    train_test_split,
)
from nearfar.evaluate import linear_probe
from nearfar.views import TemporalPairs

# ------------------------------------------------------------------------------ the data

def test_signals_are_deterministic_and_seeded():
    a = load_signals(n=64, length=128, seed=3)
    b = load_signals(n=64, length=128, seed=3)
    c = load_signals(n=64, length=128, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.sha256() == b.sha256() != c.sha256()
    assert not torch.equal(a.images, c.images)


def test_signals_shape_classes_and_registry():
    ds = load_dataset("signals", n=800, length=256)
    assert "signals" in available_datasets()
    assert isinstance(ds, SignalDataset)
    assert ds.images.shape == (800, 1, 256) and ds.images.dtype == torch.float32
    assert ds.image_shape == ds.signal_shape == (1, 256)
    assert torch.bincount(ds.labels).tolist() == [100] * len(SIGNAL_CLASSES)
    assert ds.classes == list(SIGNAL_CLASSES) and ds.num_classes == 8
    assert torch.isfinite(ds.images).all()
    d = ds.describe()
    assert d["modality"] == "time series" and d["image_shape"] == [1, 256]
    assert d["n_classes"] == 8 and d["sha256"] == ds.sha256()
    assert "SignalDataset" in repr(ds)


def test_signals_are_class_structured():
    """A linear probe on the log magnitude spectrum beats chance (12.5%) by far, one on
    the raw samples does not: the classes differ in content, not in aligned samples."""
    ds = load_signals(n=640, length=256, seed=0)
    train, test = train_test_split(ds, test_size=0.25, seed=0)

    def spectrum(d):
        return torch.fft.rfft(d.images[:, 0]).abs().log1p()

    probe = linear_probe(spectrum(train), train.labels, spectrum(test), test.labels,
                         epochs=25)["value"]
    raw = linear_probe(train.images[:, 0], train.labels, test.images[:, 0], test.labels,
                       epochs=25)["value"]
    assert probe > 0.4, probe
    assert raw < 0.3, raw
    # chirp_up and chirp_down share a spectrum: their mean spectra are much closer than
    # those of other classes; they differ in temporal order
    up, down = SIGNAL_CLASSES.index("chirp_up"), SIGNAL_CLASSES.index("chirp_down")
    s = spectrum(ds)
    gap = (s[ds.labels == up].mean(0) - s[ds.labels == down].mean(0)).abs().mean()
    other = (s[ds.labels == up].mean(0) - s[ds.labels == 0].mean(0)).abs().mean()
    assert gap < other / 2


def test_signal_dataset_subset_split_and_errors():
    ds = load_signals(n=80, length=64)
    part = ds.subset([5, 0, 7])
    assert isinstance(part, SignalDataset)
    assert torch.equal(part.images, ds.images[[5, 0, 7]])
    assert part.meta["id"] == [5, 0, 7] and part.meta["label"] == ds.labels[[5, 0, 7]].tolist()
    train, test = train_test_split(ds, test_size=16, seed=1)
    assert isinstance(train, SignalDataset) and isinstance(test, SignalDataset)
    assert len(train) == 64 and len(test) == 16 and test.split["part"] == "test"
    assert torch.bincount(test.labels).tolist() == [2] * 8          # stratified
    with pytest.raises(ValueError, match=r"\(N, C, L\)"):
        SignalDataset(torch.zeros(4, 1, 2, 8))
    with pytest.raises(ValueError, match="floating-point"):
        SignalDataset(torch.zeros(4, 1, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="labels"):
        SignalDataset(torch.zeros(4, 1, 8), labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="length"):
        load_signals(n=16, length=8)


# ------------------------------------------------------------------- temporal positives

def positions(b, c, length):
    """Signals whose value is their own position: item * 10^4 + channel * 10^3 + time."""
    return (torch.arange(b)[:, None, None] * 10_000 + torch.arange(c)[None, :, None] * 1_000
            + torch.arange(length)[None, None, :]).float()


@pytest.mark.parametrize("window,min_gap,max_gap", [(16, 0, 8), (10, -4, 3), (5, 7, 7)])
def test_temporal_pairs_are_adjacent_windows_with_the_gap(window, min_gap, max_gap):
    b, c, length = 512, 2, 60
    x = positions(b, c, length)
    pairs = TemporalPairs(window, min_gap=min_gap, max_gap=max_gap)
    out = pairs.sample(x, torch.Generator().manual_seed(0))
    assert out.first.shape == out.second.shape == (b, c, window)
    t = torch.arange(window)
    base = torch.arange(b)[:, None, None] * 10_000 + torch.arange(c)[None, :, None] * 1_000
    assert torch.equal(out.first, (base + out.first_start[:, None, None] + t).float())
    assert torch.equal(out.second, (base + out.second_start[:, None, None] + t).float())
    gap = out.second_start - out.first_start - window
    assert int(gap.min()) == min_gap and int(gap.max()) == max_gap  # the whole range is drawn
    assert int(out.first_start.min()) >= 0
    assert int((out.second_start + window).max()) <= length
    x1, x2 = pairs(x, torch.Generator().manual_seed(0))               # the pair maker
    assert torch.equal(x1, out.first) and torch.equal(x2, out.second)


def test_temporal_pairs_start_anywhere_and_are_seeded():
    x = positions(2000, 1, 40)
    pairs = TemporalPairs(8, min_gap=0, max_gap=4)
    a = pairs.sample(x, torch.Generator().manual_seed(1))
    b = pairs.sample(x, torch.Generator().manual_seed(1))
    assert torch.equal(a.first, b.first) and torch.equal(a.second, b.second)
    assert int(a.first_start.min()) == 0 and int(a.second_start.max()) == 40 - 8


def test_temporal_pairs_jitter_scale_and_noise():
    x = torch.ones(64, 1, 50)
    x1, x2 = TemporalPairs(10, max_gap=5, scale=(0.5, 2.0))(x, torch.Generator().manual_seed(0))
    factor = x1[:, 0, 0]
    assert torch.allclose(x1, factor[:, None, None].expand_as(x1))   # one factor per window
    assert 0.5 <= float(factor.min()) and float(factor.max()) <= 2.0
    assert not torch.allclose(x1, x2)
    n1, _ = TemporalPairs(10, max_gap=5, noise=0.1)(x, torch.Generator().manual_seed(0))
    assert 0.05 < float((n1 - 1).std()) < 0.2


def test_temporal_pairs_describe_and_errors():
    pairs = TemporalPairs(128, min_gap=0, max_gap=64)
    d = pairs.describe()
    assert d["name"] == "temporal_pairs" and d["window"] == 128 and d["max_gap"] == 64
    assert "positive pair" in d["description"]
    assert pairs.min_length() == 320
    with pytest.raises(ValueError, match="too short"):
        pairs(torch.zeros(2, 1, 319))
    with pytest.raises(ValueError, match=r"\(B, C, L\)"):
        pairs(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="max_gap"):
        TemporalPairs(8, min_gap=3, max_gap=2)
    with pytest.raises(ValueError, match="min_gap"):
        TemporalPairs(8, min_gap=-8)


def test_temporal_pairs_train_simclr_on_signals():
    """SimCLR takes TemporalPairs as its views: (B, C, L) batches, a 1-D conv encoder,
    a few steps through the real Trainer; the card says what the positives are."""
    from nearfar.methods import build_method
    from nearfar.train import TrainConfig, Trainer

    ds = load_signals(n=96, length=128)
    method = build_method("simclr", encoder="conv1d", views=TemporalPairs(48, max_gap=16),
                          encoder_kwargs={"widths": (8, 8)}, hidden_dim=16, out_dim=8)
    result = Trainer(method, ds, TrainConfig(steps=3, batch_size=32, progress=False,
                                             tensorboard=False, device="cpu")).fit()
    assert result.steps_run == 3 and result.final_loss == result.final_loss
    d = method.describe()
    assert d["positives"]["views"]["name"] == "temporal_pairs"
    assert method.embed(ds.images[:4]).shape == (4, 8)                # whole signals
