"""Greedy against the released code (differential), its rule by hand, DDP, resume and the CLI.

The reference is written from github.com/nyukat/greedy_multimodal_learning (a190e03):
src/balanced_mmtm.py `MMTM_mitigate.forward` (lines 49-154: squeeze, excitation, sigmoid gates,
the running means of lines 113-116 updated by every forward and folded in before use, the
curation branch 128-152), src/model.py `MMTM_MVCNN.forward` (63-108: blocks after every stage
but the first, two branch heads), train.py `blend_loss` (22-28), src/framework.py `train_loop`
(293-315: zero_grad that leaves zeros, forward with the model's curation mode, backward,
`on_backward_end`, step; epochs counted from 1) and src/callbacks.py `Bias_Mitigation_Strong`
(173-267: `compute_BDR` with its name matching and `.item()` sums, `on_backward_end`,
`on_epoch_begin`'s unlock). The video handling of the squeeze (a clip's frames pooled with its
space) is BalanceMM's (avclassify_model.py 570-581), the released model having no video.
The encoders are avtrain's tiny ones (tests/released.py `ref_trunk`), weights copied from ours.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from released import (
    as_batch,
    assert_fit_refused,
    make_batches,
    ref_trunk,
    step_trainer,
)

from avtrain.balance import greedy_rule, greedy_speed_difference
from avtrain.balance.greedy import greedy_speed_terms

CLASSES, BATCH = 3, 6
STEPS = ((0, 3), (1, 7), (2, 5))  # (epoch, steps); epoch 0 is before the released unlock
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the reference ------------------------------------------------------------------------------


class RefMMTM(nn.Module):  # balanced_mmtm.py MMTM_mitigate, SEonly=False, shareweight=False
    def __init__(self, dim_audio, dim_visual, ratio, slip):
        super().__init__()
        dim_out = int(2 * (dim_audio + dim_visual) / ratio)
        self.fc_squeeze = nn.Linear(dim_audio + dim_visual, dim_out)
        self.fc_audio = nn.Linear(dim_out, dim_audio)
        self.fc_visual = nn.Linear(dim_out, dim_visual)
        self.running_avg_weight_audio = torch.zeros(dim_audio)
        self.running_avg_weight_visual = torch.zeros(dim_visual)
        self.step = 0
        self.slip = slip

    def forward(self, audio, visual, frames, curation_mode, caring_modality):
        b = audio.shape[0]
        c, h, w = visual.shape[1:]
        clip = visual.view(b, frames, c, h, w).permute(0, 2, 1, 3, 4)  # BalanceMM 575-576
        squeeze = torch.cat([audio.view(audio.shape[:2] + (-1,)).mean(-1),
                             clip.reshape(b, c, -1).mean(-1)], 1)
        excitation = torch.relu(self.fc_squeeze(squeeze))
        a_out = torch.sigmoid(self.fc_audio(excitation))
        v_out = torch.sigmoid(self.fc_visual(excitation))
        self.running_avg_weight_audio = (a_out.mean(0) + self.running_avg_weight_audio
                                         * self.step).detach() / (self.step + 1)
        second = a_out if self.slip else v_out  # released line 114 reads vis_out here
        self.running_avg_weight_visual = (second.mean(0) + self.running_avg_weight_visual
                                          * self.step).detach() / (self.step + 1)
        self.step += 1
        if curation_mode and caring_modality == 0:
            a_out = torch.stack(b * [self.running_avg_weight_audio])
        if curation_mode and caring_modality == 1:
            v_out = torch.stack(b * [self.running_avg_weight_visual])
        audio = audio * a_out.view(a_out.shape + (1, 1))
        visual = (clip * v_out.view(b, c, 1, 1, 1)).permute(0, 2, 1, 3, 4).reshape(-1, c, h, w)
        return audio, visual


class Branch(nn.Module):
    def __init__(self, channels, fusion):
        super().__init__()
        self.trunk = ref_trunk(channels)
        if fusion == "sum":
            self.fc = nn.Linear(64, CLASSES)


class RefNet(nn.Module):  # model.py MMTM_MVCNN on the tiny trunks (3 stages, blocks after 2, 3)
    def __init__(self, fusion, slip):
        super().__init__()
        self.fusion = fusion
        self.net_audio, self.net_visual = Branch(1, fusion), Branch(3, fusion)
        self.mmtm2, self.mmtm3 = RefMMTM(32, 32, 4, slip), RefMMTM(64, 64, 4, slip)
        if fusion == "concat":
            self.fc_out = nn.Linear(128, CLASSES)

    def forward(self, audio, visual, curation_mode=False, caring_modality=None):
        b, t = visual.shape[:2]
        a, v = audio, visual.reshape(b * t, *visual.shape[2:])
        for i in range(3):
            a = self.net_audio.trunk[3 * i:3 * i + 3](a)
            v = self.net_visual.trunk[3 * i:3 * i + 3](v)
            if i >= 1:
                a, v = getattr(self, f"mmtm{i + 1}")(a, v, t, curation_mode, caring_modality)
        fa = F.adaptive_avg_pool2d(a, 1).flatten(1)
        c, h, w = v.shape[1:]
        fv = F.adaptive_avg_pool3d(v.view(b, t, c, h, w).permute(0, 2, 1, 3, 4), 1).flatten(1)
        if self.fusion == "sum":
            return [self.net_audio.fc(fa), self.net_visual.fc(fv)]
        wa, wv = self.fc_out.weight[:, :64], self.fc_out.weight[:, 64:]
        return [fa @ wa.t() + self.fc_out.bias / 2, fv @ wv.t() + self.fc_out.bias / 2]


def blend_loss(y_hat, y):  # train.py 22-28
    return sum(nn.CrossEntropyLoss()(pred, y) for pred in y_hat)


class RefBiasMitigationStrong:  # callbacks.py 173-267
    def __init__(self, model, epsilon, window, starting_epoch=2):
        self.model, self.epsilon, self.window, self.starting_epoch = model, epsilon, window, \
            starting_epoch
        self.branchnames, self.mmtmnames = ["net_audio", "net_visual"], ["audio", "visual"]
        self.M_bypass_modal_0 = self.M_bypass_modal_1 = 0
        self.M_main_modal_0 = self.M_main_modal_1 = 0
        self.curation_mode, self.caring_modality, self.unlock = False, None, False
        self.d_BDR = 0.0

    def compute_BDR(self):
        wn_main, wn_bypass, gn_main, gn_bypass = [0, 0], [0, 0], [0, 0], [0, 0]
        for name, parameter in self.model.named_parameters():
            wn = (parameter ** 2).sum().item()
            gn = (parameter.grad.data ** 2).sum().item()
            if "mmtm" in name:
                shared = True
                for ind, modal in enumerate(self.mmtmnames):
                    if modal in name:
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
                        shared = False
                if shared:
                    for ind in range(2):
                        wn_bypass[ind] += wn
                        gn_bypass[ind] += gn
            else:
                for ind, modal in enumerate(self.branchnames):
                    if modal in name:
                        wn_main[ind] += wn
                        gn_main[ind] += gn
        self.M_bypass_modal_0 += gn_bypass[0] / wn_bypass[0]
        self.M_bypass_modal_1 += gn_bypass[1] / wn_bypass[1]
        self.M_main_modal_0 += gn_main[0] / wn_main[0]
        self.M_main_modal_1 += gn_main[1] / wn_main[1]
        bdr_0 = torch.log10(torch.tensor(self.M_bypass_modal_0 / self.M_main_modal_0,
                                         dtype=torch.float64)).item()
        bdr_1 = torch.log10(torch.tensor(self.M_bypass_modal_1 / self.M_main_modal_1,
                                         dtype=torch.float64)).item()
        return bdr_0 - bdr_1

    def on_backward_end(self):
        if self.unlock:
            if not self.curation_mode:
                self.d_BDR = self.compute_BDR()
                if abs(self.d_BDR) > self.epsilon:
                    self.curation_mode, self.curation_step = True, 0
                    self.caring_modality = 1 if self.d_BDR < 0 else 0
                else:
                    self.curation_mode, self.caring_modality = False, 0
            else:
                self.curation_step += 1
                if self.curation_step == self.window:
                    self.curation_mode = False
        else:
            self.d_BDR = self.compute_BDR()
            self.curation_mode, self.caring_modality = False, 0

    def on_epoch_begin(self, epoch):
        if epoch >= self.starting_epoch:
            self.unlock = True


def ref_train(model, data, epsilon, window):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    callback = RefBiasMitigationStrong(model, epsilon, window)
    records, params, step = [], [], 0
    model.train()
    for epoch, steps in STEPS:
        callback.on_epoch_begin(epoch + 1)  # framework.py 293: epochs from 1
        for _ in range(steps):
            audio, visual, label = data[step]
            optimizer.zero_grad(set_to_none=False)  # torch 1.x zero_grad: zeros, not None
            mode = (callback.curation_mode, callback.caring_modality)
            loss = blend_loss(model(audio, visual, *mode), label)
            loss.backward()
            callback.on_backward_end()
            optimizer.step()
            records.append({"d": callback.d_BDR, "rebalance": mode[1] if mode[0] else -1})
            params.append({k: p.detach().clone() for k, p in model.named_parameters()})
            step += 1
    return records, params


def copy_into_reference(ours, ref):
    """Our weights into the reference (name map), so both start from one network."""
    src = dict(ours.named_parameters())
    pairs = {}
    for m, branch in (("audio", "net_audio"), ("visual", "net_visual")):
        for name, p in getattr(ref, branch).trunk.named_parameters():
            pairs[p] = src[f"encoders.{m}.backbone.{name}"]
        if ref.fusion == "sum":
            for name, p in getattr(ref, branch).fc.named_parameters():
                pairs[p] = src[f"fusion.fc.{m}.{name}"]
        for i in (0, 1):
            block = getattr(ref, f"mmtm{i + 2}")
            for name, p in getattr(block, f"fc_{m}").named_parameters():
                pairs[p] = src[f"mmtm.blocks.{i}.fc_excite.{m}.{name}"]
    for i in (0, 1):
        for name, p in getattr(ref, f"mmtm{i + 2}").fc_squeeze.named_parameters():
            pairs[p] = src[f"mmtm.blocks.{i}.fc_squeeze.{name}"]
    if ref.fusion == "concat":
        for name, p in ref.fc_out.named_parameters():
            pairs[p] = src[f"fusion.fc_out.{name}"]
    assert len(pairs) == len(list(ref.parameters())) == len(src)
    with torch.no_grad():
        for p, q in pairs.items():
            p.copy_(q)
    return {id(p): n for n, q in src.items() for p, q2 in pairs.items() if q2 is q}


# --- ours ---------------------------------------------------------------------------------------


def trainer(fusion, epsilon, window, average="own", bn=True):
    return step_trainer("greedy", fusion, CLASSES, bn=bn, optimizer="sgd", lr=0.05,
                        greedy_epsilon=epsilon, greedy_window=window, greedy_average=average)


def our_train(t, data, part=slice(None)):
    params, metrics, step = [], [], 0
    for epoch, steps in STEPS:
        t.model.train()
        for _ in range(steps):
            t.step = step
            t.train_step(as_batch(data[step], part), epoch)
            metrics.append({k: float(v) for k, v in t.balancer.step_metrics().items()})
            params.append({k: p.detach().clone() for k, p in t.model.named_parameters()})
            step += 1
    return params, metrics


@pytest.mark.parametrize("fusion,epsilon,window,average,audio_scale,caring", [
    ("concat", 0.01, 2, "own", 1.0, 1),  # windows back to back, for visual (d < 0)
    ("sum", 0.02, 3, "released", 1.0, 1),  # the branches' heads; the released running-mean slip
    # audio's convolutions x3: under BatchNorm its gradients shrink 3x, |g|^2/|w|^2 81x, d > 0
    ("concat", 0.01, 2, "own", 3.0, 0),
])
def test_steps_equal_the_released_step(fusion, epsilon, window, average, audio_scale, caring):
    torch.manual_seed(0)
    t = trainer(fusion, epsilon, window, average)
    with torch.no_grad():
        for layer in t.model.encoders["audio"].backbone:
            if isinstance(layer, nn.Conv2d):
                layer.weight.mul_(audio_scale)
    ref = RefNet(fusion, slip=average == "released")
    names = copy_into_reference(t.model, ref)
    data = make_batches(7, BATCH, sum(n for _, n in STEPS), CLASSES)
    want_records, want_params = ref_train(ref, data, epsilon, window)
    got_params, got_metrics = our_train(t, data)
    rebalanced = []
    for want, got in zip(want_records, got_metrics):
        assert got["speed_diff"] == pytest.approx(want["d"], abs=1e-6)
        flags = [got["rebalance_audio"], got["rebalance_visual"]]
        assert flags == [float(want["rebalance"] == 0), float(want["rebalance"] == 1)]
        rebalanced.append(want["rebalance"])
    assert rebalanced[:4] == [-1] * 4  # locked epoch 0, then the first unlocked step measures
    assert sum(r == caring for r in rebalanced) >= window  # re-balancing steps really ran
    ref_names = {n: names[id(p)] for n, p in ref.named_parameters()}
    for got, want in zip(got_params, want_params):
        for name, value in want.items():
            torch.testing.assert_close(got[ref_names[name]], value, **TOL)


def test_speed_difference_by_hand():
    # M = [bypass_a, bypass_v, main_a, main_v]: log10(2/0.02) - log10(0.5/0.05) = 2 - 1 = 1
    d, bdr = greedy_speed_difference(torch.tensor([2.0, 0.5, 0.02, 0.05], dtype=torch.float64))
    assert bdr.tolist() == pytest.approx([2.0, 1.0])
    assert float(d) == pytest.approx(1.0)


def test_speed_terms_by_hand():
    w1 = nn.Parameter(torch.tensor([3.0, 4.0]))  # |w|^2 = 25
    w2 = nn.Parameter(torch.tensor([[1.0, 2.0]]))  # 5
    w1.grad, w2.grad = torch.tensor([0.3, 0.4]), torch.tensor([[0.0, 1.0]])  # 0.25, 1
    w3 = nn.Parameter(torch.tensor([2.0]))  # no grad: counts 0
    terms = greedy_speed_terms([[w1, w2], [w2], [w3], [w1, w3]])
    assert terms.tolist() == pytest.approx([1.25, 30.0, 1.0, 5.0, 0.0, 4.0, 0.25, 29.0])


def _state(curating, caring, step):
    return {"curating": torch.tensor(curating), "caring": torch.tensor(caring),
            "curation_step": torch.tensor(step)}


def _plain(state):
    return bool(state["curating"]), int(state["caring"]), int(state["curation_step"])


def test_rule_by_hand():
    rule = lambda s, d, **kw: _plain(greedy_rule(s, torch.tensor(d), epsilon=0.1,  # noqa: E731
                                                 window=3, **kw))
    # locked: never curate, caring 0
    assert rule(_state(False, 1, 7), 5.0, unlocked=False) == (False, 0, 7)
    # d = 0.2 > eps: a window for modality 0 (audio); d = -0.2: for modality 1
    assert rule(_state(False, 0, 3), 0.2, unlocked=True) == (True, 0, 0)
    assert rule(_state(False, 0, 3), -0.2, unlocked=True) == (True, 1, 0)
    # |d| <= eps: normal step, caring back to 0
    assert rule(_state(False, 1, 3), 0.1, unlocked=True) == (False, 0, 3)
    # inside a window d is ignored; the window ends after its 3rd step
    assert rule(_state(True, 1, 0), 0.0, unlocked=True) == (True, 1, 1)
    assert rule(_state(True, 1, 1), 9.0, unlocked=True) == (True, 1, 2)
    assert rule(_state(True, 1, 2), 9.0, unlocked=True) == (False, 1, 3)


def test_eval_forward_neither_rebalances_nor_moves_the_running_means():
    torch.manual_seed(0)
    t = trainer("concat", 0.01, 2)
    data = make_batches(7, BATCH, 1, CLASSES)
    before = copy.deepcopy(dict(t.model.named_buffers()))
    t.model.eval()
    t.model.mmtm.caring = torch.tensor(0)
    with torch.no_grad():
        a = t.model(as_batch(data[0]))["fused"]
        t.model.mmtm.caring = None
        b = t.model(as_batch(data[0]))["fused"]
    assert torch.equal(a, b)
    for k, v in t.model.named_buffers():
        assert torch.equal(v, before[k]), k


# --- the real trainer ---------------------------------------------------------------------------


@pytest.mark.parametrize("settings,words", [
    ({"greedy_epsilon": "nan"}, "--greedy-epsilon must be a finite number, got nan"),
    # its default window start is 1 (the released starting_epoch 2)
    ({"modulation_end": 0}, "--modulation-end (0) is before --modulation-start (1)"),
])
def test_bad_input_is_one_error_line(method_shards, tmp_path, settings, words):
    """Its own rows; those of every method are test_contract.py's."""
    assert_fit_refused(method_shards, tmp_path / "run", "greedy", settings, words)


def test_more_than_two_modalities_is_refused():
    from avprep.errors import UserError
    from avtrain.balance import build_balancer
    from avtrain.models import build_model

    with pytest.raises(UserError, match="defined for those two modalities"):
        build_model("tiny", "sum", 3, ["audio", "visual", "text"], mmtm=True)
    model = build_model("tiny", "sum", 3, ["audio", "visual", "text"])
    with pytest.raises(UserError, match="defined for two modalities"):
        build_balancer("greedy", model, {}, modalities=model.modalities)


def test_one_frame_clips_are_folded_like_several():
    """A clip of one frame ([B, 1, C, H, W], `--frames 1`) goes through the MMTM trunk as the
    same frame given alone ([B, C, H, W]); it once reached conv2d unfolded and stopped the run."""
    from avtrain.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", "concat", 4, mmtm=True).eval()
    audio = torch.randn(3, 1, 64, 32)
    frame = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        one = model({"audio": audio, "visual": frame.unsqueeze(1)})
        bare = model({"audio": audio, "visual": frame})
    torch.testing.assert_close(one["fused"], bare["fused"])
    assert one["fused"].shape == (3, 4)
