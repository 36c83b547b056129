"""Linear probe: multinomial logistic regression on frozen, standardised embeddings.

The usual linear-evaluation protocol of self-supervised learning (e.g. Chen et al.,
2020; Kolesnikov et al., 2019), run on cached embeddings rather than through the
encoder: features are standardised with the train split's mean and standard
deviation, a linear layer is fit with cross-entropy plus an L2 penalty on the
weights, and top-1 accuracy is read on the test split.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from nearfar.evaluate.inputs import (
    as_embeddings,
    as_labels,
    check_int,
    check_nonnegative,
    check_positive,
)

_OPTIMIZERS = ("lbfgs", "adam")
_DEFAULT_LR = {"lbfgs": 1.0, "adam": 1e-2}


def linear_probe(train_emb, train_labels, test_emb, test_labels, *, epochs: int = 100,
                 lr: float | None = None, weight_decay: float = 1e-4,
                 batch_size: int | None = None, optimizer: str = "lbfgs", seed: int = 0
                 ) -> dict[str, Any]:
    """Fit a linear classifier on train embeddings, report accuracy on test embeddings.

    Args:
        train_emb: (N_train, D) frozen embeddings (tensor, numpy array or sequence).
        train_labels: (N_train,) integer labels; any integers, not only 0..C-1.
        test_emb: (N_test, D) frozen embeddings.
        test_labels: (N_test,) integer labels.
        epochs: for ``"lbfgs"`` the L-BFGS iterations on the full batch; for
            ``"adam"`` passes over the train split.
        lr: step size; None takes 1.0 for L-BFGS (with strong-Wolfe line search) and
            1e-2 for Adam.
        weight_decay: >= 0; the loss is cross-entropy + weight_decay / 2 * ||W||^2
            (bias not penalised).
        batch_size: Adam's mini-batch size (None: the full train split). L-BFGS is
            always full-batch and refuses a batch_size.
        optimizer: ``"lbfgs"`` (default: full-batch, deterministic) or ``"adam"``.
        seed: seeds the Adam shuffling and the (zero) initialisation; same inputs
            and seed give the same result.

    Returns:
        ``{"metric": "linear_probe_top1", "value": acc, "accuracy": acc,
        "train_accuracy": ..., "protocol": {...}}`` where the protocol records the
        optimiser, epochs, lr, weight_decay, batch_size, seed, standardisation and
        split sizes.
    """
    train = as_embeddings(train_emb, "train_emb")
    test = as_embeddings(test_emb, "test_emb")
    if test.shape[1] != train.shape[1]:
        raise ValueError(
            f"test_emb: expected {train.shape[1]} feature columns like train_emb, got "
            f"shape ({test.shape[0]}, {test.shape[1]})"
        )
    y_train = as_labels(train_labels, "train_labels", train.shape[0])
    y_test = as_labels(test_labels, "test_labels", test.shape[0])
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {_OPTIMIZERS}, got {optimizer!r}")
    epochs = check_int(epochs, "epochs", low=1)
    lr = _DEFAULT_LR[optimizer] if lr is None else check_positive(lr, "lr")
    weight_decay = check_nonnegative(weight_decay, "weight_decay")
    seed = check_int(seed, "seed", low=0)
    if batch_size is not None:
        if optimizer == "lbfgs":
            raise ValueError(
                "batch_size: expected None with optimizer='lbfgs' (it is full-batch), got "
                f"{batch_size!r}; use optimizer='adam' for mini-batches"
            )
        batch_size = check_int(batch_size, "batch_size", low=1)

    classes, y_index = torch.unique(y_train, sorted=True, return_inverse=True)
    if classes.numel() < 2:
        raise ValueError(
            f"train_labels: expected at least 2 distinct classes, got {classes.numel()}"
        )
    # test labels absent from train can never be predicted; they count as errors
    lookup = {int(c): i for i, c in enumerate(classes.tolist())}
    y_test_index = torch.tensor([lookup.get(int(c), -1) for c in y_test.tolist()],
                                dtype=torch.int64)

    mean = train.mean(dim=0)
    std = train.std(dim=0, unbiased=False).clamp_min(1e-6)
    x_train = (train - mean) / std
    x_test = (test - mean) / std

    generator = torch.Generator().manual_seed(seed)
    d, c = x_train.shape[1], classes.numel()
    weight = torch.zeros(c, d, requires_grad=True)
    bias = torch.zeros(c, requires_grad=True)
    params = [weight, bias]

    def objective(x, y):
        loss = F.cross_entropy(x @ weight.T + bias, y)
        if weight_decay:
            loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
        return loss

    with torch.enable_grad():
        if optimizer == "lbfgs":
            opt = torch.optim.LBFGS(params, lr=lr, max_iter=epochs, history_size=20,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                                    tolerance_change=1e-12)

            def closure():
                opt.zero_grad()
                loss = objective(x_train, y_index)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt = torch.optim.Adam(params, lr=lr)
            n = x_train.shape[0]
            bs = n if batch_size is None else min(batch_size, n)
            for _ in range(epochs):
                order = torch.randperm(n, generator=generator)
                for start in range(0, n, bs):
                    idx = order[start:start + bs]
                    opt.zero_grad()
                    objective(x_train[idx], y_index[idx]).backward()
                    opt.step()

    with torch.no_grad():
        train_acc = float(((x_train @ weight.T + bias).argmax(1) == y_index).double().mean())
        test_acc = float(((x_test @ weight.T + bias).argmax(1) == y_test_index).double().mean())

    protocol = {
        "name": "linear_probe",
        "model": "multinomial logistic regression",
        "standardise": "train mean / std",
        "optimizer": optimizer,
        "epochs": epochs,
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": "full" if batch_size is None else batch_size,
        "seed": seed,
        "n_train": int(train.shape[0]),
        "n_test": int(test.shape[0]),
        "dim": int(d),
        "num_classes": int(c),
    }
    return {
        "metric": "linear_probe_top1",
        "value": test_acc,
        "accuracy": test_acc,
        "train_accuracy": train_acc,
        "protocol": protocol,
    }
