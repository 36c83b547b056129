"""Retrieval recall@k / MRR against a naive loop, and zero-shot classification on a
constructed case where the right answer is known."""

import pytest
import torch
import torch.nn.functional as F

from nearfar.evaluate.retrieval import (
    first_relevant_ranks,
    image_text_retrieval,
    retrieval_metrics,
)
from nearfar.evaluate.zero_shot import (
    class_embeddings,
    prompt_embeddings,
    zero_shot_accuracy,
)


def naive(queries, items, relevant, ks):
    """Straight from the definitions: sort every query's items by cosine, best first, an
    irrelevant item before a relevant one on a tie; find the first relevant position."""
    q, m = F.normalize(queries.double(), dim=1), F.normalize(items.double(), dim=1)
    recalls, rr = {k: 0 for k in ks}, 0.0
    counted = 0
    for i in range(len(q)):
        if not any(relevant[i]):
            continue
        counted += 1
        scores = [(float(q[i] @ m[j]), bool(relevant[i][j]), j) for j in range(len(m))]
        order = sorted(scores, key=lambda s: (-s[0], s[1]))
        rank = next(p for p, s in enumerate(order, 1) if s[1])
        for k in ks:
            recalls[k] += rank <= k
        rr += 1.0 / rank
    return {k: v / counted for k, v in recalls.items()}, rr / counted


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_groups_with_several_positives_match_the_naive_loop(chunk):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(40, 8, generator=g)
    texts = torch.randn(60, 8, generator=g)
    image_groups = torch.randint(0, 12, (40,), generator=g)
    text_groups = torch.randint(0, 12, (60,), generator=g)
    rel = (image_groups[:, None] == text_groups[None, :]).tolist()
    out = image_text_retrieval(images, texts, image_groups=image_groups,
                               text_groups=text_groups, ks=(1, 5, 10), chunk_size=chunk)
    for direction, (q, m, r) in {"image_to_text": (images, texts, rel),
                                 "text_to_image": (texts, images,
                                                   [list(c) for c in zip(*rel)])}.items():
        recall, mrr = naive(q, m, r, (1, 5, 10))
        for k in (1, 5, 10):
            assert out[f"{direction}_recall@{k}"] == pytest.approx(recall[k], abs=1e-12)
        assert out[f"{direction}_mrr"] == pytest.approx(mrr, abs=1e-9)
        res = out[f"{direction}_mrr"]
        assert res.protocol["direction"] == direction and res.protocol["relevance"] == \
            "same group id"
        assert res.to_dict()["metric"] == f"{direction}_mrr"


def test_relevance_matrix_string_groups_and_paired_rows_agree():
    g = torch.Generator().manual_seed(1)
    images, texts = torch.randn(30, 6, generator=g), torch.randn(30, 6, generator=g)
    groups = torch.randint(0, 5, (30,), generator=g)
    rel = groups[:, None] == groups[None, :]
    a = image_text_retrieval(images, texts, relevance=rel)
    b = image_text_retrieval(images, texts, image_groups=[f"g{x}" for x in groups.tolist()],
                             text_groups=[f"g{x}" for x in groups.tolist()])
    assert {k: float(v) for k, v in a.items()} == {k: float(v) for k, v in b.items()}
    # no relevance given: row i matches row i, exactly the identity matrix
    c = image_text_retrieval(images, texts)
    d = image_text_retrieval(images, texts, relevance=torch.eye(30, dtype=torch.bool))
    assert {k: float(v) for k, v in c.items()} == {k: float(v) for k, v in d.items()}
    recall, mrr = naive(images, texts, torch.eye(30, dtype=torch.bool).tolist(), (1, 5))
    assert c["image_to_text_recall@5"] == pytest.approx(recall[5])
    assert c["image_to_text_mrr"] == pytest.approx(mrr)


def test_perfect_and_collapsed_embeddings():
    z = torch.randn(20, 16)
    perfect = image_text_retrieval(z, z.clone())
    assert all(float(v) == 1.0 for v in perfect.values())
    # all embeddings identical: ties go against the query, so the rank is the worst one
    same = torch.ones(20, 4)
    ranks = first_relevant_ranks(same, same)
    assert ranks.tolist() == [20] * 20
    flat = retrieval_metrics(same, same, ks=(1, 5))
    assert float(flat["query_to_item_recall@5"]) == 0.0
    assert float(flat["query_to_item_mrr"]) == pytest.approx(1 / 20)


def test_queries_without_a_relevant_item_are_left_out_and_counted():
    q = torch.eye(3)
    m = torch.eye(3)
    rel = torch.tensor([[True, False, False], [False, False, False], [False, False, True]])
    out = retrieval_metrics(q, m, relevance=rel, ks=(1,))
    assert float(out["query_to_item_recall@1"]) == 1.0
    assert out["query_to_item_recall@1"].protocol["queries_without_relevant"] == 1
    assert first_relevant_ranks(q, m, relevance=rel).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="no query has a relevant item"):
        retrieval_metrics(q, m, relevance=torch.zeros(3, 3, dtype=torch.bool))


def test_retrieval_errors_name_the_argument():
    with pytest.raises(ValueError, match="relevance: expected a boolean \\(2, 3\\)"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(3, 4), relevance=torch.ones(2, 2))
    with pytest.raises(ValueError, match="as many queries as items"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="both group id lists or neither"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(3, 4), query_groups=[0, 1])
    with pytest.raises(ValueError, match="items: expected 4 feature columns"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(2, 4), ks=(0,))


# --------------------------------------------------------------------- zero-shot

CLASSES = ["circle", "square", "triangle"]


def make_encoder(noisy_template: str | None = None):
    """A text encoder that knows the classes: the prompt 'T' with class c maps to a fixed
    direction for c (plus a template-specific offset); `noisy_template` maps every class
    to the same vector (a useless template)."""
    g = torch.Generator().manual_seed(0)
    directions = {c: torch.randn(8, generator=g) for c in CLASSES}
    offsets = {}

    def encode(texts):
        out = []
        for t in texts:
            c = next(c for c in CLASSES if c in t)
            template = t.replace(c, "{}")
            if template not in offsets:
                offsets[template] = 0.3 * torch.randn(8, generator=g)
            if template == noisy_template:
                out.append(torch.ones(8))
            else:
                out.append(directions[c] + offsets[template])
        return torch.stack(out)

    return encode, directions


def test_zero_shot_on_a_constructed_case():
    encode, directions = make_encoder(noisy_template="the {} thing")
    labels = torch.tensor([0, 1, 2] * 10)
    g = torch.Generator().manual_seed(1)
    images = torch.stack([directions[CLASSES[y]] for y in labels.tolist()])
    images = images + 0.1 * torch.randn(images.shape, generator=g)
    templates = ["a {}", "a photo of a {}", "the {} thing"]
    res = zero_shot_accuracy(images, labels, CLASSES, templates, encode)
    assert float(res) == 1.0 and res.metric == "zero_shot_accuracy"
    per = res.protocol["per_template_accuracy"]
    assert per["a {}"] == 1.0 and per["a photo of a {}"] == 1.0
    assert per["the {} thing"] == pytest.approx(1 / 3)      # every class scores the same: ties
    assert res.protocol["templates"] == templates
    assert "mean of the L2-normalised" in res.protocol["ensemble"]
    assert res.protocol["chance"] == pytest.approx(1 / 3)
    # images labelled with the wrong class score 0
    assert float(zero_shot_accuracy(images, (labels + 1) % 3, CLASSES, templates, encode)) == 0


def test_template_ensemble_is_the_mean_of_normalised_prompt_embeddings():
    encode, _ = make_encoder()
    prompts = prompt_embeddings(encode, CLASSES, ["a {}", "two {}s"])
    assert prompts.shape == (2, 3, 8)
    torch.testing.assert_close(prompts.norm(dim=2), torch.ones(2, 3))
    expected = F.normalize(F.normalize(encode(["a circle"]), dim=1)
                           + F.normalize(encode(["two circles"]), dim=1), dim=1)[0]
    torch.testing.assert_close(class_embeddings(prompts)[0], expected)


def test_zero_shot_errors_name_the_argument():
    encode, _ = make_encoder()
    with pytest.raises(ValueError, match="exactly one '\\{\\}'"):
        zero_shot_accuracy(torch.randn(3, 8), [0, 1, 2], CLASSES, ["no slot"], encode)
    with pytest.raises(ValueError, match="labels: expected class indices in \\[0, 3\\)"):
        zero_shot_accuracy(torch.randn(3, 8), [0, 1, 5], CLASSES, ["a {}"], encode)
    with pytest.raises(ValueError, match="8-d text embeddings like image_emb"):
        zero_shot_accuracy(torch.randn(3, 8), [0, 1, 2], CLASSES, ["a {}"],
                           lambda t: torch.randn(len(t), 4))
