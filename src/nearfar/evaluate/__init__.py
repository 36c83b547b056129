"""Protocols on frozen embeddings: weighted kNN, linear probe, batched embedding.

Each metric records the protocol that produced it (name, settings, split sizes) so
that a card can state it next to the number.
"""

from nearfar.evaluate.embed import embed_dataset
from nearfar.evaluate.knn import knn_accuracy, knn_predict
from nearfar.evaluate.linear_probe import linear_probe
from nearfar.evaluate.result import Result

__all__ = ["Result", "embed_dataset", "knn_accuracy", "knn_predict", "linear_probe"]

# image-text protocols (issue 4): zero-shot classification, cross-modal retrieval
from nearfar.evaluate.retrieval import image_text_retrieval, retrieval_metrics  # noqa: E402
from nearfar.evaluate.zero_shot import zero_shot_accuracy  # noqa: E402

__all__ += ["image_text_retrieval", "retrieval_metrics", "zero_shot_accuracy"]

# hubness (audits): k-occurrence counts and their skewness (Radovanovic et al., 2010)
from nearfar.evaluate.hubness import hubness, k_occurrence, nearest_neighbours  # noqa: E402

__all__ += ["hubness", "k_occurrence", "nearest_neighbours"]

# clustering (NMI / AMI), effective rank (RankMe), nDCG, alignment / uniformity
from nearfar.evaluate.clustering import clustering_scores  # noqa: E402
from nearfar.evaluate.geometry import geometry_metrics  # noqa: E402
from nearfar.evaluate.rank import effective_rank, numerical_rank, rank_metrics  # noqa: E402
from nearfar.evaluate.retrieval import ndcg_at_k  # noqa: E402

__all__ += ["clustering_scores", "effective_rank", "geometry_metrics", "ndcg_at_k",
            "numerical_rank", "rank_metrics"]
