"""The drafter unrolled on its own features, for every start position of a window at once.

At inference the drafter's first step reads the target's feature ``f_s``; every later step reads
the drafter's own previous output. Step ``j`` (0-based) of start ``s`` feeds ``(x_{s+j+1}, f̂_{s+j})``
(``f̂_s = f_s``) at position ``s + j`` and predicts ``f_{s+j+1}``, i.e. the token at depth ``j + 1``
of a draft that starts after ``x_{s+1}``. All starts run in parallel: step ``j``'s queries attend to
the true context (step 0 keys at positions ``<= s``) and to their own chain (step ``i`` keys of the
same start, ``1 <= i <= j``) — the training-time-test mask of EAGLE-3, applied here to EAGLE-2
drafters both to measure top-1 agreement by depth and, with ``--unroll``, to train on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from drafters.eagle_model import EagleDrafter


def unroll_mask(length: int, step: int, device: torch.device | str) -> torch.Tensor:
    """Bool ``[length, (step + 1) * length]``: causal over step-0 keys, own-start only over later steps."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    own = torch.eye(length, dtype=torch.bool, device=device)
    return torch.cat([causal] + [own] * step, dim=1)


def shift(x: torch.Tensor, by: int) -> torch.Tensor:
    """``x [B, T, ...]`` moved ``by`` positions left along dim 1, zero-filled at the end."""
    if by == 0:
        return x
    tail = x.new_zeros(x.shape[0], min(by, x.shape[1]), *x.shape[2:])
    return torch.cat([x[:, by:], tail], dim=1)


def unrolled(drafter: EagleDrafter, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
             steps: int, aux: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Predictions ``[B, T, H]`` per step: entry ``j`` at index ``s`` predicts ``f_{s+j+1}`` from start ``s``.

    tokens ``[B, T]`` (``x_{t+1}``), features ``[B, T, H]`` (``f_t``), positions ``[B, T]``, aux ``[B, T, k H]``
    (the target's ``aux_layers`` at ``t``: step 0 only, later steps read drafted features).
    Entries whose chain runs past the window (``s + j >= T``) are meaningless; mask them with ``shift``.
    """
    batch, length = tokens.shape
    preds: list[torch.Tensor] = []
    past = None
    feats = features
    for j in range(steps):
        mask = unroll_mask(length, j, tokens.device)[None, None].expand(batch, 1, -1, -1)  # [B, 1, T, (j+1)T]
        out, past = drafter(shift(tokens, j), feats, positions + j, past, mask, aux)      # [B, T, H]
        preds.append(out)
        feats, aux = out, None
    return preds


def unrolled_losses(drafter: EagleDrafter, preds: list[torch.Tensor], targets: torch.Tensor,
                    mask: torch.Tensor, full_head: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
    """Per step: SmoothL1 (``vloss``) and CE over the drafter's head (``ploss``) against the shifted
    targets ``[B, T, H]`` over the shifted ``mask [B, T]``, top-1 agreement over the drafter head
    (``acc``) and, given the target's full LM head ``[V, H]``, with the target's greedy token
    (``acc_full``); ``tokens`` counts the positions scored."""
    out = []
    for j, pred in enumerate(preds):
        want, m = shift(targets, j), shift(mask, j)                                   # [B, T, H], [B, T]
        denom = m.sum() + 1e-5
        vloss = (F.smooth_l1_loss(pred, want, reduction="none").mean(-1) * m).sum() / denom
        with torch.no_grad():
            target_logits = drafter.logits(want)                                      # [B, T, K]
        logits = drafter.logits(pred)                                                 # [B, T, K]
        ploss = -((target_logits.softmax(-1) * logits.log_softmax(-1)).sum(-1) * m).sum() / denom
        drafted = logits.detach().argmax(-1)                                          # [B, T]
        terms = {"vloss": vloss, "ploss": ploss, "tokens": m.sum(),
                 "acc": ((drafted == target_logits.argmax(-1)).float() * m).sum() / denom}
        if full_head is not None:
            greedy = F.linear(want.to(full_head.dtype), full_head).argmax(-1)          # [B, T]
            terms["acc_full"] = ((drafter.to_target_ids(drafted) == greedy).float() * m).sum() / denom
        out.append(terms)
    return out
