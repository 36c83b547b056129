"""The image objectives beyond SimCLR: each trains through the real Trainer, each recipe
loads and builds, each card names its positives and negatives.

Learning checks, at a budget of a few seconds per method on a loaded 2-core CPU
(small_cnn (8, 16, 32) on 14x14 MNIST-5k digits, batches of 32):

* contrastive methods (MoCo v2, MoCo v3, SupCon, SupCon + NT-Xent) must beat their random
  initialisation on a held-out kNN;
* the non-contrastive ones (BYOL, SimSiam, Barlow Twins, VICReg, DINO) do not reliably
  beat a random CNN's features in a few hundred steps (they first lose some of the random
  features' kNN accuracy), so they must show a learning signal instead: their own
  objective, measured on a fixed batch with fixed views, falls clearly during training,
  while the embeddings stay spread out (no collapse: the trainer's guard is on).
"""

import copy
import math
from importlib import resources

import pytest
import torch
import torch.nn.functional as F

from nearfar.api import build_method_from_recipe
from nearfar.card import build_card, missing_fields
from nearfar.data import ImageDataset, load_mnist5k
from nearfar.evaluate import embed_dataset, knn_accuracy
from nearfar.methods import BYOL, available_methods, build_method
from nearfar.methods.dino import DINO
from nearfar.methods.metrics import (
    cross_false_negative_rate,
    false_negative_rate,
    in_batch_false_negative_rate,
)
from nearfar.nn import MLP, SmallCNN
from nearfar.recipe import load_recipe
from nearfar.train import TrainConfig, Trainer, seed_everything
from nearfar.train.guards import embedding_spread

FAMILY = ["moco_v2", "moco_v3", "byol", "simsiam", "barlow_twins", "vicreg", "dino", "supcon",
          "supcon_mixed"]
RECIPES = ["moco_v2", "moco_v3", "byol", "simsiam", "barlow_twins", "vicreg", "dino", "supcon",
           "supcon_mixed"]
ENCODER = {"widths": (8, 16, 32), "strides": (1, 2, 2)}

# small heads for the learning checks
SMALL = {
    "moco_v2": dict(queue_size=256, hidden_dim=64, out_dim=32, base_momentum=0.9),
    "moco_v3": dict(hidden_dim=64, out_dim=32, predictor_hidden_dim=64, base_momentum=0.9),
    "byol": dict(hidden_dim=64, out_dim=32, predictor_hidden_dim=64, base_momentum=0.9),
    "simsiam": dict(hidden_dim=64, out_dim=64, predictor_hidden_dim=16),
    "barlow_twins": dict(hidden_dim=128, out_dim=128, lambda_offdiag=0.005),
    "vicreg": dict(hidden_dim=128, out_dim=128),
    "dino": dict(hidden_dim=64, bottleneck_dim=32, num_prototypes=128, local_crops=2,
                 local_scale=(0.2, 0.5), base_momentum=0.99, head_batch_norm=True,
                 teacher_temperature=0.02, student_temperature=0.05),
    "supcon": dict(hidden_dim=64, out_dim=32),
    "supcon_mixed": dict(hidden_dim=64, out_dim=32, labelled_fraction=0.25),
}



@pytest.fixture(scope="module")
def digits14():
    """MNIST-5k at 14x14 (2x2 average pool): 512 train and 300 held-out, shuffled."""
    ds = load_mnist5k()
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    small = F.avg_pool2d(ds.images.float(), 2).round().to(torch.uint8)
    tr, te = idx[:512], idx[512:812]
    return ImageDataset(small[tr], ds.labels[tr]), ImageDataset(small[te], ds.labels[te])


def build(name, **kw):
    seed_everything(0)
    return build_method(name, encoder="small_cnn", encoder_kwargs=dict(ENCODER),
                        **{**SMALL[name], **kw})


def config(**kw):
    base = dict(steps=100, batch_size=32, lr=1e-2, warmup_steps=2, progress=False,
                log_every=10, tensorboard=False, collapse_std=0.05, collapse_patience=10)
    return TrainConfig(**{**base, **kw})


def knn(method, train, test):
    a = embed_dataset(method, train.images)
    b = embed_dataset(method, test.images)
    return float(knn_accuracy(a, train.labels, b, test.labels, k=10))


def probe(method, batch, seeds=(11, 12, 13)):
    """The method's loss and embedding spread on a fixed batch and fixed views, measured on
    a copy (a queue, a center or BatchNorm statistics of the method are left untouched)."""
    losses, spreads = [], []
    for s in seeds:
        m = copy.deepcopy(method).train()
        with torch.no_grad():
            out = m.loss(batch, torch.Generator().manual_seed(s))
        losses.append(float(out.loss))
        spreads.append(embedding_spread(out.embeddings))
    return sum(losses) / len(losses), min(spreads)


# ------------------------------------------------------------------------ learning


@pytest.mark.parametrize("name,steps,batch_size,margin", [
    ("moco_v2", 200, 64, 0.01),
    ("moco_v3", 200, 64, 0.01),
    ("supcon", 100, 32, 0.05),
    ("supcon_mixed", 100, 32, 0.03),
])
def test_contrastive_methods_beat_random_init_on_knn(digits14, name, steps, batch_size, margin):
    train, test = digits14
    method = build(name)
    before = knn(method, train, test)
    result = Trainer(method, train, config(steps=steps, batch_size=batch_size)).fit()
    after = knn(method, train, test)
    print(f"{name}: kNN before {before:.3f} after {after:.3f} ({steps} steps of "
          f"{batch_size}, {result.train_time_s:.1f}s)")
    assert result.steps_run == steps and result.stopped == "completed"
    assert after > before + margin, (before, after)


@pytest.mark.parametrize("name,lr,drop", [
    ("byol", 1e-2, 0.3),
    ("simsiam", 1e-2, 0.15),
    ("barlow_twins", 3e-3, 5.0),
    ("vicreg", 3e-3, 1.0),
    ("dino", 3e-3, 0.3),
])
def test_non_contrastive_methods_learn_without_collapse(digits14, name, lr, drop):
    train, _ = digits14
    data = ImageDataset(train.images[:128], train.labels[:128])
    batch = {"images": data.images[:32].float() / 255, "labels": None,
             "index": torch.arange(32)}
    method = build(name)
    loss_before, _ = probe(method, batch)
    result = Trainer(method, data, config(steps=100, lr=lr)).fit()
    loss_after, spread = probe(method, batch)
    print(f"{name}: fixed-batch loss {loss_before:.3f} -> {loss_after:.3f}, spread "
          f"{spread:.3f} ({result.train_time_s:.1f}s)")
    assert result.stopped == "completed"        # the collapse guard did not fire
    assert loss_after < loss_before - drop, (loss_before, loss_after)
    assert spread > 0.1


# ------------------------------------------------------------------- recipes, cards


def test_every_family_method_is_registered():
    assert set(FAMILY) <= set(available_methods())


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_builds_and_its_card_names_positives_and_negatives(name):
    path = resources.files("nearfar.recipes").joinpath(f"{name}.toml")
    recipe = load_recipe(str(path))
    values = recipe.values
    assert values["method"]["name"] in available_methods()
    method = build_method_from_recipe(values, (1, 28, 28))
    method.batch_size = values["trainer"]["batch_size"]
    card = method.describe()
    assert card["method"] == values["method"]["name"]
    assert card["modality"] == "image"
    assert isinstance(card["positives"]["construction"], str) and card["positives"]["views"]
    negatives = card["negatives"]
    assert isinstance(negatives["source"], str) and negatives["source"]
    assert isinstance(negatives.get("construction"), str)
    assert isinstance(negatives["exclusions"], list)
    if name in ("byol", "simsiam", "barlow_twins", "vicreg", "dino"):
        assert negatives["source"].startswith("none: non-contrastive")
    if name == "moco_v2":
        assert negatives["source"] == "queue" and "momentum-encoded keys" in \
            negatives["construction"]
    built = build_card(method=card)
    gaps = [f for f in missing_fields(built)
            if f.split(".")[0] in ("objective", "positive_construction",
                                   "negative_construction", "modality")]
    assert gaps == [], gaps
    # the card copies describe() verbatim
    assert built["negative_construction"]["construction"] == negatives["construction"]


@pytest.mark.parametrize("name", FAMILY)
def test_one_bf16_channels_last_step_from_the_registry(name):
    x = (torch.rand(16, 1, 14, 14, generator=torch.Generator().manual_seed(0)) * 255)
    data = ImageDataset(x.to(torch.uint8), torch.arange(16) % 4)
    method = build(name)
    result = Trainer(method, data, config(steps=2, batch_size=8, precision="bf16",
                                          channels_last=True, collapse_std=0)).fit()
    assert result.steps_run == 2 and math.isfinite(result.final_loss)


# ------------------------------------------------------------------------- details


def small_batch(n=8, size=14, labels=True):
    g = torch.Generator().manual_seed(2)
    return {"images": torch.rand(n, 1, size, size, generator=g), "index": torch.arange(n),
            "labels": torch.arange(n) % 3 if labels else None}


def test_supcon_needs_labels_with_an_actionable_error():
    m = build("supcon")
    with pytest.raises(ValueError, match=r"supcon: the batch has no labels.*supcon_mixed"):
        m.loss(small_batch(labels=False))
    b = small_batch()
    b["labels"][0] = -1
    with pytest.raises(ValueError, match="unlabelled items.*supcon_mixed"):
        m.loss(b)
    with pytest.raises(ValueError, match="supcon_mixed: the batch has no labels.*simclr"):
        build("supcon_mixed").loss(small_batch(labels=False))


def test_supcon_mixed_reduces_to_nt_xent_without_labelled_items():
    from nearfar.losses import nt_xent, supcon

    m = build("supcon_mixed", labelled_fraction=1.0, supervised_weight=0.5)
    b = small_batch()
    b["labels"] = torch.tensor([0, 0, 1, 1, -1, -1, -1, 2])
    out = m.loss(b, torch.Generator().manual_seed(0))
    z1, z2 = m._project(b, torch.Generator().manual_seed(0))
    labelled = b["labels"] >= 0
    expected = nt_xent(z1, z2, temperature=m.temperature) + 0.5 * supcon(
        torch.cat([z1[labelled], z2[labelled]]), b["labels"][labelled].repeat(2),
        temperature=m.temperature)
    torch.testing.assert_close(out.loss, expected)
    assert out.metrics["labelled_share"] == 5 / 8
    b["labels"] = torch.full((8,), -1)
    out = m.loss(b, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.loss, nt_xent(z1, z2, temperature=m.temperature))
    # a labelled fraction hides a fixed subset of the items' labels
    half = build("supcon_mixed", labelled_fraction=0.5)
    idx = torch.arange(1000)
    seen = half.visible_labels(torch.zeros(1000, dtype=torch.long), idx)
    assert 0.4 < float((seen >= 0).float().mean()) < 0.6
    assert torch.equal(seen, half.visible_labels(torch.zeros(1000, dtype=torch.long), idx))


def test_moco_v3_loss_is_the_symmetric_scaled_infonce():
    m = build("moco_v3", temperature=0.5)
    b = small_batch()
    out = m.loss(b, torch.Generator().manual_seed(0))
    _, v1, v2 = m.draw_views(b, torch.Generator().manual_seed(0))
    views = torch.cat([v1, v2])
    with torch.no_grad():
        q1, q2 = m.predictor(m.projector(m.encoder(views))).chunk(2)
        k1, k2 = m.momentum_encoder(views).chunk(2)

    def ctr(q, k):
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.5
        return F.cross_entropy(logits, torch.arange(len(q))) * 2 * 0.5

    torch.testing.assert_close(out.loss.detach(), ctr(q1, k2) + ctr(q2, k1), rtol=1e-5,
                               atol=1e-5)


def test_dino_multi_crop_shapes_and_local_crop_size():
    m = build("dino", local_crops=3)
    x = torch.rand(4, 1, 14, 14)
    local = m.local_views(x, torch.Generator().manual_seed(0))
    side = round(14 * 96 / 224)
    assert local.shape == (12, 1, side, side)
    out = m.loss(small_batch(4), torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and 0 < float(out.metrics["teacher_entropy"]) <= 1
    assert m.views_per_item == 5
    card = m.describe()
    assert card["positives"]["local_crops"]["size"] == [side, side]
    assert card["positives"]["local_crops"]["ops"][0]["name"] == "random_resized_crop"
    # a vector encoder takes one input size: the local crops keep it
    seed_everything(0)
    mlp = DINO(MLP(196, hidden_dims=(32,), out_dim=16), local_crops=2, num_prototypes=16,
               hidden_dim=16, bottleneck_dim=8)
    assert mlp.local_views(x, torch.Generator().manual_seed(0)).shape == (8, 1, 14, 14)
    assert torch.isfinite(mlp.loss(small_batch(4), torch.Generator().manual_seed(0)).loss)
    # the center moves towards the teacher mean in training mode only
    before = m.dino.center.clone()
    m.eval()
    m.loss(small_batch(4), torch.Generator().manual_seed(0))
    assert torch.equal(m.dino.center, before)


def test_false_negative_rate_matches_a_count_by_hand():
    labels = torch.tensor([0, 0, 1, -1])
    # 2 views stacked: anchors 0..7, negatives all but self and partner
    got = float(in_batch_false_negative_rate(labels))
    lab = labels.repeat(2).tolist()
    same = total = 0
    for i in range(8):
        for j in range(8):
            if j == i or j % 4 == i % 4 or lab[i] < 0 or lab[j] < 0:
                continue
            total += 1
            same += lab[i] == lab[j]
    assert got == pytest.approx(same / total)
    assert float(cross_false_negative_rate(torch.tensor([1, 1, 2]))) == pytest.approx(2 / 6)
    assert in_batch_false_negative_rate(None) is None
    assert float(false_negative_rate(torch.tensor([0]), torch.tensor([-1, -1]))) == 0.0


@pytest.mark.parametrize("name", ["moco_v2", "moco_v3", "supcon_mixed"])
def test_infonce_methods_log_the_false_negative_rate(name):
    m = build(name)
    out = m.loss(small_batch(), torch.Generator().manual_seed(0))
    assert 0.0 <= float(out.metrics["false_negative_rate"]) <= 1.0
    if name != "supcon_mixed":                 # unlabelled data: nothing to report
        out = m.loss(small_batch(labels=False), torch.Generator().manual_seed(0))
        assert "false_negative_rate" not in out.metrics


def test_methods_accept_an_encoder_module_and_reject_bad_knobs():
    m = BYOL(SmallCNN(1, widths=(4, 8)), hidden_dim=8, out_dim=4, predictor_hidden_dim=8)
    assert torch.isfinite(m.loss(small_batch()).loss)
    with pytest.raises(ValueError, match="temperature: expected a number > 0"):
        build("moco_v3", temperature=0)
    with pytest.raises(ValueError, match="queue_size: expected an integer >= 1"):
        build("moco_v2", queue_size=0)
    with pytest.raises(ValueError, match="local_scale"):
        build("dino", local_scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="method 'vicreg': bad keyword arguments"):
        build("vicreg", temperature=0.1)


def test_dino_teacher_temperature_warmup_is_linear_and_used_by_the_loss():
    from nearfar.methods import DINO

    torch.manual_seed(0)
    m = DINO("mlp", None, encoder_kwargs={"in_dim": 64, "hidden_dims": [32], "out_dim": 16},
             local_crops=0, num_prototypes=8, hidden_dim=16, bottleneck_dim=8,
             teacher_temperature=0.07, warmup_teacher_temperature=0.04,
             teacher_temperature_warmup=0.5)
    assert m.teacher_temperature_at(0.0) == pytest.approx(0.04)
    assert m.teacher_temperature_at(0.25) == pytest.approx(0.055)
    assert m.teacher_temperature_at(0.5) == m.teacher_temperature_at(0.9) == 0.07
    assert m.describe()["objective"]["temperature"]["teacher_warmup"]["from"] == 0.04
    m.eval()                  # no center update: the same batch can be scored twice
    batch = {"images": torch.rand(6, 1, 8, 8)}
    entropy = {}
    for progress in (0.0, 0.25, 0.5):
        m.progress.fill_(progress)   # a buffer: a resumed run sees the same schedule
        out = m.loss(batch, torch.Generator().manual_seed(0))
        assert m.dino.teacher_temperature == pytest.approx(m.teacher_temperature_at(progress))
        entropy[progress] = float(out.metrics["teacher_entropy"])
    # a warmer teacher gives softer (higher-entropy) targets
    assert entropy[0.0] < entropy[0.25] < entropy[0.5]
    with pytest.raises(ValueError, match="teacher_temperature_warmup"):
        DINO("mlp", None, encoder_kwargs={"in_dim": 64}, teacher_temperature_warmup=2.0)
