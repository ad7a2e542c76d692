"""Shared helper of the multimodal parity tests (vision, audio, Q-Former, LLaVA): perturbed transformers models."""

from __future__ import annotations


def perturbed(model, seed: int = 0, scale: float = 0.1):
    """Every parameter (norm weights, biases, stored tables and zero-initialised query tokens included) moved off
    its init by `scale` Gaussian noise, so no parity check passes on a degenerate value; returns the model in eval
    mode. torch is imported here, not at module level: tests skip without it."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()
