"""The card's JSON Schema, `nearfar card check`, default uses, audits by hash, and the
Hugging Face export (YAML front matter read back with PyYAML)."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from nearfar.card import (
    DEFAULT_OUT_OF_SCOPE_USES,
    SIMILARITY_NOTE,
    attach_audit,
    build_card,
    card_schema,
    check_card,
    huggingface_readme,
    read_card,
    render_markdown,
    schema_errors,
    write_card,
)
from nearfar.cli import main
from nearfar.evaluate import Result

METHOD = {
    "method": "simclr",
    "objective": {"loss": "nt_xent", "temperature": 0.2, "head_downstream": "dropped"},
    "positives": {"construction": "two random views of one image",
                  "views": [{"name": "random_resized_crop", "scale": [0.2, 1.0]}]},
    "negatives": {"source": "in-batch", "batch_size": 256, "exclusions": ["the anchor"]},
    "modality": "image",
}


def complete_card(method=METHOD, **kw) -> dict:
    knn = Result(0.91, "knn_top1", {"name": "knn", "k": 20, "temperature": 0.07,
                                    "n_train": 4000, "n_test": 1000})
    nmi = Result(0.5, "clustering_nmi", {"name": "clustering", "n_init": 10, "k": 10})
    return build_card(
        method=method,
        encoder={"architecture": "small_cnn", "parameter_count": 1000, "embedding_dim": 64,
                 "weights_sha256": "cd" * 32},
        dataset={"name": "mnist-5k", "version": "1", "source": "bundled", "sha256": "ab" * 32,
                 "splits": {"train": 4000, "test": 1000}},
        evaluation={"protocol": "frozen encoder", "results": [knn, nmi]},
        benchmark={"name": "mnist-5k held-out split", "metrics": ["knn_top1", "clustering_nmi"]},
        seed=0, name="tiny", **kw)


def test_schema_is_valid_draft_2020_12_and_shipped():
    import jsonschema

    schema = card_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert set(schema["required"]) >= {"objective", "positive_construction",
                                       "negative_construction", "modality", "encoder",
                                       "dataset", "benchmark", "evaluation"}


def test_complete_card_passes_and_defaults_list_out_of_scope_uses():
    card = complete_card()
    assert check_card(card) == [] and schema_errors(card) == []
    for use in ("biometric identification", "surveillance", "policing", "employment decisions",
                "credit decisions", "healthcare decisions", "public-benefits decisions"):
        assert use in card["out_of_scope_uses"]
    assert card["uses_note"] == SIMILARITY_NOTE
    assert "identity, intent or eligibility" in card["uses_note"]
    assert card["uses_declared_by"] == "nearfar defaults"
    md = render_markdown(card)
    assert "## Out-of-scope uses" in md and SIMILARITY_NOTE in md


def test_declared_uses_override_defaults():
    card = complete_card(intended_uses=["face matching research"], out_of_scope_uses=[],
                         uses_declared_by="recipe")
    assert card["intended_uses"] == ["face matching research"]
    assert card["out_of_scope_uses"] == [] and card["uses_declared_by"] == "recipe"
    assert card["uses_note"] == SIMILARITY_NOTE             # the note stays
    assert check_card(card) == []
    with pytest.raises(ValueError, match="intended_uses: expected a list of non-empty strings"):
        complete_card(intended_uses="everything")


@pytest.mark.parametrize("path, mutate", [
    ("objective.loss", lambda c: c["objective"].pop("loss")),
    ("positive_construction.construction",
     lambda c: c["positive_construction"].update(construction="")),
    ("negative_construction.source", lambda c: c.update(negative_construction=None)),
    ("modality", lambda c: c.pop("modality")),
    ("encoder.weights_sha256", lambda c: c["encoder"].update(weights_sha256=None)),
    ("dataset.sha256", lambda c: c["dataset"].pop("sha256")),
    ("benchmark.name", lambda c: c.pop("benchmark")),
    ("evaluation.protocol", lambda c: c["evaluation"].pop("protocol")),
    ("evaluation.results[1].protocol", lambda c: c["evaluation"]["results"][1].pop("protocol")),
    ("out_of_scope_uses", lambda c: c.pop("out_of_scope_uses")),
])
def test_each_missing_field_is_named(path, mutate):
    card = complete_card()
    mutate(card)
    problems = check_card(card)
    assert any(p.startswith(path + ":") for p in problems), problems


@pytest.mark.parametrize("path, mutate, words", [
    ("encoder.weights_sha256", lambda c: c["encoder"].update(weights_sha256="abc"), "sha256"),
    ("dataset.sha256", lambda c: c["dataset"].update(sha256="AB" * 32), "sha256"),
    ("evaluation.results[0].protocol.name",
     lambda c: c["evaluation"]["results"][0]["protocol"].pop("name"), "missing"),
    ("evaluation.results[0].value",
     lambda c: c["evaluation"]["results"][0].update(value="high"), "number"),
    ("encoder.embedding_dim", lambda c: c["encoder"].update(embedding_dim="64"), "integer"),
])
def test_invalid_values_are_named(path, mutate, words):
    card = complete_card()
    mutate(card)
    problems = check_card(card)
    hits = [p for p in problems if p.startswith(path + ":")]
    assert hits and words in hits[0], problems


def test_one_problem_per_missing_field_not_a_cascade():
    card = complete_card()
    card["negative_construction"] = None
    problems = check_card(card)
    assert problems == ["negative_construction.source: missing",
                        "negative_construction.batch_size: missing",
                        "negative_construction.exclusions: missing"]


def test_attach_audit_records_hash_and_check_detects_change(tmp_path, capsys):
    run = tmp_path / "run"
    write_card(run, complete_card())
    audit = run / "audits" / "hubness.json"
    audit.parent.mkdir()
    audit.write_text(json.dumps({"kind": "hubness", "summary": {"skewness": 1.5}}))
    entry = attach_audit(run, audit)
    assert entry["kind"] == "hubness" and entry["path"] == "audits/hubness.json"
    assert entry["sha256"] == hashlib.sha256(audit.read_bytes()).hexdigest()
    assert entry["summary"] == {"skewness": 1.5}
    card = read_card(run)
    assert card["audits"] == [entry]
    assert "hubness" in (run / "card.md").read_text() and entry["sha256"] in (
        run / "card.md").read_text()
    assert main(["card", "check", str(run)]) == 0
    assert "ok" in capsys.readouterr().out

    # re-attaching the same file replaces its entry; another file is added
    outside = tmp_path / "bias.txt"
    outside.write_text("plain text audit")
    attach_audit(run, audit, summary="again")
    attach_audit(run, outside, kind="bias")
    card = read_card(run)
    assert [a["kind"] for a in card["audits"]] == ["hubness", "bias"]
    assert card["audits"][0]["summary"] == "again"
    assert card["audits"][1]["path"] == str(outside.resolve())

    audit.write_text(json.dumps({"kind": "hubness", "summary": {"skewness": 0.1}}))  # edited
    outside.unlink()
    assert main(["card", "check", str(run)]) == 1
    out = capsys.readouterr().out
    assert "audits[0] (hubness)" in out and "changed since it was attached" in out
    assert "audits[1] (bias)" in out and "is missing" in out
    with pytest.raises(FileNotFoundError, match="audit_path"):
        attach_audit(run, tmp_path / "nope.json")


def test_card_cli_subcommands_and_old_forms(tmp_path, capsys):
    run = tmp_path / "run"
    write_card(run, complete_card())
    assert main(["card", str(run)]) == 0                      # old form: show
    assert "# Card: tiny" in capsys.readouterr().out
    assert main(["card", "show", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "tiny"
    assert main(["card", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "tiny"
    card = read_card(run)
    del card["dataset"]["sha256"]
    card["evaluation"]["results"][0]["protocol"] = {}
    write_card(run, card)
    assert main(["card", "check", str(run)]) == 1
    out = capsys.readouterr().out
    assert "dataset.sha256: missing" in out
    assert "evaluation.results[0].protocol: missing" in out
    assert main(["card", "check", str(tmp_path / "none")]) == 2
    assert "no card found" in capsys.readouterr().err


def test_huggingface_export_model_index_matches_card(tmp_path, capsys):
    run = tmp_path / "run"
    card = complete_card()
    card["evaluation"]["results"].append(
        {"metric": "tiny_value", "value": 1e-05, "protocol": {"name": "rank", "tol": 1e-6}})
    card["license"] = "apache-2.0"
    write_card(run, card)
    out = tmp_path / "hf" / "README.md"
    assert main(["card", "export", str(run), "--format", "huggingface", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "nearfar" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["mnist-5k"] and "simclr" in meta["tags"]
    (index,) = meta["model-index"]
    assert index["name"] == "tiny"
    got = {m["type"]: (m["value"], m["name"], r["task"]["name"])
           for r in index["results"] for m in r["metrics"]}
    want = {r["metric"]: r for r in card["evaluation"]["results"]}
    assert set(got) == set(want)
    for metric, (value, name, task) in got.items():
        assert isinstance(value, float) and value == want[metric]["value"]   # exact
        assert task == want[metric]["protocol"]["name"]
        assert want[metric]["protocol"]["name"] in name                    # states its protocol
    assert {r["task"]["type"] for r in index["results"]} == {"image-classification",
                                                             "feature-extraction"}
    assert "# Card: tiny" in body and "## Out-of-scope uses" in body
    # default location, and a card with awkward strings still round-trips
    card["name"] = 'quote " colon: # hash'
    write_card(run, card)
    assert main(["card", "export", str(run)]) == 0
    meta = yaml.safe_load((run / "README.md").read_text()[4:].split("\n---\n")[0])
    assert meta["model-index"][0]["name"] == card["name"]
    assert "license" not in yaml.safe_load(huggingface_readme(
        {**card, "license": None})[4:].split("\n---\n")[0])


def test_defaults_constant_is_what_cards_get():
    assert complete_card()["out_of_scope_uses"] == list(DEFAULT_OUT_OF_SCOPE_USES)


@pytest.mark.parametrize("name", ["simclr", "moco_v2", "moco_v3", "byol", "simsiam",
                                  "barlow_twins", "vicreg", "dino", "supcon"])
def test_every_image_method_description_fits_the_schema(name):
    # what each method's describe() states (a learned or per-branch temperature is an
    # object) must be valid card data, not only the hand-written example above
    from nearfar.methods import build_method
    from nearfar.views import default_mnist_views

    method = build_method(name, encoder="small_cnn", views=default_mnist_views(),
                          encoder_kwargs={"in_channels": 1})
    method.batch_size = 32                   # what the trainer records before describe()
    card = complete_card(method=method.describe())
    assert schema_errors(card) == [] and check_card(card) == []
