import pytest
import torch

from adasmooth.core.stats import roc_auc


def test_roc_auc_hand_computed():
    # pairs (pos, neg): 3>1, 3>2, 3>2; 2>1, 2=2 (1/2), 2=2 (1/2) -> (3 + 1 + 0.5 + 0.5) / 6
    assert roc_auc(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([3.0, 2.0])) == pytest.approx(5 / 6)
    assert roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.9])) == 1.0
    assert roc_auc(torch.tensor([0.3, 0.9]), torch.tensor([0.1, 0.2])) == 0.0
    assert roc_auc(torch.full((4,), 0.5), torch.full((3,), 0.5)) == 0.5


def test_roc_auc_needs_both_classes():
    with pytest.raises(ValueError):
        roc_auc(torch.tensor([]), torch.tensor([1.0]))
