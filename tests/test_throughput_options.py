"""Trainer speed options kept by benchmarks/throughput.py (fused AdamW): they train, and
they change nothing but the speed (same losses and weights to float rounding as the plain
loop, exact resume)."""

import pytest
import torch

from nearfar.methods import build_method
from nearfar.recipe import load_recipe
from nearfar.train import TrainConfig, Trainer, load_weights, seed_everything


def images(n=128, size=12, seed=0):
    """Blobs at random positions: enough structure for SimCLR's loss to fall."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy = torch.randint(3, size - 3, (n, 1, 1), generator=g)
    cx = torch.randint(3, size - 3, (n, 1, 1), generator=g)
    blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0)
    return (blob * 255).round().to(torch.uint8).unsqueeze(1)


def tiny_simclr():
    seed_everything(0)
    return build_method("simclr", encoder="small_cnn", encoder_kwargs={"widths": (4, 8)},
                        temperature=0.2, hidden_dim=16, out_dim=8)


def quiet(**kw):
    return TrainConfig(**{"progress": False, "log_every": 1, "batch_size": 32,
                          "warmup_steps": 2, "lr": 1e-2, **kw})


def reference_adamw_step(w, g, m, v, t, *, lr, betas, eps, weight_decay):
    """AdamW straight from the paper (Loshchilov & Hutter, 2019): decoupled decay."""
    b1, b2 = betas
    w = w * (1 - lr * weight_decay)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return w - lr * m_hat / (v_hat.sqrt() + eps), m, v


def test_fused_adamw_in_the_trainer_matches_the_formula():
    method = tiny_simclr()
    trainer = Trainer(method, images(), quiet(steps=3, fused_optimizer=True))
    assert trainer.optimizer.defaults["fused"] is True
    assert Trainer(tiny_simclr(), images(), quiet(steps=3)).optimizer.defaults["fused"] in (
        None, False)
    # three steps on fixed gradients, against the formula
    opt = trainer.optimizer
    group = next(g for g in opt.param_groups if g["weight_decay"] > 0)
    p = group["params"][0]
    torch.manual_seed(1)
    w, m, v = p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p)
    for t in range(1, 4):
        grad = torch.randn_like(p)
        for q in method.parameters():
            q.grad = torch.zeros_like(q)
        p.grad = grad.clone()
        opt.step()
        w, m, v = reference_adamw_step(w, grad, m, v, t, lr=group["lr"], betas=group["betas"],
                                       eps=group["eps"], weight_decay=group["weight_decay"])
        torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)


def test_fused_optimizer_trains_like_the_plain_loop():
    data = images()
    m_plain = tiny_simclr()
    plain = Trainer(m_plain, data, quiet(steps=12)).fit()
    m_fused = tiny_simclr()
    fused = Trainer(m_fused, data, quiet(steps=12, fused_optimizer=True)).fit()
    assert fused.final_loss < 0.9 * first_loss(data, fused_optimizer=True)  # it learned
    assert fused.final_loss == pytest.approx(plain.final_loss, rel=1e-3)
    for (name, a), b in zip(m_plain.state_dict().items(), m_fused.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)


def first_loss(data, **kw):
    return Trainer(tiny_simclr(), data, quiet(steps=12, **kw)).fit(stop_at_step=1).final_loss


def test_fused_optimizer_resumes_bitwise(tmp_path):
    data = images()
    cfg = quiet(steps=6, checkpoint_every=3, fused_optimizer=True, channels_last=True)
    full = tmp_path / "full"
    Trainer(tiny_simclr(), data, cfg, run_dir=full).fit()
    part = tmp_path / "part"
    Trainer(tiny_simclr(), data, cfg, run_dir=part).fit(stop_at_step=3)
    rest = Trainer(tiny_simclr(), data, cfg, run_dir=part).fit(resume=True)
    assert rest.steps_run == 3
    for k, v in load_weights(full).items():
        assert torch.equal(load_weights(part)[k], v), k


def test_fused_optimizer_must_be_a_boolean():
    with pytest.raises(ValueError, match="TrainConfig.fused_optimizer: expected true or false"):
        TrainConfig(fused_optimizer="yes")


def test_default_recipe_turns_on_the_kept_options():
    trainer = load_recipe(None)["trainer"]
    assert trainer["fused_optimizer"] is True
    assert trainer["channels_last"] is True
