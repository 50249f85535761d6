"""Remix against the authors' released code (differential), its rule by hand, the re-assembled
stream and a real run.

The reference is written from MatthewMaxy/Remix_ICML2025 (80898aa): train.py `kl_divergence`
(52-57: np.clip to [1e-9, 1], log2 of the ratio to the uniform distribution), `remix` (60-99:
eval mode, no grad, audio if KL_audio < KL_video else video), `train_epoch` (101-125:
CE(out) + alpha CE(out_audio) + beta CE(out_video)), `special_train_epoch` (127-173: the video
subset's batches first, CE(out) + gamma1 CE(out_video), then the audio subset's,
CE(out) + gamma2 CE(out_audio)) and models/models.py `forward` (38-67: the other modality's
pooled features set to 0 in place before `head`). The network is avtrain's tiny model (its
`features`, the concat layer as the released `head`, its trained heads as `head_audio` and
`head_video`): the method is under test.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from released import as_batch, assert_ranks_equal_one, make_batches, run_gloo, step_trainer
from test_balance_ogm import step_records

from avtrain.balance import remix_assign, remix_divergence

CLASSES, BATCH = 3, 6
TOL = {"rtol": 1e-6, "atol": 1e-6}
AUDIO, VISUAL = 1, 2  # modality masks: bit 0 keeps audio, bit 1 visual
# weights unlike each other, so a swapped weight shows
SETTINGS = {"remix_warm_audio": 0.3, "remix_warm_visual": 0.7, "remix_gamma_audio": 0.6,
            "remix_gamma_visual": 1.7}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the rule by hand ---------------------------------------------------------------------------


def test_divergence_by_hand():
    # uniform: 0 bits; p = (1/2, 1/4, 1/4) over 3 classes:
    # 1/2 log2(3/2) + 2 * 1/4 log2(3/4) = 1/2 log2(9/8)
    logits = torch.tensor([[0.0, 0.0, 0.0], [np.log(2.0), 0.0, 0.0]])
    kl = remix_divergence(logits)
    assert kl.dtype == torch.float64
    assert kl.tolist() == pytest.approx([0.0, 0.5 * np.log2(9 / 8)], abs=1e-7)
    # a certain head: the zero probabilities are clipped to 1e-9 (float32), as released
    tiny = float(np.float32(1e-9))
    kl = remix_divergence(torch.tensor([[0.0, -1e4, -1e4]]))
    want = np.log2(3.0) + 2 * tiny * np.log2(tiny * 3)
    assert kl.tolist() == pytest.approx([want], rel=0, abs=1e-12)
    assert kl[0] < np.log2(3.0)  # the clipped terms count (without the clip: NaN)


def test_each_sample_goes_to_the_least_sure_modality():
    # columns (audio, visual): smaller KL = less sure; a tie goes to visual (released: audio
    # only when KL_audio < KL_video)
    kl = torch.tensor([[0.1, 0.9], [0.9, 0.1], [0.5, 0.5], [0.0, 0.0]], dtype=torch.float64)
    assert remix_assign(kl).tolist() == [0, 1, 1, 1]


# --- the reference ------------------------------------------------------------------------------


def ref_forward(model, batch, mode=None):
    """released AVClassifier.forward: (out, out_audio, out_video)."""
    feats = model.features(batch)
    a, v = feats["audio"], feats["visual"]
    if mode == "video":
        a[:, :] = 0.0
    elif mode == "audio":
        v[:, :] = 0.0
    out = model.fusion.fc_out(torch.cat((a, v), 1))
    return out, model.aux_heads["audio"](a), model.aux_heads["visual"](v)


def ref_kl(predictions, num_classes):
    """released kl_divergence (numpy)."""
    uniform = np.full(num_classes, 1.0 / num_classes)
    predictions = np.clip(predictions, 1e-9, 1.0)
    return np.sum(predictions * np.log2(predictions / uniform))


def ref_remix(model, batches):
    """released remix: (audio subset keys, video subset keys)."""
    audio, video = [], []
    with torch.no_grad():
        model.eval()
        for b in batches:
            _, out_audio, out_video = ref_forward(model, b)
            pred_a, pred_v = nn.Softmax(dim=1)(out_audio), nn.Softmax(dim=1)(out_video)
            for i, key in enumerate(b["key"]):
                kl_a = ref_kl(pred_a[i].cpu().numpy(), CLASSES)
                kl_v = ref_kl(pred_v[i].cpu().numpy(), CLASSES)
                (audio if kl_a < kl_v else video).append(key)
    model.train()
    return audio, video


def ref_step(model, optimizer, batch, mode, w):
    """released train_epoch (mode None) or special_train_epoch's step (mode video / audio)."""
    criterion = nn.CrossEntropyLoss()
    model.train()
    optimizer.zero_grad()
    out, out_audio, out_video = ref_forward(model, batch, mode)
    y = batch["label"]
    if mode is None:
        loss = (criterion(out, y) + w["remix_warm_audio"] * criterion(out_audio, y)
                + w["remix_warm_visual"] * criterion(out_video, y))
    elif mode == "video":
        loss = criterion(out, y) + w["remix_gamma_visual"] * criterion(out_video, y)
    else:
        loss = criterion(out, y) + w["remix_gamma_audio"] * criterion(out_audio, y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def keyed(batches, prefix="s"):
    out = []
    for j, b in enumerate(batches):
        b = as_batch(b)
        b["key"] = [f"{prefix}{j:02d}{i:02d}" for i in range(len(b["label"]))]
        out.append(b)
    return out


def trainer(bn=True, optimizer="adam", lr=0.01, **settings):
    # Adam with weight decay, as released (train.py 233): a head left without a gradient is
    # skipped, one given a zero gradient would still move (moments, decay)
    return step_trainer("remix", "concat", CLASSES, bn=bn, optimizer=optimizer, lr=lr,
                        weight_decay=1e-4, seed=2, **{**SETTINGS, **settings})


def reference_of(t):
    ref = copy.deepcopy(t.model)
    ref.fusion._forward_pre_hooks.clear()
    return ref, torch.optim.Adam(ref.parameters(), lr=0.01, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=1e-4, amsgrad=False)


# (epoch, mode) of the steps: two warm-up steps, then a remixed epoch's video batches and audio
# batches, and the next epoch's video batch
SCHEDULE = [(0, None), (0, None), (1, "video"), (1, "video"), (1, "audio"), (1, "audio"),
            (2, "video")]
MASK = {"video": VISUAL, "audio": AUDIO}


def test_steps_equal_the_released_steps():
    torch.manual_seed(0)
    t = trainer()
    ref, ref_opt = reference_of(t)
    data = keyed(make_batches(6, BATCH, len(SCHEDULE), CLASSES))
    moved = set()
    for step, ((epoch, mode), b) in enumerate(zip(SCHEDULE, data)):
        before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        want = ref_step(ref, ref_opt, b, mode, SETTINGS)
        t.step = step
        batch = b if mode is None else {**b, "keep": torch.full((BATCH,), MASK[mode])}
        loss, _ = t.train_step(batch, epoch)
        assert float(loss.detach()) == pytest.approx(want, rel=1e-6, abs=1e-6), step
        for (name, p), q in zip(t.model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, **TOL, msg=f"step {step}: {name}")
        metrics = {k: float(v) for k, v in t.balancer.step_metrics().items()}
        if mode is not None:
            assert metrics["remix_alone_visual"] == float(mode == "video")
            assert metrics["remix_alone_audio"] == float(mode == "audio")
            head = "audio" if mode == "video" else "visual"  # the head without a loss
            for name, p in t.model.named_parameters():
                if name.startswith(f"aux_heads.{head}."):
                    assert torch.equal(p, before[name]), (step, name)  # skipped, as released
        moved |= {n for n, p in t.model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("encoders.audio.") for n in moved)


def test_the_partition_equals_the_released_remix():
    torch.manual_seed(0)
    t = trainer()
    data = keyed(make_batches(5, BATCH, 6, CLASSES))
    for step, b in enumerate(data[:3]):  # warm up so the heads disagree about some samples
        t.step = step
        t.train_step(b, 0)
    # BatchNorm: the measurement must run in eval mode (train mode changes these statistics)
    want_audio, want_video = ref_remix(copy.deepcopy(t.model), data)
    assert want_audio and want_video  # both groups occupied: the comparison can tell

    from avtrain.balance.base import EpochContext

    ctx = EpochContext(net=t.net, model=t.model, epoch=10, batches=None,
                       eval_batches=lambda split: iter(data))
    t.balancer.start_epoch(ctx)
    groups = t.balancer.train_groups()
    assert groups == [(VISUAL, sorted(want_video)), (AUDIO, sorted(want_audio))]  # video first
    assert t.model.training  # left in train mode
    n = len(want_audio) + len(want_video)
    loss, _ = t.train_step({**data[3], "keep": torch.full((BATCH,), VISUAL)}, 10)
    metrics = {k: float(v) for k, v in t.balancer.step_metrics().items()}
    assert metrics["remix_share_audio"] == pytest.approx(len(want_audio) / n)
    assert metrics["remix_share_visual"] == pytest.approx(len(want_video) / n)
    assert metrics["remix_kl_audio"] > 0 and metrics["remix_kl_visual"] > 0
    # before the warm-up's end there is no partition: the data as it is
    t.balancer.start_epoch(EpochContext(net=t.net, model=t.model, epoch=9, batches=None,
                                        eval_batches=None))
    assert t.balancer.train_groups() is None


# --- DDP ----------------------------------------------------------------------------------------


def _ddp_run(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    # SGD (momentum, weight decay: a zero gradient would move the absent head too): Adam's
    # division by sqrt(v) magnifies the ranks' summation order past the tolerance
    t = trainer(bn=False, optimizer="sgd", lr=0.05)
    data = keyed(make_batches(6, BATCH, len(SCHEDULE), CLASSES))
    per = BATCH // world
    part = slice(rank * per, (rank + 1) * per)
    metrics = []
    for step, ((epoch, mode), b) in enumerate(zip(SCHEDULE, data)):
        t.step = step
        mine = {k: v[part] for k, v in b.items()}
        if mode is not None:
            mine["keep"] = torch.full((per,), MASK[mode])
        t.train_step(mine, epoch)
        metrics.append({k: float(v) for k, v in t.balancer.step_metrics().items()})
    return {"params": {k: p.detach().clone() for k, p in t.model.named_parameters()},
            "metrics": metrics}


@pytest.mark.slow
def test_two_gloo_processes_equal_one_with_the_global_batch(tmp_path):
    """The remixed steps too (the contract's driver has no masks): the absent head's gradient
    dropped after DDP's reduction on both ranks."""
    assert_ranks_equal_one(run_gloo(_ddp_run, tmp_path), _ddp_run(0, 1))


# --- the re-assembled stream and the real trainer -----------------------------------------------


def test_the_stream_gives_each_group_in_turn_in_batches_of_one_group(method_shards):
    from avtrain.data import open_shards, train_loader
    from avtrain.decode import DataOptions
    from avtrain.sampling import sample_table

    s = open_shards(str(method_shards))
    opts = DataOptions.for_shards(s, image_size=32)
    keys = sorted(sample_table(s, "train").keys)
    groups = [(VISUAL, keys[:9]), (AUDIO, keys[9:])]  # 9 and N - 9 samples
    loader = train_loader(s, "train", opts, batch_size=4, workers=0, epoch=3, groups=groups)
    assert loader.steps == 9 // 4 + (len(keys) - 9) // 4
    seen = [(list(b["key"]), b["keep"].tolist()) for b in loader]
    assert len(seen) == loader.steps
    first = 9 // 4
    for i, (batch_keys, masks) in enumerate(seen):
        group = VISUAL if i < first else AUDIO
        assert masks == [group] * 4
        assert set(batch_keys) <= set(dict(groups)[group])
    flat = [k for batch_keys, _ in seen for k in batch_keys]
    assert len(set(flat)) == len(flat)  # each sample at most once
    again = [list(b["key"]) for b in train_loader(s, "train", opts, batch_size=4, workers=0,
                                                   epoch=3, groups=groups)]
    assert again == [k for k, _ in seen]  # a function of (seed, epoch)
    other = [list(b["key"]) for b in train_loader(s, "train", opts, batch_size=4, workers=0,
                                                   epoch=4, groups=groups)]
    assert other != again  # shuffled anew each epoch


def fit_args(method_shards, run, epochs, *extra):
    return ["fit", "--shards", str(method_shards), "--run-dir", str(run), "--method", "remix",
            "--model", "tiny", "--fusion", "concat", "--epochs", str(epochs), "--batch-size", "4",
            "--lr", "0.05", "--image-size", "32", "--workers", "0", "--device", "cpu",
            "--no-progress", "--log-every", "1", "--seed", "1", "--scheduler", "none",
            "--remix-warmup", "1", *extra]


def test_cli_run_trains_the_groups_in_turn(method_shards, tmp_path):
    from avtrain.report import balancing_keys, load_run
    from cli import avtrain

    run = tmp_path / "run"
    out = CliRunner().invoke(avtrain, fit_args(method_shards, run, 2))
    assert out.exit_code == 0, out.output
    steps = step_records(run)
    warm = [r for r in steps if r["epoch"] == 0]
    remixed = [r for r in steps if r["epoch"] == 1]
    assert warm and all("remix_alone_audio" not in r for r in warm)
    share = remixed[0]["remix_share_audio"]
    assert remixed[0]["remix_share_visual"] == pytest.approx(1 - share, abs=1e-6)
    from avtrain.data import open_shards

    n = open_shards(str(method_shards)).samples("train")
    n_audio = round(share * n)
    assert len(remixed) == (n - n_audio) // 4 + n_audio // 4
    order = [(r["remix_alone_visual"], r["remix_alone_audio"]) for r in remixed]
    assert order == [(1.0, 0.0)] * ((n - n_audio) // 4) + [(0.0, 1.0)] * (n_audio // 4)
    assert {"remix_share_audio", "remix_kl_visual"} <= set(balancing_keys(load_run(str(run))))
    assert json.loads((run / "summary.json").read_text())["method"] == "remix"


def test_resampled_streams_are_refused(method_shards, tmp_path):
    from released import assert_fit_refused

    assert_fit_refused(method_shards, tmp_path / "run", "remix", {"sampling": "resample"},
                       "--method remix trains batches of one modality's group and needs "
                       "--sampling exact")
