"""Clustering of frozen embeddings: k-means, scored against the labels by NMI and AMI.

With k set to the number of classes, k-means (Lloyd's algorithm, k-means++ seeding,
``n_init`` restarts from different seeds, the lowest-inertia one kept) partitions the
L2-normalised embeddings; the partition is compared with the true classes by

* NMI, normalised mutual information I(Y; C) / mean(H(Y), H(C)) (Strehl & Ghosh, 2002);
  1 for a perfect match up to relabelling, but above 0 for a random partition;
* AMI, adjusted mutual information (Vinh, Epps & Bailey, 2010): NMI corrected for
  chance, so a random partition scores about 0 whatever k and N are.

No labels are used to fit: the protocol measures whether classes are separate clusters
in the embedding space itself.

    scores = clustering_scores(test_emb, test_labels)   # {"clustering_nmi": Result, ...}
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F

from nearfar.evaluate.inputs import as_embeddings, as_labels, check_int
from nearfar.evaluate.result import Result


def kmeans_labels(emb, *, n_clusters: int, n_init: int = 10, seed: int = 0,
                  max_iter: int = 300, normalize: bool = True) -> np.ndarray:
    """Cluster ids of k-means on the (optionally L2-normalised) embeddings.

    Args:
        emb: (N, D) embeddings, N >= n_clusters.
        n_clusters: k >= 1.
        n_init: restarts (k-means++ seeds drawn from ``seed``); the lowest inertia wins.
        seed: the random_state of scikit-learn's KMeans.
        max_iter: Lloyd iterations per restart.
        normalize: L2-normalise rows first (k-means on the unit sphere, matching the
            cosine geometry the other protocols use).

    Returns:
        (N,) int64 numpy array of cluster ids in [0, n_clusters).
    """
    from sklearn.cluster import KMeans

    x = as_embeddings(emb, "emb")
    k = check_int(n_clusters, "n_clusters", low=1, high=x.shape[0])
    n_init = check_int(n_init, "n_init", low=1)
    seed = check_int(seed, "seed", low=0)
    max_iter = check_int(max_iter, "max_iter", low=1)
    if normalize:
        x = F.normalize(x, dim=1)
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed, max_iter=max_iter)
    return km.fit_predict(x.double().numpy()).astype(np.int64)


def clustering_scores(emb, labels, *, n_clusters: int | None = None, n_init: int = 10,
                      seed: int = 0, normalize: bool = True) -> dict[str, Result]:
    """NMI and AMI of k-means clusters of ``emb`` against ``labels``.

    Args:
        emb: (N, D) embeddings (e.g. the held-out split).
        labels: (N,) integer class labels.
        n_clusters: k; None takes the number of distinct labels.
        n_init, seed, normalize: see :func:`kmeans_labels`.

    Returns:
        ``{"clustering_nmi": Result, "clustering_ami": Result}``; both protocols name the
        algorithm, k, n_init, seed, the normalisation and N.
    """
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    x = as_embeddings(emb, "emb")
    y = as_labels(labels, "labels", x.shape[0]).numpy()
    n_classes = int(np.unique(y).size)
    k = n_classes if n_clusters is None else check_int(n_clusters, "n_clusters", low=1)
    if k > x.shape[0]:
        raise ValueError(f"n_clusters: expected at most the {x.shape[0]} embeddings, got {k}")
    clusters = kmeans_labels(x, n_clusters=k, n_init=n_init, seed=seed, normalize=normalize)
    protocol = {
        "name": "clustering",
        "algorithm": "k-means (Lloyd, k-means++ seeding, scikit-learn)",
        "k": k,
        "k_rule": "number of classes" if n_clusters is None else "given",
        "n_init": n_init,
        "seed": seed,
        "features": "L2-normalised embeddings" if normalize else "raw embeddings",
        "labels_used_to_fit": False,
        "n_train": 0, "n_test": int(x.shape[0]),
        "num_classes": n_classes,
        "average_method": "arithmetic",
    }
    nmi = normalized_mutual_info_score(y, clusters, average_method="arithmetic")
    ami = adjusted_mutual_info_score(y, clusters, average_method="arithmetic")
    return {
        "clustering_nmi": Result(float(nmi), "clustering_nmi", {
            **protocol, "reference": "Strehl & Ghosh, 2002",
            "definition": "I(labels; clusters) / mean(H(labels), H(clusters))"}),
        "clustering_ami": Result(float(ami), "clustering_ami", {
            **protocol, "reference": "Vinh, Epps & Bailey, 2010",
            "definition": "(I - E[I]) / (mean(H(labels), H(clusters)) - E[I]), chance-"
                          "corrected: ~0 for a random partition"}),
    }


__all__ = ["clustering_scores", "kmeans_labels"]
