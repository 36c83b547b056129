"""Contrastive and non-contrastive objectives as pure functions on tensors."""
