"""The attack-loss protocol: named losses of logits, and which losses an attack may run on a subset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adasmooth.attacks import (
    AdaptiveAlphaLoss,
    alpha_bce_loss,
    can_subset,
    ce_loss,
    dlr_from_logits,
    get_loss,
    logit_loss,
    loss_for_rows,
    margin_from_logits,
)
from adasmooth.attacks.adaptive import SurrogateLoss


def test_logit_loss_by_name():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.3, 0.2, 1.0]])
    y = torch.tensor([0, 2])
    assert torch.allclose(logit_loss("ce", logits, y), F.cross_entropy(logits, y, reduction="none"))
    assert torch.allclose(logit_loss("margin", logits, y), torch.tensor([0.5 - 2.0, 1.0 - 0.2]))
    assert torch.allclose(logit_loss("dlr", logits, y), dlr_from_logits(logits, y))
    assert torch.equal(logit_loss("margin", logits, y), margin_from_logits(logits, y))
    with pytest.raises(ValueError, match="unknown attack loss 'hinge'"):
        logit_loss("hinge", logits, y)
    with pytest.raises(ValueError, match="unknown attack loss"):
        get_loss("hinge")


def test_which_losses_may_run_on_a_subset():
    def plain(model, x, y):
        return model(x).sum(1)

    def declared(model, x, y):
        return model(x).sum(1)

    declared.stateless = True
    assert not can_subset(plain)
    assert can_subset(declared)
    assert all(can_subset(get_loss(name)) for name in ("ce", "margin", "dlr"))
    assert can_subset(alpha_bce_loss)
    weighted = AdaptiveAlphaLoss(torch.tensor([0.1, 0.2, 0.3]))
    assert can_subset(weighted) and can_subset(SurrogateLoss(weighted, torch.nn.Identity()))
    rows = torch.tensor([0, 2])
    assert torch.equal(loss_for_rows(weighted, rows).weight, torch.tensor([0.1, 0.3]))
    assert torch.equal(loss_for_rows(SurrogateLoss(weighted, torch.nn.Identity()), rows).loss.weight,
                       torch.tensor([0.1, 0.3]))
    assert loss_for_rows(ce_loss, rows) is ce_loss
