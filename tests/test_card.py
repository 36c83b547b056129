import hashlib
import json
import os

import pytest
import torch

from nearfar.card import (
    REQUIRED_FIELDS,
    SECTIONS,
    CardError,
    build_card,
    encoder_section,
    missing_fields,
    read_card,
    render_markdown,
    sha256_file,
    software_versions,
    write_card,
)
from nearfar.evaluate import Result

METHOD = {   # the shape a method's describe() returns
    "method": "simclr",
    "reference": "Chen et al., 2020",
    "objective": {"loss": "nt_xent", "temperature": 0.2, "head_downstream": "dropped"},
    "positives": {
        "construction": "two independent random views of the same image",
        "views": [{"name": "random_resized_crop", "scale": [0.2, 1.0]},
                  {"name": "horizontal_flip", "p": 0.5}],
    },
    "negatives": {"source": "in-batch", "batch_size": 256, "per_anchor": 510,
                  "exclusions": ["the anchor itself", "its partner view (the positive)"]},
    "modality": "image",
    "encoder": {"class": "SmallCNN", "out_dim": 64, "parameters": 12345},
}


def full_card(tmp_path):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"\x00weights" * 100)
    knn = Result(0.91, "knn_top1", {"name": "knn", "k": 20, "temperature": 0.07,
                                    "n_train": 4000, "n_test": 1000})
    probe = {"metric": "linear_probe_top1", "value": 0.95,
             "protocol": {"name": "linear_probe", "epochs": 100, "n_train": 4000}}
    return build_card(
        method=METHOD,
        encoder=encoder_section(architecture="SmallCNN", weights_path=weights,
                                module=torch.nn.Linear(3, 4), embedding_dim=64),
        dataset={"name": "mnist-5k", "version": "1", "source": "bundled with nearfar",
                 "sha256": "ab" * 32, "splits": {"train": 4000, "test": 1000}},
        evaluation={"protocol": "frozen encoder, backbone features", "results": [knn, probe]},
        benchmark={"name": "mnist-5k held-out split", "metrics": ["knn_top1"]},
        seed=7,
        name="simclr-mnist",
    )


def test_sha256_file_matches_hashlib(tmp_path):
    p = tmp_path / "blob"
    data = os.urandom(3 * 2**20 + 17)
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    assert sha256_file(p, chunk_size=1000) == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError, match="expected a file to hash"):
        sha256_file(tmp_path / "nope")


def test_build_card_takes_method_description_and_is_complete(tmp_path):
    card = full_card(tmp_path)
    assert missing_fields(card) == []
    assert card["objective"]["loss"] == "nt_xent"
    assert card["positive_construction"]["views"][0]["name"] == "random_resized_crop"
    assert card["negative_construction"]["batch_size"] == 256
    assert card["modality"] == "image"
    enc = card["encoder"]
    assert enc["parameter_count"] == 16 and enc["embedding_dim"] == 64   # module overrides
    assert enc["weights_sha256"] == sha256_file(tmp_path / "weights.safetensors")
    assert card["evaluation"]["results"][0] == {
        "metric": "knn_top1", "value": 0.91,
        "protocol": {"name": "knn", "k": 20, "temperature": 0.07, "n_train": 4000,
                     "n_test": 1000}}
    assert set(SECTIONS) <= set(card)
    assert card["method"] == {"method": "simclr", "reference": "Chen et al., 2020"}
    soft = card["software"]
    assert soft["torch"] == torch.__version__ and soft["python"] and soft["platform"]
    assert set(software_versions()) >= {"python", "torch", "numpy", "nearfar", "platform"}


def test_round_trip(tmp_path):
    card = full_card(tmp_path)
    run = tmp_path / "runs" / "a"
    path = write_card(run, card)
    assert path == run / "card.json"
    assert read_card(run) == card
    assert read_card(path) == card
    assert json.loads(path.read_text()) == card
    assert (run / "card.md").read_text() == render_markdown(card)
    assert sorted(os.listdir(run)) == ["card.json", "card.md"]       # no temp files left
    # overwriting replaces both files
    card2 = dict(card, seed=8)
    write_card(run, card2)
    assert read_card(run)["seed"] == 8


def test_markdown_mentions_each_section(tmp_path):
    card = full_card(tmp_path)
    md = render_markdown(card)
    for heading in ("## Objective", "## Positive construction", "## Negative construction",
                    "## Modality", "## Encoder", "## Dataset", "## Evaluation", "## Seed",
                    "## Software", "## Created", "## Benchmark", "## Intended uses",
                    "## Out-of-scope uses", "## Missing fields"):
        assert heading in md
    for text in ("nt_xent", "random_resized_crop", "in-batch", "image", "SmallCNN",
                 "mnist-5k", "ab" * 32, "knn_top1", "0.9100", "k=20", "temperature=0.07",
                 "linear_probe_top1", "epochs=100", card["encoder"]["weights_sha256"],
                 "biometric identification", "similarity alone is not evidence",
                 "None: every required field is stated"):
        assert text in md, text


def test_missing_fields_names_what_is_absent():
    card = build_card(objective={"loss": "byol", "temperature": "n/a"}, seed=0,
                      evaluation=[{"metric": "knn_top1", "value": 0.5}],
                      dataset={"name": "x", "version": "", "splits": {}})
    missing = missing_fields(card)
    assert "objective.loss" not in missing and "objective.temperature" not in missing
    assert "objective.head_downstream" in missing
    for field in ("positive_construction.views", "negative_construction.source", "modality",
                  "encoder.weights_sha256", "dataset.version", "dataset.source",
                  "dataset.sha256", "dataset.splits", "evaluation.protocol",
                  "evaluation.results[0].protocol"):
        assert field in missing, field
    assert "seed" not in missing and "software.torch" not in missing
    assert "evaluation.results" not in missing
    assert set(missing) <= set(REQUIRED_FIELDS) | {"evaluation.results[0].protocol"}
    md = render_markdown(card)
    assert "`dataset.sha256`" in md and "*not stated*" in md
    assert missing_fields({}) == list(REQUIRED_FIELDS)


def test_missing_weights_hash_when_no_weights_file():
    enc = encoder_section(architecture="mlp", parameter_count=10, embedding_dim=4)
    card = build_card(encoder=enc)
    assert "encoder.weights_sha256" in missing_fields(card)
    assert "encoder.architecture" not in missing_fields(card)


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no card found"):
        read_card(tmp_path)
    with pytest.raises(CardError, match="no card found"):
        read_card(tmp_path / "elsewhere")
    (tmp_path / "card.json").write_text('{"objective": {"loss": "nt_')
    with pytest.raises(CardError, match=r"card.json: not valid JSON .*truncated"):
        read_card(tmp_path)
    (tmp_path / "card.json").write_text("[1, 2]")
    with pytest.raises(CardError, match="expected a JSON object, got list"):
        read_card(tmp_path)
    (tmp_path / "card.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="cannot be read as UTF-8"):
        read_card(tmp_path)


def test_write_refuses_non_plain_data_and_keeps_old_card(tmp_path):
    card = build_card(seed=1)
    write_card(tmp_path, card)
    with pytest.raises(ValueError, match=r"card.dataset.sha256: expected a finite number"):
        write_card(tmp_path, dict(card, dataset={"sha256": float("nan")}))
    with pytest.raises(ValueError, match=r"card.encoder: expected plain data"):
        write_card(tmp_path, dict(card, encoder=object()))
    assert read_card(tmp_path) == card
    assert sorted(os.listdir(tmp_path)) == ["card.json", "card.md"]


def test_plain_data_conversion():
    import numpy as np

    card = build_card(seed=np.int64(3), positive_construction=({"name": "crop"},),
                      dataset={"splits": {"train": np.int32(5)}},
                      evaluation={"results": [Result(np.float32(0.5), "m", {"k": 1})]})
    assert card["seed"] == 3 and type(card["seed"]) is int
    assert card["positive_construction"] == {"views": [{"name": "crop"}]}
    assert card["dataset"]["splits"]["train"] == 5
    assert card["evaluation"]["results"][0]["value"] == 0.5
    json.dumps(card)
