"""The command line and the Python API, end to end on tiny budgets."""

from __future__ import annotations

import json

import pytest
import torch

import nearfar
from nearfar.card import missing_fields, read_card
from nearfar.cli import main
from nearfar.recipe import RecipeError, load_recipe

TINY = ["trainer.steps=6", "trainer.batch_size=32", "trainer.warmup_steps=1",
        "trainer.log_every=2", "trainer.checkpoint_every=3", "trainer.progress=false",
        "trainer.precision=\"fp32\"", "trainer.channels_last=false",
        "eval.probe_epochs=5", "data.test_size=200"]


def _args(overrides: list[str]) -> list[str]:
    out: list[str] = []
    for o in overrides:
        out += ["--set", o]
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", *_args(TINY), "--run-dir", str(d), "--no-progress"]) == 0
    return d


def test_help_on_every_command(capsys):
    for cmd in ([], ["train"], ["eval"], ["card"], ["views"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
    assert "nearfar" in capsys.readouterr().out


def test_unknown_recipe_key_names_key_and_allowed(capsys):
    assert main(["train", "--set", "trainer.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "recipe.trainer.bogus" in err and "batch_size" in err
    assert "Traceback" not in err


def test_wrong_type_names_key(tmp_path, capsys):
    p = tmp_path / "bad.toml"
    p.write_text('[trainer]\nbatch_size = "256x"\n')
    assert main(["train", str(p)]) == 2
    assert 'recipe.trainer.batch_size: expected an integer, got \'256x\'' in capsys.readouterr().err


def test_unknown_method_and_missing_recipe(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="method"):
        nearfar.fit({"method": {"name": "nope"}}, run_dir=tmp_path / "x", progress=False)


def test_bad_toml_and_overrides():
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(None, ["trainer.steps"])
    r = load_recipe(None, ["trainer.steps=7", "method.temperature=0.3"])
    assert r["trainer"]["steps"] == 7 and r["method"]["temperature"] == 0.3


def test_train_writes_card_weights_and_results(run_dir, capsys):
    card = read_card(run_dir)
    assert missing_fields(card) == []
    for key in ("objective", "positive_construction", "negative_construction", "modality",
                "encoder", "dataset", "evaluation", "seed", "software"):
        assert card[key] is not None and card[key] != {}, key
    assert card["encoder"]["weights_sha256"] and card["dataset"]["sha256"]
    assert card["dataset"]["splits"]["test"] == 200
    metrics = {r["metric"] for r in card["evaluation"]["results"]}
    assert {"knn_top1", "linear_probe_top1"} <= metrics
    assert all("protocol" in r for r in card["evaluation"]["results"])
    assert (run_dir / "card.md").read_text().startswith("# Card")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 6

    assert main(["card", "check", str(run_dir)]) == 0
    assert main(["card", str(run_dir)]) == 0
    assert "Objective" in capsys.readouterr().out


def test_card_check_names_missing_field(run_dir, tmp_path, capsys):
    card = read_card(run_dir)
    card["negative_construction"] = None
    (tmp_path / "card.json").write_text(json.dumps(card))
    assert main(["card", "check", str(tmp_path)]) == 1
    assert "negative_construction" in capsys.readouterr().out


def test_load_embeds_normalised_batches(run_dir):
    enc = nearfar.load(run_dir, device="cpu")
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    z = enc.embed(x, batch_size=2)
    assert z.shape == (5, enc.embedding_dim)
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-5)
    z_iter = enc.embed([x[:2], x[2:]])
    assert torch.allclose(z, z_iter, atol=1e-5)
    assert torch.allclose(enc.embed(x[0]), z[:1], atol=1e-5)
    with pytest.raises(ValueError, match="images: expected shape"):
        enc.embed(torch.zeros(2, 3, 28, 28))


def test_eval_reproduces_training_results(run_dir, capsys):
    assert main(["eval", str(run_dir), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    saved = json.loads((run_dir / "eval.json").read_text())["results"]
    assert [r["value"] for r in results] == pytest.approx([r["value"] for r in saved])


def test_eval_on_missing_run_is_clear(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_views_writes_png(tmp_path):
    out = tmp_path / "pairs.png"
    assert main(["views", "--out", str(out), "--pairs", "8"]) == 0
    from PIL import Image

    assert Image.open(out).size[0] > 0
