import json
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from nearfar.evaluate import Result, embed_dataset, knn_accuracy, knn_predict, linear_probe


def clusters(n_per_class, n_classes, dim, *, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=g), dim=1)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return x, labels


def reference_knn(train, train_y, test, k, t):
    # Wu et al. (2018), one test row at a time, in float64, with plain Python votes
    train = np.asarray(train, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    out = []
    for row in test:
        sims = [(float(row @ train[j]), j) for j in range(len(train))]
        sims.sort(key=lambda s: -s[0])
        votes = {}
        for s, j in sims[:k]:
            label = int(train_y[j])
            votes[label] = votes.get(label, 0.0) + math.exp(s / t)
        best = max(votes.values())
        out.append(min(label for label, v in votes.items() if v == best))
    return np.array(out)


# ---------------------------------------------------------------- kNN

def test_knn_separable_clusters_is_perfect():
    train, train_y = clusters(40, 5, 16, seed=0)
    test, test_y = clusters(10, 5, 16, seed=0)     # same centres, same-scale fresh noise
    test = test + 0.05 * torch.randn(test.shape, generator=torch.Generator().manual_seed(1))
    acc = knn_accuracy(train, train_y, test, test_y, k=20)
    assert acc == 1.0
    assert isinstance(acc, float) and isinstance(acc, Result)


@pytest.mark.parametrize("k,t", [(1, 0.07), (5, 0.07), (20, 0.5), (7, 1.0)])
def test_knn_matches_naive_loop(k, t):
    g = torch.Generator().manual_seed(k)
    train = torch.randn(120, 8, generator=g)
    train_y = torch.randint(0, 4, (120,), generator=g) * 3 + 1   # labels 1, 4, 7, 10
    test = torch.randn(37, 8, generator=g)
    got = knn_predict(train, train_y, test, k=k, temperature=t, chunk_size=5)
    want = reference_knn(train, train_y, test, k, t)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), want)


def test_knn_k1_is_nearest_neighbour():
    g = torch.Generator().manual_seed(3)
    train = torch.randn(200, 6, generator=g)
    train_y = torch.arange(200)
    test = torch.randn(50, 6, generator=g)
    nearest = (nn.functional.normalize(test, dim=1)
               @ nn.functional.normalize(train, dim=1).T).argmax(1)
    assert torch.equal(knn_predict(train, train_y, test, k=1), train_y[nearest])


def test_knn_chunking_does_not_change_predictions():
    x, y = clusters(30, 4, 10, spread=0.8)
    test, _ = clusters(20, 4, 10, spread=0.8, seed=5)
    full = knn_predict(x, y, test, k=10, chunk_size=1000)
    for chunk in (1, 3, 17):
        assert torch.equal(knn_predict(x, y, test, k=10, chunk_size=chunk), full)


def test_knn_small_temperature_does_not_overflow():
    x, y = clusters(30, 3, 8, spread=0.5)
    pred = knn_predict(x, y, x, k=10, temperature=1e-4)
    assert pred.shape == (90,)


def test_knn_accepts_numpy_and_records_protocol():
    x, y = clusters(20, 3, 4)
    acc = knn_accuracy(x.numpy(), y.numpy(), x.numpy().astype(np.float64), y.tolist(),
                       k=3, temperature=0.1)
    assert acc.metric == "knn_top1"
    p = acc.protocol
    assert p["name"] == "knn" and p["k"] == 3 and p["temperature"] == 0.1
    assert (p["n_train"], p["n_test"], p["dim"], p["num_classes"]) == (60, 60, 4, 3)
    d = acc.to_dict()
    assert d["value"] == float(acc) and d["protocol"] == p
    assert json.loads(json.dumps(d)) == d
    assert json.loads(json.dumps(acc)) == float(acc)
    again = pickle.loads(pickle.dumps(acc))
    assert again == acc and again.protocol == p


def test_knn_errors():
    x, y = clusters(5, 2, 4)
    with pytest.raises(ValueError, match="k: expected at most the 10 train"):
        knn_accuracy(x, y, x, y, k=11)
    with pytest.raises(ValueError, match="k: expected an integer"):
        knn_predict(x, y, x, k=0)
    with pytest.raises(ValueError, match="k: expected an integer"):
        knn_predict(x, y, x, k=2.0)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(x, y, x, k=2, temperature=0)
    with pytest.raises(ValueError, match="train_labels: expected 10 labels"):
        knn_predict(x, y[:9], x, k=2)
    with pytest.raises(ValueError, match="test_labels: expected 10 labels"):
        knn_accuracy(x, y, x, y[:3], k=2)
    with pytest.raises(ValueError, match="train_labels: expected integer"):
        knn_predict(x, y.float(), x, k=2)
    with pytest.raises(ValueError, match=r"test_emb: expected 4 feature columns"):
        knn_predict(x, y, x[:, :3], k=2)
    with pytest.raises(ValueError, match=r"train_emb: expected a 2-D array"):
        knn_predict(x[0], y, x, k=2)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="test_emb: expected finite values, got 1 NaN"):
        knn_predict(x, y, bad, k=2)
    with pytest.raises(ValueError, match="train_emb: expected finite"):
        knn_predict(bad, y, x, k=2)


# ---------------------------------------------------------------- linear probe

def test_linear_probe_separable_is_near_perfect():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 20, generator=g)
    x = torch.randn(600, 20, generator=g)
    scores = x @ w.T
    top2 = scores.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]) > 1.0          # a margin, so the test split is easy too
    x, y = x[keep][:450], scores[keep][:450].argmax(1)
    res = linear_probe(x[:300], y[:300], x[300:], y[300:])
    assert res["metric"] == "linear_probe_top1"
    assert res["train_accuracy"] == 1.0
    assert res["value"] == res["accuracy"] >= 0.97
    p = res["protocol"]
    assert p["name"] == "linear_probe" and p["optimizer"] == "lbfgs"
    assert (p["n_train"], p["n_test"], p["dim"], p["num_classes"]) == (300, 150, 20, 3)
    assert json.loads(json.dumps(res)) == res


def test_linear_probe_random_labels_is_chance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 16, generator=g)
    y = torch.randint(0, 10, (3000,), generator=g)
    res = linear_probe(x[:2000], y[:2000], x[2000:], y[2000:])
    assert 0.03 < res["accuracy"] < 0.18


def test_linear_probe_is_deterministic_and_adam_works():
    x, y = clusters(50, 4, 8, spread=0.3)
    a = linear_probe(x, y, x, y, epochs=20)
    b = linear_probe(x, y, x, y, epochs=20)
    assert a == b
    c = linear_probe(x, y, x, y, optimizer="adam", epochs=15, batch_size=64, lr=0.05, seed=3)
    d = linear_probe(x, y, x, y, optimizer="adam", epochs=15, batch_size=64, lr=0.05, seed=3)
    assert c == d and c["accuracy"] > 0.9
    assert c["protocol"]["batch_size"] == 64 and a["protocol"]["batch_size"] == "full"


def test_linear_probe_unseen_test_label_counts_as_error():
    x, y = clusters(20, 2, 4)
    res = linear_probe(x, y, x[:4], torch.tensor([0, 0, 9, 9]))
    assert res["accuracy"] == 0.5


def test_linear_probe_errors():
    x, y = clusters(10, 2, 4)
    with pytest.raises(ValueError, match="optimizer"):
        linear_probe(x, y, x, y, optimizer="sgd")
    with pytest.raises(ValueError, match="batch_size: expected None with optimizer='lbfgs'"):
        linear_probe(x, y, x, y, batch_size=8)
    with pytest.raises(ValueError, match="at least 2 distinct classes"):
        linear_probe(x, torch.zeros(20, dtype=torch.long), x, y)
    with pytest.raises(ValueError, match="epochs"):
        linear_probe(x, y, x, y, epochs=0)
    with pytest.raises(ValueError, match="weight_decay"):
        linear_probe(x, y, x, y, weight_decay=-1)
    with pytest.raises(ValueError, match="test_labels: expected 20 labels"):
        linear_probe(x, y, x, y[:5])
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="train_emb: expected finite"):
        linear_probe(bad, y, x, y)


# ---------------------------------------------------------------- embed_dataset

class Flatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(12)
        self.seen = []

    def forward(self, x):
        self.seen.append((x.dtype, float(x.max()), self.training, torch.is_grad_enabled()))
        return self.bn(x.flatten(1))


def test_embed_dataset_batches_scales_and_restores_mode():
    images = torch.full((10, 3, 2, 2), 255, dtype=torch.uint8)
    model = Flatten()
    model.train()
    out = embed_dataset(model, images, batch_size=4)
    assert out.shape == (10, 12) and out.dtype == torch.float32
    assert len(model.seen) == 3                                   # 4 + 4 + 2
    assert all(s == (torch.float32, 1.0, False, False) for s in model.seen)
    assert model.training


def test_embed_dataset_float_numpy_and_plain_callable():
    images = np.random.default_rng(0).random((5, 2, 3, 3)).astype(np.float64)
    out = embed_dataset(lambda b: b.flatten(1)[:, :4] * 2, images, batch_size=2)
    np.testing.assert_allclose(out.numpy(), images.reshape(5, -1)[:, :4] * 2, rtol=1e-6)


def test_embed_dataset_errors():
    with pytest.raises(ValueError, match="images: expected uint8 or floating"):
        embed_dataset(lambda b: b, torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="embed_fn: expected a \\(2, D\\) tensor"):
        embed_dataset(lambda b: b.sum(), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="batch_size"):
        embed_dataset(lambda b: b, torch.zeros(2, 3), batch_size=0)
