"""The Method protocol, the registry and SimCLR."""

import pytest
import torch

from nearfar.methods import Method, SimCLR, StepOutput, available_methods, build_method
from nearfar.nn import SmallCNN
from nearfar.views import build_pipeline


def tiny_simclr(**kw):
    torch.manual_seed(0)
    kw.setdefault("temperature", 0.2)
    return build_method("simclr", encoder="small_cnn", encoder_kwargs={"widths": (4, 8)},
                        hidden_dim=16, out_dim=8, **kw)


def batch(n=6, size=12):
    g = torch.Generator().manual_seed(1)
    return {"images": torch.rand(n, 1, size, size, generator=g), "labels": None,
            "index": torch.arange(n)}


def test_registry_errors_list_known_names():
    assert "simclr" in available_methods()
    with pytest.raises(ValueError, match=r"method 'byolz': unknown name; known methods: .*simclr"):
        build_method("byolz")
    with pytest.raises(ValueError, match="method 'simclr': bad keyword arguments"):
        build_method("simclr", temprature=0.1)


def test_simclr_loss_step_output():
    m = tiny_simclr()
    out = m.loss(batch(), torch.Generator().manual_seed(0))
    assert isinstance(out, StepOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.embeddings.shape == (6, 8) and not out.embeddings.requires_grad
    assert set(out.metrics) == {"positive_cosine"}
    out.loss.backward()
    assert m.encoder.features[0][0].weight.grad is not None
    assert m.head.net[0].weight.grad is not None


def test_simclr_views_follow_the_generator():
    m = tiny_simclr()
    b = batch()
    a = m.loss(b, torch.Generator().manual_seed(3)).loss
    b2 = m.loss(b, torch.Generator().manual_seed(3)).loss
    c = m.loss(b, torch.Generator().manual_seed(4)).loss
    assert torch.equal(a, b2)
    assert not torch.equal(a, c)
    # without a generator the method uses its own seeded one
    assert torch.isfinite(m.loss(b).loss)


def test_simclr_embed_drops_or_keeps_head():
    x = torch.rand(5, 1, 12, 12)
    m = tiny_simclr().eval()
    assert m.embed(x).shape == (5, 8)          # encoder features (widths[-1] = 8)
    torch.testing.assert_close(m(x), m.encoder(x))
    kept = tiny_simclr(keep_head=True, ).eval()
    torch.testing.assert_close(kept.embed(x), kept.head(kept.encoder(x)))


def test_simclr_accepts_a_single_view_pipeline_and_an_encoder_module():
    views = build_pipeline([{"name": "random_resized_crop", "scale": [0.5, 1.0]}])
    m = SimCLR(SmallCNN(1, widths=(4,)), views, hidden_dim=8, out_dim=4)
    out = m.loss(batch(), torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    assert m.describe()["positives"]["views"][0]["name"] == "random_resized_crop"


def test_describe_has_objective_positives_negatives_modality():
    m = tiny_simclr()
    m.batch_size = 32
    d = m.describe()
    assert {"objective", "positives", "negatives", "modality"} <= set(d)
    assert d["objective"]["loss"] == "nt_xent" and d["objective"]["temperature"] == 0.2
    assert d["objective"]["head_downstream"] == "dropped"
    assert d["positives"]["views"]["name"] == "two_views"
    assert d["negatives"] == {"source": "in-batch", "batch_size": 32, "per_anchor": 62,
                              "exclusions": ["the anchor itself",
                                             "its partner view (the positive)"],
                              "processes": {"gather": "auto (every process's batch when "
                                                      "torch.distributed runs with world "
                                                      "size > 1)", "local_loss": False}}
    assert d["modality"] == "image"
    import json

    json.dumps(d)  # plain data, ready for the card


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="temperature: expected a number > 0, got 0"):
        tiny_simclr(temperature=0)
    with pytest.raises(ValueError, match="encoder: expected an `out_dim`"):
        SimCLR(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"batch\['images'\]: expected a float"):
        tiny_simclr().loss({"images": torch.zeros(4, 12, 12)})
    with pytest.raises(ValueError, match="at least 2 items"):
        tiny_simclr().loss({"images": torch.zeros(1, 1, 12, 12)})


def test_base_method_is_abstract():
    m = Method()
    with pytest.raises(NotImplementedError):
        m.embed(torch.zeros(1))
    m.after_step(0.5)  # no-op by default
