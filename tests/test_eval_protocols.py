"""Evaluation protocols: clustering (NMI / AMI), effective rank (RankMe), nDCG@k,
alignment / uniformity, and `nearfar eval --protocols` end to end. Each metric is checked
against a slow, obvious reimplementation and on cases whose answer is known."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nearfar.evaluate import (
    clustering_scores,
    effective_rank,
    geometry_metrics,
    ndcg_at_k,
    numerical_rank,
    rank_metrics,
)
from nearfar.evaluate.clustering import kmeans_labels

# ------------------------------------------------------------------ references


def naive_rankme(x: np.ndarray, eps: float = 1e-7) -> float:
    # singular values as square roots of the Gram matrix's eigenvalues, entropy by a loop
    gram = x.astype(np.float64).T @ x.astype(np.float64)
    s = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None))
    total = s.sum()
    h = 0.0
    for v in s:
        p = v / total + eps
        h -= p * math.log(p)
    return math.exp(h)


def naive_nmi(a, b) -> float:
    # mutual information over entropies, counted from the contingency table
    n = len(a)
    pa, pb, pab = Counter(a), Counter(b), Counter(zip(a, b))
    mi = sum(c / n * math.log((c / n) / (pa[x] / n * pb[y] / n)) for (x, y), c in pab.items())
    ha = -sum(c / n * math.log(c / n) for c in pa.values())
    hb = -sum(c / n * math.log(c / n) for c in pb.values())
    return mi / ((ha + hb) / 2)


def naive_ndcg(q, m, gains, k):
    # rank each query's items one by one; ties: the less relevant item first
    out = []
    for i in range(len(q)):
        sims = [float(F.cosine_similarity(q[i], m[j], dim=0)) for j in range(len(m))]
        order = sorted(range(len(m)), key=lambda j: (-sims[j], gains[i][j]))
        dcg = sum(gains[i][j] / math.log2(r + 2) for r, j in enumerate(order[:k]))
        ideal = sorted(gains[i], reverse=True)
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal[:k]))
        if idcg > 0:
            out.append(dcg / idcg)
    return sum(out) / len(out)


# ------------------------------------------------------------------ effective rank


def test_effective_rank_of_isotropic_gaussian_is_its_dimension():
    g = torch.Generator().manual_seed(0)
    k, d, n = 6, 24, 3000
    basis = torch.linalg.qr(torch.randn(d, k, generator=g)).Q           # (d, k) orthonormal
    x = torch.randn(n, k, generator=g) @ basis.T                          # rank k in d dims
    r = effective_rank(x)
    assert r.protocol["name"] == "rank" and "Garrido" in r.protocol["reference"]
    assert abs(float(r) - k) < 0.05 * k
    assert float(r) == pytest.approx(naive_rankme(x.numpy()), rel=1e-6)
    assert float(numerical_rank(x)) == k
    assert float(numerical_rank(torch.randn(n, d, generator=g))) == d
    # one direction only (collapse): 1; equal singular values: exactly min(N, D)
    assert float(effective_rank(torch.randn(50, 1, generator=g) @ torch.ones(1, 8))) == \
        pytest.approx(1.0, abs=1e-4)
    assert float(effective_rank(torch.eye(5) * 3)) == pytest.approx(5.0, rel=1e-5)
    assert float(effective_rank(torch.zeros(4, 3))) == 1.0


def test_numerical_rank_matches_numpy_at_the_stated_tolerance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 10, generator=g, dtype=torch.float64)
    x[:, 7:] = x[:, :3] * 1e-5                                             # three tiny directions
    x = x.float()
    s = np.linalg.svd(x.double().numpy(), compute_uv=False)
    for tol in (1e-2, 1e-4, 1e-7):
        want = int(np.linalg.matrix_rank(x.double().numpy(), tol=tol * s[0]))
        got = numerical_rank(x, tol=tol)
        assert float(got) == want and got.protocol["tol"] == tol
    assert float(numerical_rank(x, tol=1e-3)) == 7
    out = rank_metrics(x)
    assert set(out) == {"effective_rank", "numerical_rank"}
    with pytest.raises(ValueError, match="tol: expected a relative tolerance"):
        numerical_rank(x, tol=2.0)
    with pytest.raises(ValueError, match="emb: expected a 2-D array"):
        effective_rank(torch.zeros(3))


# ------------------------------------------------------------------ clustering


def blobs(n_per: int, n_classes: int, dim: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:n_classes] * 10
    y = torch.arange(n_classes).repeat_interleave(n_per)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


def test_perfectly_separated_clusters_score_one():
    x, y = blobs(30, 5, 8, 0.1, seed=0)
    out = clustering_scores(x, y)
    assert float(out["clustering_nmi"]) == pytest.approx(1.0)
    assert float(out["clustering_ami"]) == pytest.approx(1.0)
    p = out["clustering_ami"].protocol
    assert p["name"] == "clustering" and p["k"] == 5 and p["n_init"] == 10
    assert p["labels_used_to_fit"] is False and p["n_test"] == 150
    # labels are names only: a permutation of them changes nothing
    perm = torch.tensor([3, 0, 4, 1, 2])[y]
    assert float(clustering_scores(x, perm)["clustering_nmi"]) == pytest.approx(1.0)


def test_random_labels_ami_near_zero_while_nmi_is_not():
    x, _ = blobs(60, 5, 8, 0.1, seed=1)
    y = torch.randint(0, 5, (len(x),), generator=torch.Generator().manual_seed(2))
    out = clustering_scores(x, y)
    assert abs(float(out["clustering_ami"])) < 0.03
    assert float(out["clustering_nmi"]) > float(out["clustering_ami"]) + 0.005


def test_nmi_matches_contingency_formula_on_noisy_clusters():
    x, y = blobs(40, 4, 6, 6.0, seed=3)                  # overlapping: NMI strictly in (0, 1)
    clusters = kmeans_labels(x, n_clusters=4, n_init=10, seed=0)
    want = naive_nmi(y.tolist(), clusters.tolist())
    got = float(clustering_scores(x, y, seed=0)["clustering_nmi"])
    assert 0.05 < got < 0.95
    assert got == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="n_clusters: expected at most"):
        clustering_scores(x[:3], y[:3], n_clusters=5)
    with pytest.raises(ValueError, match="labels: expected 160 labels"):
        clustering_scores(x, y[:5])


# ------------------------------------------------------------------ nDCG


def test_ndcg_graded_and_binary_match_naive_loop():
    g = torch.Generator().manual_seed(4)
    q, m = torch.randn(7, 5, generator=g), torch.randn(12, 5, generator=g)
    grades = torch.randint(0, 4, (7, 12), generator=g)
    grades[3] = 0                                            # a query with nothing relevant
    exp_gains = (2.0 ** grades.double() - 1).tolist()
    for k in (1, 3, 10, 50):
        got = ndcg_at_k(q, m, relevance=grades, ks=(k,))[f"query_to_item_ndcg@{k}"]
        assert float(got) == pytest.approx(naive_ndcg(q, m, exp_gains, k), rel=1e-9)
        assert got.protocol["queries_without_relevant"] == 1
        lin = ndcg_at_k(q, m, relevance=grades, ks=(k,), gain="linear")
        assert float(lin[f"query_to_item_ndcg@{k}"]) == pytest.approx(
            naive_ndcg(q, m, grades.double().tolist(), k), rel=1e-9)
    # several positives per query by group ids; chunking changes nothing
    qg, ig = [0, 1, 2, 0, 1, 2, 0], [0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2]
    binary = [[1.0 if a == b else 0.0 for b in ig] for a in qg]
    got = ndcg_at_k(q, m, query_groups=qg, item_groups=ig, ks=(5,), chunk_size=2)
    assert float(got["query_to_item_ndcg@5"]) == pytest.approx(naive_ndcg(q, m, binary, 5))
    assert got["query_to_item_ndcg@5"].protocol["relevance"] == "same group id"


def test_ndcg_known_answers():
    m = torch.eye(4)
    # the relevant items ranked first, in grade order: 1
    q = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert float(ndcg_at_k(q, m, relevance=[[3, 2, 1, 0]], ks=(4,))[
        "query_to_item_ndcg@4"]) == pytest.approx(1.0)
    # one relevant item at rank 2 of a binary query: 1 / log2(3)
    q = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    assert float(ndcg_at_k(q, m, relevance=[[True, False, False, False]], ks=(3,))[
        "query_to_item_ndcg@3"]) == pytest.approx(1 / math.log2(3))
    # a collapsed embedding ranks ties against the query: the worst order, not the best
    flat = torch.ones(4, 3)
    rel = [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    worst = 1 / math.log2(5)                                 # the relevant item comes last
    assert float(ndcg_at_k(flat, flat, relevance=torch.tensor(rel, dtype=torch.bool),
                           ks=(4,))["query_to_item_ndcg@4"]) == pytest.approx(worst)
    with pytest.raises(ValueError, match="relevance: expected finite grades >= 0"):
        ndcg_at_k(q, m, relevance=[[-1, 0, 0, 0]])
    with pytest.raises(ValueError, match="gain: expected"):
        ndcg_at_k(q, m, relevance=[[1, 0, 0, 0]], gain="cubic")
    with pytest.raises(ValueError, match="no query has a relevant item"):
        ndcg_at_k(q, m, relevance=[[0, 0, 0, 0]])


# ------------------------------------------------------------------ geometry


def test_geometry_matches_formula_and_known_cases():
    g = torch.Generator().manual_seed(5)
    z1 = torch.randn(30, 6, generator=g)
    z2 = z1 + 0.3 * torch.randn(30, 6, generator=g)
    out = geometry_metrics(z1, z2, views="test views")
    x, y = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
    want_align = sum(float((x[i] - y[i]).pow(2).sum()) for i in range(30)) / 30

    def unif(v):
        terms = [math.exp(-2 * float((v[i] - v[j]).pow(2).sum()))
                 for i in range(len(v)) for j in range(i + 1, len(v))]
        return math.log(sum(terms) / len(terms))

    assert float(out["alignment"]) == pytest.approx(want_align, rel=1e-9)
    assert float(out["uniformity"]) == pytest.approx((unif(x) + unif(y)) / 2, rel=1e-9)
    assert out["alignment"].protocol["views"] == "test views"
    assert out["uniformity"].protocol["reference"] == "Wang & Isola, 2020"
    # identical views align perfectly; a collapsed set has uniformity 0
    assert float(geometry_metrics(z1, z1)["alignment"]) == 0.0
    same = torch.ones(10, 4)
    assert float(geometry_metrics(same, same)["uniformity"]) == pytest.approx(0.0, abs=1e-12)
    sub = geometry_metrics(z1, z2, max_uniformity_items=10, seed=1)["uniformity"]
    assert sub.protocol["n_items_used"] == 10 and "random 10 of 30" in sub.protocol["subset"]
    with pytest.raises(ValueError, match="z2: expected shape"):
        geometry_metrics(z1, z2[:5])


# ------------------------------------------------------------------ nearfar eval end to end

TINY = ["trainer.steps=6", "trainer.batch_size=32", "trainer.warmup_steps=1",
        "trainer.progress=false", "trainer.precision=\"fp32\"", "trainer.channels_last=false",
        "eval.probe_epochs=5", "data.test_size=200"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from nearfar.cli import main

    d = tmp_path_factory.mktemp("runs") / "tiny"
    args = [a for o in TINY for a in ("--set", o)]
    assert main(["train", *args, "--set", 'card.out_of_scope_uses=["surveillance"]',
                 "--run-dir", str(d), "--no-progress"]) == 0
    return d


def test_train_records_new_protocols_and_recipe_uses(run_dir):
    from nearfar.card import check_card, read_card

    card = read_card(run_dir)
    metrics = {r["metric"]: r for r in card["evaluation"]["results"]}
    for name in ("knn_top1", "clustering_nmi", "clustering_ami", "effective_rank",
                 "numerical_rank", "k_occurrence_skewness", "antihub_share", "alignment",
                 "uniformity"):
        assert name in metrics and metrics[name]["protocol"]["name"], name
    assert 1.0 <= metrics["effective_rank"]["value"] <= metrics["numerical_rank"]["value"]
    assert card["out_of_scope_uses"] == ["surveillance"]
    assert card["uses_declared_by"] == "recipe"
    assert check_card(card, run_dir) == []


def test_eval_protocols_flag_json_and_printed_protocols(run_dir, capsys):
    from nearfar.cli import main

    assert main(["eval", str(run_dir), "--protocols", "clustering,rank,retrieval", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert {r["protocol"]["name"] for r in results} == {"clustering", "rank", "retrieval"}
    assert all(r["protocol"].get("n_test") == 200 for r in results)
    saved = {r["metric"]: r["value"] for r in
             json.loads((run_dir / "eval.json").read_text())["results"]}
    for r in results:                                        # same numbers as training
        if r["metric"] in saved:
            assert r["value"] == pytest.approx(saved[r["metric"]], rel=1e-6)
    ndcg = next(r for r in results if r["metric"] == "test_to_train_ndcg@10")
    assert ndcg["protocol"]["n_train"] == 4800 and 0 < ndcg["value"] <= 1
    assert main(["eval", str(run_dir), "--protocols", "geometry,hubness"]) == 0
    out = capsys.readouterr().out
    for line in out.splitlines()[1:]:
        assert "[geometry:" in line or "[hubness:" in line, line
    assert main(["eval", str(run_dir), "--protocols", "knn,bogus"]) == 2
    assert "unknown 'bogus'" in capsys.readouterr().err
