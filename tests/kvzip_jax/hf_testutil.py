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


def check_close(name: str, ours, ref, diffs: dict, *, atol: float) -> None:
    """Our output against transformers' torch tensor: same shape, a reference that really varies (across tokens
    and inputs, so a wrong layer, mask or layout cannot pass), and max |difference| <= atol, recorded in diffs."""
    import numpy as np

    ours, ref = np.asarray(ours, np.float32), ref.float().numpy()
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    assert ref.std() > 0.1 and np.abs(ref[0] - ref[1]).max() > 0.1, f"{name}: reference barely varies"
    diffs[name] = float(np.abs(ours - ref).max())
    assert diffs[name] <= atol, f"{name}: max |diff| {diffs[name]:.3g} > {atol}"
