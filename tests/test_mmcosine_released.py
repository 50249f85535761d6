"""MMCosine's cosine fusion (avtrain/models/fusions.py CosineFusion): hand-computed rule."""

import torch

from avtrain.models.fusions import CosineFusion, build_fusion


def test_cosine_fusion_hand_computed():
    f = build_fusion("cosine", ["audio", "visual"], {"audio": 2, "visual": 2}, 2)
    assert isinstance(f, CosineFusion)
    with torch.no_grad():
        # W = [[3, 4 | 1, 0], [0, 1 | 0, 2]]; bias 5 must be ignored
        f.fc_out.weight.copy_(torch.tensor([[3.0, 4.0, 1.0, 0.0], [0.0, 1.0, 0.0, 2.0]]))
        f.fc_out.bias.fill_(5.0)
    feats = {"audio": torch.tensor([[6.0, 8.0]]), "visual": torch.tensor([[0.0, -3.0]])}
    parts = f.modality_logits(feats)
    # audio: f/|f| = (0.6, 0.8); rows (3,4)/5 = (0.6,0.8) -> 1.0; (0,1) -> 0.8; times 10
    assert torch.allclose(parts["audio"], torch.tensor([[10.0, 8.0]]))
    # visual: f/|f| = (0, -1); rows (1,0) -> 0; (0,2)/2 = (0,1) -> -1; times 10
    assert torch.allclose(parts["visual"], torch.tensor([[0.0, -10.0]]))
    assert torch.allclose(f(feats), torch.tensor([[10.0, -2.0]]))
