"""The canonical basis of a LoRA module: (B, A) rewritten as (U sqrt(S), sqrt(S) V^T), with
U S V^T the SVD of B A. The delta s * B A, the rank and the format stay; what changes is which
coordinates stage 2 can zero. A trained pair (B, A) is one of many factorings of its delta (any
invertible r x r matrix G gives (B G, G^-1 A)), so a coordinate of the trained basis mixes
directions of the delta at random; in the canonical one, each rank component is one singular
direction, scaled equally on both sides, and zeroing a coordinate removes a piece of one.

Pure tensor functions, O((d_out + d_in) r^2): the delta (d_out, d_in) is never formed.
"""

from __future__ import annotations

import torch


def canonical_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with B' A' = B A, A' = sqrt(S) V^T (r, d_in) and B' = U sqrt(S) (d_out, r), the
    singular values in decreasing order; in the dtype and device of the inputs. A rank below r
    leaves zero rows in A' and zero columns in B'."""
    r = a.shape[0]
    a64, b64 = a.detach().double(), b.detach().double()  # (r, d_in), (d_out, r)
    q_b, r_b = torch.linalg.qr(b64)  # (d_out, r), (r, r)
    q_a, r_a = torch.linalg.qr(a64.T)  # (d_in, r), (r, r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # the r x r core of B A = Q_B (R_B R_A^T) Q_A^T
    root = s.sqrt()  # (r,)
    new_b = (q_b @ u) * root  # (d_out, r)
    new_a = root[:, None] * (vh @ q_a.T)  # (r, d_in)
    assert new_a.shape[0] == r
    return new_a.to(a.dtype), new_b.to(b.dtype)


def canonicalize_(params: dict[str, torch.nn.Parameter]) -> int:
    """Rewrite every ``<key>.lora_A`` / ``<key>.lora_B`` pair of live factors in place into
    its canonical basis. Returns the number of modules rewritten."""
    n = 0
    with torch.no_grad():
        for name, a in params.items():
            if not name.endswith(".lora_A"):
                continue
            b = params[name[: -len("lora_A")] + "lora_B"]
            new_a, new_b = canonical_factors(a, b)
            a.copy_(new_a)
            b.copy_(new_b)
            n += 1
    return n
