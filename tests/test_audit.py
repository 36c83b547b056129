"""Audits: planted effects are found, clean controls are not flagged, the numbers match
independent naive implementations, and `nearfar audit` runs end to end on a tiny run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from nearfar.audit import (
    PromptSet,
    attribute_leakage,
    audit_embeddings,
    domain_shift,
    error_rates,
    knn_item_scores,
    neighbour_composition,
    prompt_sensitivity,
    render_html,
    subgroup_performance,
    threshold_at_fmr,
    threshold_audit,
    write_report,
)
from nearfar.audit.leakage import _folds
from nearfar.audit.threshold import pair_scores
from nearfar.evaluate import hubness, k_occurrence
from nearfar.index.threshold import find_t_star

# ------------------------------------------------------------------ synthetic data


def make_data(seed=0, *, degrade=None, leak=False, n_subjects=90, per_subject=4, classes=5,
              dim=32, spread=1.0):
    """Items of subjects; each subject has one label, one group (a/b/c) and one sensitive
    value (f/m), independent of each other. ``degrade`` noises one group's embeddings;
    ``leak`` writes the sensitive value into one coordinate."""
    g = np.random.default_rng(seed)
    centres = g.normal(size=(classes, dim))
    subj = np.repeat(np.arange(n_subjects), per_subject)
    groups = np.array(["a", "b", "c"])[subj % 3]
    sensitive = np.array(["f", "m"])[(subj // 3) % 2]
    labels = g.integers(0, classes, n_subjects)[subj]
    emb = (centres[labels] + spread * 0.6 * g.normal(size=(n_subjects, dim))[subj]
           + spread * 0.6 * g.normal(size=(len(subj), dim)))
    if degrade is not None:
        m = groups == degrade
        emb[m] += 3.0 * g.normal(size=(int(m.sum()), dim))
    if leak:
        emb[:, 0] += np.where(sensitive == "f", 1.5, -1.5)
    return torch.tensor(emb, dtype=torch.float32), labels, groups, subj, sensitive


# ------------------------------------------------------------------ hubness


def naive_k_occurrence(x, k):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    counts = np.zeros(len(x), dtype=np.int64)
    for i in range(len(x)):
        sims = [(float(x[i] @ x[j]), -j, j) for j in range(len(x)) if j != i]
        for _, _, j in sorted(sims, reverse=True)[:k]:
            counts[j] += 1
    return counts


def test_k_occurrence_matches_naive_and_skewness_formula():
    x = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    counts = k_occurrence(x, k=5)
    assert counts.tolist() == naive_k_occurrence(x.double().numpy(), 5).tolist()
    assert int(counts.sum()) == 60 * 5
    h = hubness(x, k=5)
    c = counts.double().numpy()
    expected = ((c - c.mean()) ** 3).mean() / c.std() ** 3
    assert h["skewness"] == pytest.approx(expected, rel=1e-9)
    assert h["antihub_share"] == pytest.approx(float((c == 0).mean()))
    assert h["protocol"]["k"] == 5 and "Radovanovic" in h["protocol"]["reference"]


def test_planted_hub_and_antihub():
    g = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    cloud = 3 * u + torch.randn(200, 16, generator=g)
    x = torch.cat([cloud, u[None], -u[None]])           # the cloud's centre, its opposite
    counts = k_occurrence(x, k=10)
    assert counts[200] > 2 * 10                          # the centre is a hub
    assert counts[201] == 0                              # the opposite pole is an antihub
    assert hubness(x, k=10)["skewness"] > 0


# ------------------------------------------------------------------ subgroups


@pytest.mark.parametrize("seed", [0, 1])
def test_degraded_group_is_flagged_and_clean_control_is_not(seed):
    emb, y, groups, subj, _ = make_data(seed, degrade="c", spread=2.0)
    scores = knn_item_scores(emb, y, k=10, query_ids=subj)
    res = subgroup_performance(scores, groups, subjects=subj, n_boot=500, seed=seed)
    flagged = {(f["metric"], f["group"]) for f in res["flags"]}
    assert flagged and {g for _, g in flagged} == {"c"}
    assert res["metrics"]["knn_correct"]["between_groups"]["worst"] == "c"

    emb, y, groups, subj, _ = make_data(seed, spread=2.0)
    scores = knn_item_scores(emb, y, k=10, query_ids=subj)
    acc = scores["knn_correct"].mean()
    assert 0.6 < acc < 0.97                              # not trivially perfect
    clean = subgroup_performance(scores, groups, subjects=subj, n_boot=500, seed=seed)
    assert clean["flags"] == []


def test_group_values_gaps_and_ratios_match_direct_computation():
    emb, y, groups, subj, _ = make_data(3, spread=2.0)
    scores = knn_item_scores(emb, y, k=5, query_ids=subj)
    res = subgroup_performance(scores, groups, subjects=subj, n_boot=100)
    m = res["metrics"]["neighbour_precision"]
    overall = scores["neighbour_precision"].mean()
    for g in "abc":
        v = scores["neighbour_precision"][groups == g].mean()
        assert m["groups"][g]["value"] == pytest.approx(v)
        assert m["groups"][g]["gap"] == pytest.approx(v - overall)
        assert m["groups"][g]["ratio"] == pytest.approx(v / overall)
        lo, hi = m["groups"][g]["ci"]
        assert lo <= v <= hi
        assert m["groups"][g]["n_units"] == len(set(subj[groups == g]))
    assert res["protocol"]["resampled_unit"] == "subject"
    assert res["protocol"]["pairs_resampled"] is False


def test_knn_item_scores_never_use_the_same_subject():
    # every subject's items are identical: with its own subject visible each item would
    # be trivially right; with it excluded, labels are random across subjects
    g = np.random.default_rng(0)
    base = g.normal(size=(50, 16))
    subj = np.repeat(np.arange(50), 3)
    y = g.integers(0, 2, 50)[subj]
    emb = torch.tensor(base[subj], dtype=torch.float32)
    leaky = knn_item_scores(emb, y, k=2)["knn_correct"].mean()
    fair = knn_item_scores(emb, y, k=2, query_ids=subj)["knn_correct"].mean()
    assert leaky == 1.0 and fair < 0.75


def _clustered(seed, n_subjects=30, per_subject=8, p=0.7):
    g = np.random.default_rng(seed)
    subj = np.repeat(np.arange(n_subjects), per_subject)
    correct = (g.random(n_subjects) < p).astype(float)[subj]  # a subject is all right or wrong
    groups = np.array(["a", "b"])[subj % 2]
    return {"acc": correct}, groups, subj


def test_subject_bootstrap_covers_and_an_item_bootstrap_is_too_narrow():
    # items of one subject are perfectly correlated, as pairs of one subject are: an
    # interval that resamples items (or pairs) treats 8 copies as 8 observations
    cover = {"subject": 0, "item": 0}
    widths = {"subject": [], "item": []}
    trials = 60
    for seed in range(trials):
        scores, groups, subj = _clustered(seed)
        for unit, s in (("subject", subj), ("item", None)):
            res = subgroup_performance(scores, groups, subjects=s, n_boot=200,
                                       confidence=0.9, seed=seed)
            lo, hi = res["metrics"]["acc"]["overall"]["ci"]
            cover[unit] += lo <= 0.7 <= hi
            widths[unit].append(hi - lo)
    assert np.mean(widths["subject"]) > 2 * np.mean(widths["item"])
    assert cover["subject"] / trials >= 0.75             # nominal 0.9
    assert cover["item"] / trials <= 0.6                 # far below nominal


# ------------------------------------------------------------------ neighbours


def test_neighbour_composition_finds_a_separated_group():
    emb, y, groups, subj, _ = make_data(0, spread=2.0)
    clean = neighbour_composition(emb, groups, k=10, subjects=subj)
    for g in "abc":
        assert 0.6 < clean["own_group"][g]["enrichment"] < 1.5
        assert sum(clean["share"][g].values()) == pytest.approx(1.0)
    apart = emb.clone()
    apart[torch.as_tensor(groups == "c")] += 4.0
    res = neighbour_composition(apart, groups, k=10, subjects=subj)
    assert res["own_group"]["c"]["enrichment"] > 2.5
    # base rate: a c item (4 of its subject's items excluded) could draw 116 of 356 c items
    assert res["base_rate"]["c"]["c"] == pytest.approx(116 / 356)


# ------------------------------------------------------------------ thresholds


def _naive_pairs(ids):
    gen, imp = [], []
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            (gen if ids[i] == ids[j] else imp).append((i, j))
    return gen, imp


def test_threshold_math_matches_naive_counts():
    g = np.random.default_rng(0)
    n = 48
    ids = g.integers(0, 8, n)
    groups = np.array(["x", "y"])[g.integers(0, 2, n)]
    emb = torch.tensor(g.normal(size=(8, 6))[ids] + g.normal(size=(n, 6)), dtype=torch.float32)
    x = torch.nn.functional.normalize(emb.double(), dim=1).numpy()
    gen_p, imp_p = _naive_pairs(ids)
    # the library's scores agree with the naive ones; the counts below use the library's
    # so that a pair lying exactly at T* is counted the same way on both sides
    every = np.array(gen_p + imp_p)
    scores = pair_scores(emb, every)
    assert scores == pytest.approx([x[i] @ x[j] for i, j in every], abs=1e-12)
    score = {(int(i), int(j)): s for (i, j), s in zip(every, scores)}
    gen = np.array([score[p] for p in gen_p])
    imp = np.array([score[p] for p in imp_p])
    for t in np.linspace(-1, 1, 41):
        fmr, fnmr = error_rates(gen, imp, [t])
        assert fmr[0] == sum(s >= t for s in imp) / len(imp)
        assert fnmr[0] == sum(s < t for s in gen) / len(gen)
    target = 0.05
    t_star, achieved = threshold_at_fmr(imp, target)
    candidates = sorted(set(np.concatenate([imp, np.nextafter(imp, np.inf)])))
    naive_t = min(t for t in candidates if sum(s >= t for s in imp) / len(imp) <= target)
    assert t_star == naive_t
    assert achieved == sum(s >= t_star for s in imp) / len(imp) <= target

    res = threshold_audit(emb, ids, groups, target_fmr=target, n_boot=0)
    assert res["t_star"] == t_star
    assert res["n_genuine"] == len(gen_p) and res["n_impostor"] == len(imp_p)
    ts = res["t_star"]
    for a in ("x", "y"):
        gp = [(i, j) for i, j in gen_p if groups[i] == groups[j] == a]
        ip = [(i, j) for i, j in imp_p if groups[i] == groups[j] == a]
        assert res["groups"][a]["fnmr"] == pytest.approx(
            sum(score[p] < ts for p in gp) / len(gp))
        assert res["groups"][a]["fmr"] == pytest.approx(
            sum(score[p] >= ts for p in ip) / len(ip))
    cross = [(i, j) for i, j in imp_p if groups[i] != groups[j]]
    assert res["impostor_matrix"]["x"]["y"] == pytest.approx(
        sum(score[p] >= ts for p in cross) / len(cross))
    assert res["impostor_matrix"]["x"]["y"] == res["impostor_matrix"]["y"]["x"]
    # the DET points are the FMR / FNMR curves; FMR falls and FNMR rises with t
    assert np.all(np.diff(res["curves"]["fmr"]) <= 0)
    assert np.all(np.diff(res["curves"]["fnmr"]) >= 0)


def test_target_fmr_below_resolution_is_stated():
    imp = np.linspace(0, 1, 50)
    t, achieved = threshold_at_fmr(imp, 1e-3)
    assert t > imp.max() and achieved == 0.0


def test_pair_bootstrap_is_narrower_than_subject_bootstrap():
    # one subject's genuine pairs all pass or all fail together
    g = np.random.default_rng(0)
    n_subj, per = 40, 6
    subj = np.repeat(np.arange(n_subj), per)
    tight = g.random(n_subj) < 0.5
    centres = g.normal(size=(n_subj, 32))
    spread = np.where(tight, 0.05, 3.0)[subj][:, None]
    emb = torch.tensor(centres[subj] + spread * g.normal(size=(len(subj), 32)),
                       dtype=torch.float32)
    groups = np.array(["a", "b"])[subj % 2]
    res = threshold_audit(emb, subj, groups, subjects=subj, target_fmr=0.01, n_boot=300)
    lo, hi = res["groups"]["a"]["fnmr_ci"]
    # pair-level bootstrap of the same rate, resampling genuine pairs as if independent
    gen_p = [(i, j) for i, j in _naive_pairs(subj)[0] if groups[i] == "a"]
    rej = pair_scores(emb, np.array(gen_p)) < res["t_star"]
    boots = [rej[g.integers(0, len(rej), len(rej))].mean() for _ in range(300)]
    plo, phi = np.percentile(boots, [2.5, 97.5])
    assert res["groups"]["a"]["fnmr"] == pytest.approx(rej.mean())
    assert (hi - lo) > 2 * (phi - plo)


# ------------------------------------------------------------------ leakage


def test_planted_leakage_is_found_and_clean_control_is_not():
    emb, _, _, subj, sens = make_data(0, leak=True)
    res = attribute_leakage(emb, sens, subjects=subj)
    assert res["flagged"] and res["probe_accuracy"] > 0.85
    assert res["selectivity"] > 0.3 and res["control_accuracy"] < 0.65

    emb, _, _, subj, sens = make_data(0)
    clean = attribute_leakage(emb, sens, subjects=subj)
    assert not clean["flagged"]
    assert abs(clean["selectivity"]) < 0.1
    assert clean["probe_accuracy"] < clean["majority_baseline"] + 0.1


def test_leakage_folds_never_split_a_subject_and_item_folds_would_be_fooled():
    # each subject has a distinct identity direction and a random attribute: seen
    # subjects can be recognised, but the attribute itself is not in the embedding
    g = np.random.default_rng(0)
    n_subj, per = 60, 4
    subj = np.repeat(np.arange(n_subj), per)
    sens = np.array(["f", "m"])[g.integers(0, 2, n_subj)][subj]
    emb = torch.tensor(3 * g.normal(size=(n_subj, 128))[subj]
                       + 0.5 * g.normal(size=(len(subj), 128)), dtype=torch.float32)
    codes = (sens == "m").astype(int)
    folds, _ = _folds(codes, subj, 5, 0)
    for train, test in folds:
        assert not set(subj[train]) & set(subj[test])
    grouped = attribute_leakage(emb, sens, subjects=subj)
    ungrouped = attribute_leakage(emb, sens)             # items as independent
    assert not grouped["flagged"]
    assert ungrouped["probe_accuracy"] > 0.9             # recognises subjects, not the attribute


# ------------------------------------------------------------------ shift and prompts


def test_domain_shift_gap_and_domain_classifier():
    emb, y, _, subj, _ = make_data(0, spread=2.0)
    same = domain_shift(emb, y, emb.clone(), y, aligned=True, subjects=subj)
    assert same["gap"] == pytest.approx(0.0, abs=1e-12)
    assert same["domain_classifier"]["auroc"] < 0.65
    g = torch.Generator().manual_seed(0)
    shifted = emb + 2.0 * torch.randn(emb.shape, generator=g) + 1.0
    moved = domain_shift(emb, y, shifted, y, aligned=True, subjects=subj)
    assert moved["gap"] < -0.1
    assert moved["domain_classifier"]["auroc"] > 0.9


def test_prompt_sensitivity_per_template_against_direct_zero_shot():
    g = torch.Generator().manual_seed(0)
    classes = ["cat", "dog", "owl"]
    vecs = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1)
    y = torch.arange(90) % 3
    images = vecs[y] + 0.2 * torch.randn(90, 16, generator=g)
    groups = ["left" if i < 45 else "right" for i in range(90)]

    def encode_text(texts):
        out = []
        for t in texts:
            c = classes.index(t.split()[-1])
            if t.startswith("a scrambled"):
                c = (c + 1) % 3                          # this wording names the wrong class
            elif t.startswith("a half") and c == 2:
                c = 0                                    # this one fails one class
            out.append(vecs[c])
        return torch.stack(out)

    templates = ["a photo of a {}", "a scrambled {}", "a half {}"]
    res = prompt_sensitivity(images, y, classes, templates, encode_text, groups=groups)
    accs = [res["templates"][t]["accuracy"] for t in templates]
    direct = [float(((images @ vecs.T).argmax(1) == y).double().mean()), 0.0, 2 / 3]
    assert accs == pytest.approx(direct, abs=1e-9)
    assert res["mean"] == pytest.approx(np.mean(accs))
    assert res["std"] == pytest.approx(np.std(accs))
    assert res["range"] == pytest.approx(max(accs) - min(accs))
    assert set(res["templates"]["a photo of a {}"]["groups"]) == {"left", "right"}
    assert res["templates"]["a half {}"]["worst_group_accuracy"] == pytest.approx(2 / 3)

    # through the suite and into the page
    result = audit_embeddings(images, groups=groups, labels=y, n_boot=50, threshold_boot=0,
                              prompts=PromptSet(classes, templates, encode_text))
    assert result.record["sections"]["prompts"]["range"] == pytest.approx(res["range"])
    page = render_html(result.record, {})
    assert "Prompt sensitivity" in page and "a scrambled {}" in page


# ------------------------------------------------------------------ report


def _external_urls(page: str) -> list[str]:
    return re.findall(r"(?:src|href)\s*=\s*[\"']?(?!data:)[a-z]+://|url\(\s*[\"']?https?:"
                      r"|@import", page, flags=re.I)


def test_report_json_html_and_t_star_where_the_index_reads_it(tmp_path):
    emb, y, groups, subj, sens = make_data(0, degrade="c", leak=True, spread=2.0)
    result = audit_embeddings(emb, groups=groups, labels=y, subjects=subj, sensitive=sens,
                              n_boot=200, threshold_boot=50)
    rec = result.record
    kinds = {(f["kind"], f.get("group")) for f in rec["flags"]}
    assert ("subgroup", "c") in kinds and ("leakage", None) in kinds
    assert not {g for k, g in kinds if k == "subgroup"} - {"c"}
    paths = write_report(tmp_path, rec, result.plots, html_report=False)   # HTML: the CLI test
    saved = json.loads(paths["json"].read_text())
    assert saved["t_star"] == rec["sections"]["threshold"]["t_star"]
    found = find_t_star(tmp_path)
    assert found is not None and found[0] == pytest.approx(rec["t_star"])
    for name in ("subgroup", "neighbours", "threshold", "leakage"):
        assert "protocol" in saved["sections"][name]
    assert "html" not in paths


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _render_in_chromium(html_path, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian's `chromium` package): the headless "
                    "rendering check of audit.html did not run")
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          html_path.as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "nearfar audit" in out.stdout and "Threshold sensitivity" in out.stdout


def test_clean_audit_flags_nothing():
    emb, y, groups, subj, sens = make_data(1, spread=2.0)
    rec = audit_embeddings(emb, groups=groups, labels=y, subjects=subj, sensitive=sens,
                           n_boot=300, threshold_boot=0).record
    assert rec["flags"] == []
    assert not rec["sections"]["leakage"]["flagged"]


# ------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def audit_run_dir(tmp_path_factory):
    """A tiny run on MNIST digits whose metadata has subjects, groups and a sensitive
    column; group c's images are half noise."""
    from nearfar.cli import main
    from nearfar.data import ImageDataset, load_dataset, register_dataset

    def load_toy() -> ImageDataset:
        ds = load_dataset("mnist5k").subset(list(range(0, 5000, 5)))       # 1,000 images
        n = len(ds)
        subj = [i // 4 for i in range(n)]
        groups = ["abc"[s % 3] for s in subj]
        images = ds.images.clone()
        g = torch.Generator().manual_seed(0)
        c = torch.tensor([gr == "c" for gr in groups])
        noise = torch.randint(0, 256, images[c].shape, generator=g, dtype=torch.uint8)
        images[c] = (images[c] // 2 + noise // 2)
        meta = {**ds.meta, "subject": subj, "group": groups,
                "sex": ["fm"[(s // 3) % 2] for s in subj]}
        return ImageDataset(images=images, labels=ds.labels, meta=meta, name="audit_toy",
                            label_names=ds.label_names)

    register_dataset("audit_toy", load_toy, overwrite=True)
    run = tmp_path_factory.mktemp("audit") / "run"
    sets = ["trainer.steps=4", "trainer.batch_size=32", "trainer.warmup_steps=1",
            "trainer.log_every=2", "trainer.checkpoint_every=4", "trainer.progress=false",
            'trainer.precision="fp32"', "trainer.channels_last=false", "eval.probe_epochs=5",
            'data.source="audit_toy"', "data.test_size=400"]
    args = ["train", "--run-dir", str(run), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    return run


def test_cli_audit_end_to_end(audit_run_dir, capsys):
    from nearfar.cli import main

    capsys.readouterr()
    rc = main(["audit", str(audit_run_dir), "--group-by", "group", "--subject-by", "subject",
               "--sensitive", "sex", "--shift", "noise", "--bootstrap", "200"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rec = json.loads((audit_run_dir / "audit.json").read_text())
    assert rec["n_items"] == 400 and rec["group_by"] == "group"
    assert rec["encoder"]["weights_sha256"]
    assert {"subgroup", "neighbours", "threshold", "ood", "leakage"} <= set(rec["sections"])
    assert "prompts" in rec["skipped"]                    # not an image-text run
    # the noised group is the worst and flagged; the planted-free sensitive column is not
    knn = rec["sections"]["subgroup"]["metrics"]["knn_correct"]
    assert knn["between_groups"]["worst"] == "c"
    assert {f["group"] for f in rec["flags"] if f["kind"] == "subgroup"} == {"c"}
    assert not rec["sections"]["leakage"]["flagged"]
    assert rec["sections"]["ood"]["gap"] < 0
    assert find_t_star(audit_run_dir)[0] == pytest.approx(rec["t_star"])
    assert "T* =" in out and "wrote" in out
    import nearfar.card as card_module

    if hasattr(card_module, "attach_audit"):             # audits attach to the card by sha256
        from nearfar.durable import sha256_file

        entries = [a for a in card_module.read_card(audit_run_dir).get("audits", [])
                   if a["path"] == "audit.json"]
        assert entries and entries[-1]["sha256"] == sha256_file(audit_run_dir / "audit.json")
        assert rec["summary"]["flagged"] == entries[-1]["summary"]["flagged"]
    page = (audit_run_dir / "audit.html").read_text()
    assert _external_urls(page) == [] and "<script" not in page
    assert page.count("data:image/png;base64,") >= 3     # map, bars, threshold curves

    out_dir = audit_run_dir / "elsewhere"
    assert main(["audit", str(audit_run_dir), "--group-by", "group", "--no-html",
                 "--bootstrap", "50", "--out", str(out_dir), "--fail-on-flag"]) == 1
    assert (out_dir / "audit.json").exists() and not (out_dir / "audit.html").exists()


def test_audit_html_renders_in_headless_chromium(audit_run_dir, tmp_path):
    page = audit_run_dir / "audit.html"
    if not page.exists():
        pytest.skip("audit.html is written by test_cli_audit_end_to_end; run it first")
    _render_in_chromium(page, tmp_path)


def test_cli_audit_errors_are_one_line(audit_run_dir, tmp_path, capsys):
    from nearfar.cli import main

    capsys.readouterr()
    assert main(["audit", str(audit_run_dir), "--group-by", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--group-by" in err and "nosuch" in err and "subject" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert main(["audit", str(tmp_path / "missing"), "--group-by", "group"]) == 2
    assert "no such run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["audit", str(audit_run_dir), "--group-by", "group", "--target-fmr", "2"])
    assert e.value.code == 2


def test_binomial_tail_matches_scipy():
    from scipy.stats import binomtest

    from nearfar.audit.leakage import binomial_tail

    for k, n, p in [(0, 10, 0.5), (7, 10, 0.5), (60, 100, 0.5), (95, 120, 0.7), (3, 3, 0.9)]:
        expected = binomtest(k, n, p, alternative="greater").pvalue
        assert binomial_tail(k, n, p) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_threshold_bootstrap_matches_naive_pair_weighting():
    # each replicate: a pair of two subjects drawn c_a and c_b times weighs c_a * c_b, a
    # pair within one subject c_a; the rate at the fixed T* is the weighted share
    from nearfar.audit.groups import bootstrap_draws

    g = np.random.default_rng(0)
    subj = np.repeat(np.arange(30), 3)
    groups = np.array(["a", "b"])[g.integers(0, 2, 30)][subj]
    emb = torch.tensor(g.normal(size=(30, 8))[subj] + g.normal(size=(90, 8)),
                       dtype=torch.float32)
    res = threshold_audit(emb, subj, groups, subjects=subj, target_fmr=0.02, n_boot=60, seed=4)
    gen_p, imp_p = _naive_pairs(subj)
    every = np.array(gen_p + imp_p)
    score = {(int(i), int(j)): s for (i, j), s in zip(every, pair_scores(emb, every))}
    draws = np.concatenate(list(bootstrap_draws(30, 60, 5)))
    for name in ("a", "b"):
        fnmr, fmr = [], []
        for c in draws:
            def rate(pairs, hit, c=c):
                w = [c[subj[i]] * (c[subj[j]] if subj[i] != subj[j] else 1) for i, j in pairs]
                h = [hit(score[p]) for p in pairs]
                return np.dot(w, h) / np.sum(w) if np.sum(w) else np.nan
            inside = [(i, j) for i, j in gen_p if groups[i] == groups[j] == name]
            fnmr.append(rate(inside, lambda s: s < res["t_star"]))
            inside = [(i, j) for i, j in imp_p if groups[i] == groups[j] == name]
            fmr.append(rate(inside, lambda s: s >= res["t_star"]))
        assert res["groups"][name]["fnmr_ci"] == pytest.approx(
            np.nanpercentile(fnmr, [2.5, 97.5]).tolist())
        assert res["groups"][name]["fmr_ci"] == pytest.approx(
            np.nanpercentile(fmr, [2.5, 97.5]).tolist())


def test_an_audit_that_cannot_run_says_why_and_the_rest_still_runs():
    emb, y, groups, subj, _ = make_data(0, spread=2.0)
    constant = ["x"] * len(y)                             # nothing to probe for
    rec = audit_embeddings(emb, groups=groups, labels=y, subjects=subj, sensitive=constant,
                           n_boot=50, threshold_boot=0).record
    assert "leakage" not in rec["sections"] and "2 distinct values" in rec["skipped"]["leakage"]
    assert {"subgroup", "neighbours", "threshold"} <= set(rec["sections"])
