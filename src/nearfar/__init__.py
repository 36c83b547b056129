"""nearfar: contrastive representation learning, from objective to governed retrieval."""

__version__ = "0.1.0"
