"""False negatives: batches that keep a group apart, exclusion masks from ids or labels,
and SimCLR's debiased / hard-negative / exclusion options with the logged rate."""

import math

import pytest
import torch
import torch.nn.functional as F

from nearfar.data import DistinctGroupBatches, same_group_mask, two_view_exclusion
from nearfar.losses import debiased_info_nce, hard_negative_info_nce, nt_xent
from nearfar.methods import SimCLR, StepOutput
from nearfar.methods.base import Method
from nearfar.nn import MLP
from nearfar.train import TrainConfig, Trainer


def batches_of(order, n, batch_size, seed):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = order(perm, batch_size)
    assert sorted(out.tolist()) == list(range(n))                   # still a permutation
    return out[: (n // batch_size) * batch_size].reshape(-1, batch_size)


def most_of_one_group(batches, groups):
    return max(int(torch.bincount(groups[b]).max()) for b in batches)


# --------------------------------------------------------------------------- the sampler

@pytest.mark.parametrize("seed", range(5))
def test_no_batch_holds_two_items_of_a_group(seed):
    g = torch.Generator().manual_seed(100 + seed)
    n, batch_size = 1000, 32                       # 31 batches; groups of up to 31 items
    sizes = torch.randint(1, 32, (200,), generator=g)
    groups = torch.repeat_interleave(torch.arange(200), sizes)[:n]
    groups = torch.cat([groups, torch.arange(200, 200 + n - len(groups))])
    groups = groups[torch.randperm(n, generator=g)]
    order = DistinctGroupBatches(groups)
    assert order.largest <= n // batch_size
    assert order.per_batch_bound(n, batch_size) == 1
    batches = batches_of(order, n, batch_size, seed)
    assert most_of_one_group(batches, groups) == 1


def test_a_random_order_does_repeat_groups():
    """The baseline the sampler fixes: the plain shuffled order puts duplicates together."""
    groups = torch.arange(500).repeat_interleave(2)                 # 500 pairs of duplicates
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    plain = perm[:992].reshape(-1, 32)
    assert most_of_one_group(plain, groups) == 2
    assert most_of_one_group(batches_of(DistinctGroupBatches(groups), 1000, 32, 0),
                             groups) == 1


def test_large_groups_are_spread_as_evenly_as_possible():
    groups = torch.cat([torch.zeros(100, dtype=torch.long), torch.arange(1, 301)])
    order = DistinctGroupBatches(groups)                              # 400 items, 12 batches
    batches = batches_of(order, 400, 32, 1)
    bound = math.ceil(100 / 12)
    assert order.per_batch_bound(400, 32) == bound
    assert most_of_one_group(batches, groups) <= bound


def test_labels_as_groups_give_balanced_batches():
    labels = torch.arange(10).repeat(100)                             # 10 classes x 100
    batches = batches_of(DistinctGroupBatches(labels, name="label"), 1000, 50, 2)
    counts = torch.stack([torch.bincount(labels[b], minlength=10) for b in batches])
    assert int(counts.min()) >= 4 and int(counts.max()) <= 6          # 5 each, within one


def test_order_is_a_pure_function_of_the_permutation():
    groups = ["a", "b", "a", "c", "b", "d", "e", "a"]                 # any hashable ids
    order = DistinctGroupBatches(groups)
    perm = torch.tensor([3, 1, 7, 0, 2, 6, 5, 4])
    assert torch.equal(order(perm, 2), order(perm.clone(), 2))
    first_batches = order(perm, 2)[:8].reshape(4, 2)
    ids = order.groups
    assert all(ids[b[0]] != ids[b[1]] for b in first_batches)
    d = order.describe()
    assert d["largest_group"] == 3 and d["n_groups"] == 5 and "no batch" in d["guarantee"]
    with pytest.raises(ValueError, match="permutation of the 8 items"):
        order(torch.arange(5), 2)


class RecordBatches(Method):
    """A method that only records which items each batch held."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def loss(self, batch, generator=None):
        self.seen.append(batch["index"].clone())
        return StepOutput(loss=(self.w - 1).pow(2).sum())

    def describe(self):
        return {}


def test_trainer_batch_order_hook():
    groups = torch.arange(60).repeat_interleave(4)                  # 240 items, groups of 4
    images = torch.rand(240, 1, 4, 4)
    method = RecordBatches()
    cfg = TrainConfig(steps=21, batch_size=16, progress=False, tensorboard=False,
                      device="cpu", warmup_steps=0)
    Trainer(method, images, cfg, batch_order=DistinctGroupBatches(groups)).fit()
    assert len(method.seen) == 21                                    # over 1.4 epochs
    for idx in method.seen:
        assert int(torch.bincount(groups[idx]).max()) == 1
    epoch = torch.cat(method.seen[:15])
    assert sorted(epoch.tolist()) == list(range(240))                # every item once
    with pytest.raises(ValueError, match="batch_order"):
        Trainer(RecordBatches(), images, cfg, batch_order="groups")


# ------------------------------------------------------------------------------- masks

def test_same_group_mask_and_two_view_exclusion():
    ids = torch.tensor([4, 7, 4, -1, -1])
    m = same_group_mask(ids, views=2)
    n = 5
    for i in range(2 * n):
        for j in range(2 * n):
            a, b = int(ids[i % n]), int(ids[j % n])
            expect = (i % n == j % n) or (a == b and a >= 0)         # -1: unknown
            assert bool(m[i, j]) == expect
    e = two_view_exclusion(ids)
    for i in range(2 * n):
        assert bool(e[i, i]) and not bool(e[i, (i + n) % (2 * n)])   # self out, partner in
    assert bool(e[0, 2]) and bool(e[0, 7]) and not bool(e[0, 1]) and not bool(e[3, 4])
    assert same_group_mask(torch.tensor([1, 2, 1])).tolist() == [
        [True, False, True], [False, True, False], [True, False, True]]


# ----------------------------------------------------------- SimCLR's false-negative options

def tiny(**kw):
    torch.manual_seed(0)
    return SimCLR(MLP(16, hidden_dims=(16,), out_dim=8), views=lambda x, g: (x, x + 0.1),
                  hidden_dim=16, out_dim=8, temperature=0.5, **kw)


def batch():
    g = torch.Generator().manual_seed(0)
    return {"images": torch.rand(8, 1, 4, 4, generator=g), "labels": torch.arange(8) % 3,
            "index": torch.arange(8), "group": torch.tensor([0, 0, 1, 2, 3, 3, 3, 4])}


def projections(m, b):
    x = b["images"]
    z = m.head(m.encoder(torch.cat([x, x + 0.1]))).float()
    return z.chunk(2)


def reference_excluded_nt_xent(z1, z2, exclude, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1).double()
    sim = z @ z.T / t
    n2 = len(z)
    loss = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        keep = [k for k in range(n2) if not exclude[i, k]]
        loss += -(sim[i, j] - torch.logsumexp(sim[i, keep], 0))
    return loss / n2


def test_simclr_losses_match_the_loss_functions():
    b = batch()
    for kw, fn in [({}, lambda z1, z2: nt_xent(z1, z2, temperature=0.5)),
                   ({"loss": "debiased", "tau_plus": 0.2},
                    lambda z1, z2: debiased_info_nce(z1, z2, temperature=0.5, tau_plus=0.2)),
                   ({"loss": "hard_negative", "tau_plus": 0.1, "beta": 0.7},
                    lambda z1, z2: hard_negative_info_nce(z1, z2, temperature=0.5,
                                                          tau_plus=0.1, beta=0.7))]:
        m = tiny(**kw)
        out = m.loss(b)
        assert torch.allclose(out.loss, fn(*projections(m, b)), atol=1e-6), kw
    debiased_zero = tiny(loss="debiased", tau_plus=0.0).loss(b).loss
    assert torch.allclose(debiased_zero, tiny().loss(b).loss, atol=1e-5)


@pytest.mark.parametrize("key", ["label", "group"])
def test_simclr_exclusion_drops_same_id_negatives(key):
    b = batch()
    m = tiny(**{f"exclude_same_{key}": True})
    out = m.loss(b)
    ids = b["labels"] if key == "label" else b["group"]
    ref = reference_excluded_nt_xent(*projections(m, b), two_view_exclusion(ids), 0.5)
    assert torch.allclose(out.loss.double(), ref, atol=1e-5)
    assert f"same-{key}" in " ".join(m.describe()["negatives"]["exclusions"])
    debiased = tiny(loss="debiased", **{f"exclude_same_{key}": True}).loss(b).loss
    assert torch.isfinite(debiased)


def test_simclr_logs_the_false_negative_rate():
    b = batch()                                         # labels 0,1,2,0,1,2,0,1
    out = tiny().loss(b)
    # per view: 14 negatives; same label: 2 or 1 other items x 2 views
    same = sum(2 * (int((b["labels"] == b["labels"][i]).sum()) - 1) for i in range(8)) * 2
    assert math.isclose(float(out.metrics["false_negative_rate"]), same / (16 * 14),
                        rel_tol=1e-6)
    assert float(tiny(exclude_same_label=True).loss(b).metrics["false_negative_rate"]) == 0.0
    unlabelled = {k: v for k, v in b.items() if k != "labels"}
    assert "false_negative_rate" not in tiny().loss(unlabelled).metrics


def test_simclr_false_negative_options_are_checked():
    with pytest.raises(ValueError, match="loss: expected one of nt_xent, debiased"):
        tiny(loss="supcon")
    b = batch()
    del b["group"]
    with pytest.raises(ValueError, match=r"batch\['group'\]"):
        tiny(exclude_same_group=True).loss(b)
    d = tiny(loss="hard_negative", beta=2.0).describe()["objective"]
    assert d["loss"] == "hard_negative" and d["beta"] == 2.0 and d["tau_plus"] == 0.1
