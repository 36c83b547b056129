"""Weighted k-nearest-neighbour classification on frozen embeddings.

The protocol of Wu et al. (2018), "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination", used as the kNN monitor of most
self-supervised work (InstDisc, MoCo, DINO): cosine similarity between a test
embedding and every train embedding; the k most similar train items vote for
their label with weight exp(similarity / temperature); the class with the largest
total wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nearfar.evaluate.inputs import as_embeddings, as_labels, check_int, check_positive
from nearfar.evaluate.result import Result

#: elements of one (test chunk x train) similarity block when chunk_size is None (64 MiB)
_AUTO_CHUNK_ELEMENTS = 16 * 2**20


def _prepare(train_emb, train_labels, test_emb, k, temperature, chunk_size):
    train = as_embeddings(train_emb, "train_emb")
    test = as_embeddings(test_emb, "test_emb")
    if test.shape[1] != train.shape[1]:
        raise ValueError(
            f"test_emb: expected {train.shape[1]} feature columns like train_emb, got "
            f"shape ({test.shape[0]}, {test.shape[1]})"
        )
    y = as_labels(train_labels, "train_labels", train.shape[0])
    n_train = train.shape[0]
    if isinstance(k, int) and not isinstance(k, bool) and k > n_train:
        raise ValueError(f"k: expected at most the {n_train} train embeddings, got {k}")
    k = check_int(k, "k", low=1, high=n_train)
    temperature = check_positive(temperature, "temperature")
    if chunk_size is None:
        chunk_size = max(1, _AUTO_CHUNK_ELEMENTS // n_train)
    else:
        chunk_size = check_int(chunk_size, "chunk_size", low=1)
    return train, y, test, k, temperature, chunk_size


def _predict(train: Tensor, y: Tensor, test: Tensor, k: int, temperature: float,
             chunk_size: int, device: torch.device | str | None) -> Tensor:
    device = torch.device(device) if device is not None else torch.device("cpu")
    classes, y_index = torch.unique(y, sorted=True, return_inverse=True)
    n_classes = classes.numel()
    train_n = F.normalize(train.to(device), dim=1)
    y_index = y_index.to(device)
    out = torch.empty(test.shape[0], dtype=torch.int64)
    with torch.no_grad():
        for start in range(0, test.shape[0], chunk_size):
            chunk = F.normalize(test[start:start + chunk_size].to(device), dim=1)
            sim = chunk @ train_n.T                                  # (b, n_train) cosine
            top_sim, top_idx = sim.topk(k, dim=1)                    # sorted, largest first
            del sim
            # exp(s / t) up to a per-row factor exp(-max / t): same vote, no overflow
            weights = torch.exp((top_sim - top_sim[:, :1]) / temperature)
            votes = torch.zeros(chunk.shape[0], n_classes, device=device, dtype=weights.dtype)
            votes.scatter_add_(1, y_index[top_idx], weights)
            # ties go to the smallest label (argmax returns the first maximum)
            out[start:start + chunk.shape[0]] = votes.argmax(dim=1).cpu()
    return classes[out]


def knn_predict(train_emb, train_labels, test_emb, *, k: int = 20, temperature: float = 0.07,
                chunk_size: int | None = None, device: torch.device | str | None = None
                ) -> Tensor:
    """Predict a label for each test embedding by a similarity-weighted kNN vote.

    Args:
        train_emb: (N_train, D) embeddings with known labels (tensor, numpy array or
            nested sequence).
        train_labels: (N_train,) integer labels; any integers, not only 0..C-1.
        test_emb: (N_test, D) embeddings to classify.
        k: neighbours that vote, 1 <= k <= N_train.
        temperature: > 0; each neighbour votes with weight exp(cosine / temperature)
            (Wu et al., 2018); lower gives the closest neighbours more say.
        chunk_size: test rows per block; memory is O(chunk_size x N_train). None picks
            a block of about 64 MiB.
        device: where to compute (default CPU).

    Returns:
        (N_test,) int64 tensor of predicted labels, on the CPU. Ties go to the
        smallest label.
    """
    train, y, test, k, temperature, chunk_size = _prepare(
        train_emb, train_labels, test_emb, k, temperature, chunk_size)
    return _predict(train, y, test, k, temperature, chunk_size, device)


def knn_accuracy(train_emb, train_labels, test_emb, test_labels, *, k: int = 20,
                 temperature: float = 0.07, chunk_size: int | None = None,
                 device: torch.device | str | None = None) -> Result:
    """Top-1 accuracy of the weighted kNN classifier of :func:`knn_predict`.

    Returns:
        A :class:`Result`: a float in [0, 1] that also records its protocol
        (``name="knn"``, k, temperature, similarity, weighting, split sizes, dim,
        classes), e.g. ``acc.protocol["k"]``; ``acc.to_dict()`` is the card's form.
    """
    train, y, test, k, temperature, chunk_size = _prepare(
        train_emb, train_labels, test_emb, k, temperature, chunk_size)
    y_test = as_labels(test_labels, "test_labels", test.shape[0])
    pred = _predict(train, y, test, k, temperature, chunk_size, device)
    accuracy = float((pred == y_test).double().mean())
    protocol = {
        "name": "knn",
        "k": k,
        "temperature": temperature,
        "similarity": "cosine",
        "weighting": "exp(similarity / temperature) (Wu et al., 2018)",
        "n_train": int(train.shape[0]),
        "n_test": int(test.shape[0]),
        "dim": int(train.shape[1]),
        "num_classes": int(torch.unique(y).numel()),
    }
    return Result(accuracy, "knn_top1", protocol)
