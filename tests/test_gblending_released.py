"""G-Blending: its weight rule by hand, the weighted loss, the UserError, and state round-trip.

Partial (see avtrain/balance/gblending.py): the differential test of the super-epoch estimate
against a BalanceMM reference, DDP and the CLI run are still to be written.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from released import as_batch, make_batches, step_trainer

from avprep.errors import UserError
from avtrain.balance import gblending_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_weights_by_hand():
    # w = |G| / O^2: |-1|/1^2 = 1, |-2|/2^2 = 0.5, |0.5|/0.5^2 = 2; sum 3.5
    # normalised: 1/3.5 = 0.285714.., 0.5/3.5 = 0.142857.., 2/3.5 = 0.571428..
    w = gblending_weights([-1.0, -2.0, 0.5], [1.0, 2.0, -0.5])
    torch.testing.assert_close(w, torch.tensor([2 / 7, 1 / 7, 4 / 7], dtype=torch.float64))


def test_weighted_loss_matches_reference():
    torch.manual_seed(0)
    t = step_trainer("gblending", "concat", 3)
    t.balancer.load_state_dict({"weights": torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)})
    batch = as_batch(make_batches(1, 4, 1, 3)[0])
    logits = t.model(batch)
    got = t.balancer.loss(logits, batch["label"], epoch=0, step=0)
    y = batch["label"]
    want = (0.2 * F.cross_entropy(logits["audio"], y) + 0.3 * F.cross_entropy(logits["visual"], y)
            + 0.5 * F.cross_entropy(logits["fused"], y))
    torch.testing.assert_close(got, want)
    assert set(t.balancer.step_metrics()) == {"gblend_w_audio", "gblend_w_visual",
                                              "gblend_w_fused"}


def test_needs_val_split():
    from avtrain.balance import build_balancer

    torch.manual_seed(0)
    t = step_trainer("gblending", "concat", 3)
    with pytest.raises(UserError, match="val"):
        build_balancer("gblending", t.model, {"split_samples": {"train": 10, "val": 0},
                                              "val_split": "val"})
    with pytest.raises(UserError, match="super-epoch"):
        build_balancer("gblending", t.model, {"gblending_super_epoch": 1})
