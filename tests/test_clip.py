"""CLIP / SigLIP image-text: learning through the real Trainer on generated shapes, what a
batch may carry, the card, the recipes, and the api's image-text evaluation.

Learning check, at a few seconds on a loaded 2-core CPU: small_cnn (16, 32, 64) and a
2-layer width-32 text transformer, 60 steps of 64 on 1,024 generated shapes. Image ->
caption recall@5 on the 400 test items (about 1 in 10 showing a colour-shape combination
never seen in training) goes from ~0.015 at random init to ~0.3 (CLIP) / ~0.1 (SigLIP);
the assertion margins are far below those. Zero-shot shape accuracy also rises (~0.17 ->
~0.25 over three seeds) but by too little at this budget to assert robustly; it is
printed.
"""

import math
from importlib import resources

import pytest
import torch

from nearfar.api import build_method_from_recipe, evaluate_image_text, split_source
from nearfar.card import build_card, missing_fields
from nearfar.data import load_mnist5k_captions
from nearfar.data.captions import MNIST_PROMPTS, MNIST_TEMPLATES
from nearfar.data.shapes import (
    COLORS,
    POSITIONS,
    PROMPTS,
    SHAPES,
    SIZES,
    TEMPLATES,
    caption_for,
    load_shapes,
    predefined_split,
)
from nearfar.evaluate import (
    embed_dataset,
    image_text_retrieval,
    retrieval_metrics,
    zero_shot_accuracy,
)
from nearfar.methods import CLIP, build_method
from nearfar.nn.text import UNK, WordTokenizer
from nearfar.recipe import load_recipe
from nearfar.train import TrainConfig, Trainer, seed_everything

RECIPES = ["clip_shapes", "siglip_shapes", "clip_mnist"]



@pytest.fixture(scope="module")
def shapes():
    return predefined_split(load_shapes(1024, 400, seed=0))


def small_clip(train, **kw):
    seed_everything(0)
    return CLIP("small_cnn", encoder_kwargs=dict(in_channels=3, widths=(16, 32, 64)),
                tokenizer=WordTokenizer.from_texts(train.meta["caption"]), text_width=32,
                text_heads=2, embed_dim=32, context_length=24, **kw)


def measure(method, test):
    images = embed_dataset(method, test.images)
    texts = method.encode_text(test.meta["caption"])
    groups = test.meta["caption_group"]
    both = image_text_retrieval(images, texts, image_groups=groups, text_groups=groups,
                                ks=(5,))
    held = [i for i, h in enumerate(test.meta["held_out"]) if h]
    novel = retrieval_metrics(images[held], texts, ks=(5,),
                              query_groups=[groups[i] for i in held], item_groups=groups)
    zs = zero_shot_accuracy(images, test.labels, test.classes, PROMPTS, method.encode_text)
    return {"i2t@5": float(both["image_to_text_recall@5"]),
            "t2i@5": float(both["text_to_image_recall@5"]),
            "held_out_i2t@5": float(novel["query_to_item_recall@5"]), "zero_shot": float(zs)}


@pytest.mark.parametrize("loss,margin", [("clip", 0.12), ("siglip", 0.04)])
def test_clip_beats_random_init_on_held_out_retrieval(shapes, loss, margin):
    train, test = shapes
    method = small_clip(train, loss=loss)
    before = measure(method, test)
    config = TrainConfig(steps=60, batch_size=64, lr=3e-3, warmup_steps=5, progress=False,
                         log_every=10, checkpoint_every=0)
    result = Trainer(method, train, config).fit()
    after = measure(method, test)
    print(f"{loss}: before {before} after {after} ({result.train_time_s:.1f}s)")
    assert result.steps_run == 60 and math.isfinite(result.final_loss)
    for key in ("i2t@5", "t2i@5", "held_out_i2t@5"):
        assert after[key] > before[key] + margin, (key, before, after)


def test_captions_as_bytes_or_tokens_give_the_same_loss(shapes):
    train, _ = shapes
    method = small_clip(train).eval()
    captions = train.meta["caption"][:16]
    images = train.images[:16].float() / 255
    by_bytes = method.loss({"images": images, "text": train.extras["text"][:16]})
    by_tokens = method.loss({"images": images, "tokens": method.tokenize(captions)})
    by_list = method.loss({"images": images, "text": captions})
    assert torch.allclose(by_bytes.loss, by_tokens.loss) and torch.allclose(by_bytes.loss,
                                                                             by_list.loss)
    assert by_bytes.embeddings.shape == (16, 32)
    assert {"logit_scale", "positive_cosine", "image_to_text_accuracy"} <= set(by_bytes.metrics)
    with pytest.raises(ValueError, match="captions as 'tokens'"):
        method.loss({"images": images})
    with pytest.raises(ValueError, match="one caption per image"):
        method.loss({"images": images, "text": train.extras["text"][:8]})
    with pytest.raises(ValueError, match="was it made with another tokenizer"):
        method.loss({"images": images, "tokens": torch.full((16, 5), 999)})


def test_embeddings_scale_cap_and_options(shapes):
    train, _ = shapes
    method = small_clip(train).train()
    text = method.encode_text(["a small red circle in the top left", "a large blue cross"])
    assert text.shape == (2, 32) and method.training        # eval inside, mode restored
    assert method.embed(train.images[:3].float() / 255).shape == (3, 32)
    assert method.tokenize(["a red circle"]).shape == (1, 5)   # padded to the longest only
    with torch.no_grad():
        method.logit_scale.logit_scale.fill_(math.log(1000.0))
    out = method.loss({"images": train.images[:8].float() / 255,
                       "text": train.extras["text"][:8]})
    assert float(out.metrics["logit_scale"]) == pytest.approx(100.0)   # clamped at 100
    with pytest.raises(ValueError, match="loss: expected 'clip' or 'siglip'"):
        CLIP("small_cnn", loss="hinge")
    with pytest.raises(ValueError, match="augment=True needs views"):
        CLIP("small_cnn", augment=True)
    with pytest.raises(ValueError, match="needs its list of words"):
        CLIP("small_cnn", tokenizer="word")
    # light image views, when asked for, run on the images (first view of a pair maker)
    seen = []
    views = lambda x, g: (seen.append(x.shape) or x.flip(3), x)     # noqa: E731
    aug = CLIP("small_cnn", views, augment=True, text_width=32, text_heads=2, embed_dim=16)
    aug.loss({"images": torch.rand(4, 1, 28, 28), "text": ["a", "b", "c", "d"]})
    assert seen == [(4, 1, 28, 28)]


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_describe_fills_the_card(shapes, loss):
    method = small_clip(shapes[0], loss=loss)
    method.batch_size = 64
    d = method.describe()
    assert d["modality"] == "image-text"
    assert d["positives"]["construction"] == "an image and its caption"
    assert d["negatives"]["source"] == "in-batch" and d["negatives"]["per_anchor"] == 63
    assert "the other captions / images" in d["negatives"]["description"]
    assert d["objective"]["loss"] == ("clip_loss" if loss == "clip" else "siglip_loss")
    if loss == "clip":
        assert d["objective"]["logit_scale"]["max_scale"] == 100.0
    tok = d["text_encoder"]["tokenizer"]
    assert tok["kind"] == "word" and tok["state"]["words"] == method.tokenizer.words
    card = build_card(method=d, encoder={"architecture": "small_cnn", "embedding_dim": 32},
                      dataset={"name": "shapes"}, evaluation={"protocol": "x", "results": []})
    method_fields = [f for f in missing_fields(card)
                     if f.split(".")[0] in ("objective", "positive_construction",
                                            "negative_construction", "modality")]
    assert method_fields == []
    assert d["positives"]["views"] == ["none (the image as given)"]
    assert d["encoder"]["out_dim"] == 32 and d["encoder"]["backbone_out_dim"] == 64


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_load_build_and_cover_their_captions(name):
    recipe = load_recipe(name)
    values = recipe.values
    shape = (3, 32, 32) if "shapes" in name else (1, 28, 28)
    method = build_method_from_recipe(values, shape)
    assert isinstance(method, CLIP) and method.tokenizer.kind == "word"
    assert method.loss_name == ("siglip" if name.startswith("siglip") else "clip")
    assert method.embed(torch.rand(2, *shape)).shape == (2, values["method"]["embed_dim"])
    if "shapes" in name:
        texts = [caption_for(s, c, z, p, t) for s in SHAPES for c in COLORS for z in SIZES
                 for p in POSITIONS for t in range(len(TEMPLATES))]
        texts += [p.format(s) for p in PROMPTS for s in SHAPES]
    else:
        texts = [t.format(word=w, numeral=i) for t in MNIST_TEMPLATES
                 for i, w in enumerate(load_mnist5k_captions().classes)]
        texts += [p.format(w) for p in MNIST_PROMPTS for w in load_mnist5k_captions().classes]
    tokens = method.tokenize(texts)
    unk = method.tokenizer.index[UNK]
    assert not (tokens == unk).any(), [t for t, r in zip(texts, tokens) if (r == unk).any()][:3]
    assert tokens.shape[1] <= values["method"]["context_length"]
    assert values["data"]["source"] in ("shapes", "mnist5k_captions")
    assert values["views"]["preset"] == "none"
    assert resources.files("nearfar.recipes").joinpath(f"{name}.toml").is_file()


def test_api_uses_the_fixed_split_and_adds_image_text_results(shapes):
    ds = load_shapes(64, 32, seed=1)
    train, test = split_source(ds, {"test_size": 0.5}, seed=0)
    assert len(train) == 64 and len(test) == 32 and train.split["part"] == "train"
    method = small_clip(train).eval()
    test_emb = embed_dataset(method, test.images)
    results = evaluate_image_text(method, test, test_emb)
    metrics = [r["metric"] for r in results]
    assert "image_to_text_recall@5" in metrics and "text_to_image_mrr" in metrics
    distinct = len(set(test.meta["caption"]))
    recall = next(r for r in results if r["metric"] == "image_to_text_recall@5")
    assert recall["protocol"]["n_items"] == distinct          # the caption pool is deduplicated
    assert recall["protocol"]["texts"] == f"the {distinct} distinct captions of the test split"
    zs = next(r for r in results if r["metric"] == "zero_shot_accuracy")
    assert zs["protocol"]["templates"] == list(PROMPTS) and zs["protocol"]["n_test"] == 32
    # an image-only method or data without captions: nothing added
    simclr = build_method("simclr", encoder="small_cnn", encoder_kwargs={"in_channels": 3})
    assert evaluate_image_text(simclr, test, test_emb) == []
    bare = test.subset(range(len(test)))
    del bare.meta["caption"]
    assert evaluate_image_text(method, bare, test_emb) == []
