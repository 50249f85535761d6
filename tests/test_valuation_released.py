"""Modality valuation against the authors' released code (differential), its rules by hand, the
re-sampled stream, DDP, resume and the CLI.

The reference is written from GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation (7ed12b0):
code/sample_level.py `execute_modulation` (lines 83-122: eval mode, no grad, `exec_drop` of
each modality, argmax against the label, value 2 for the pair and 1 for one modality, the two
contributions) and `train_epoch` (164-177: CE of the fused output with the copy's features
zeroed row by row, models.py 61-72); code/datasets/dataloader.py (152-186: the copies per
contribution band; 297-316 the modality-level gap and the drawn samples); code/modality_level.py
(the subset Z and its mean contributions). The network is avtrain's tiny model (its `features`
and the fusion's layer): the method is under test.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from released import (
    as_batch,
    assert_fit_refused,
    assert_ranks_equal_one,
    fit_and_resume,
    make_batches,
    run_gloo,
    step_trainer,
)
from test_balance_ogm import step_records

from avtrain.balance import modality_gap, sample_copies, valuation_contributions

CLASSES, BATCH = 3, 6
TOL = {"rtol": 1e-6, "atol": 1e-6}
AV = ["audio", "visual"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the rules by hand --------------------------------------------------------------------------


def test_two_modality_contributions_by_hand():
    # rows: (audio right, visual right, pair right); phi_a = (v_a + v_av - v_v) / 2 with
    # v_a, v_v in {0, 1} and v_av in {0, 2}
    rows = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    a, v, av = (torch.tensor([r[i] for r in rows], dtype=torch.bool) for i in range(3))
    phi = valuation_contributions({("audio",): a, ("visual",): v, ("audio", "visual"): av}, AV)
    # (0+0-0)/2=0, (1+0-0)/2=.5, (0+0-1)/2=-.5, (1+0-1)/2=0, (0+2-0)/2=1, (1+2-0)/2=1.5,
    # (0+2-1)/2=.5, (1+2-1)/2=1; visual is the mirror image
    assert phi[:, 0].tolist() == [0, 0.5, -0.5, 0, 1, 1.5, 0.5, 1]
    assert phi[:, 1].tolist() == [0, -0.5, 0.5, 0, 1, 0.5, 1.5, 1]
    assert (phi.sum(dim=1) == av.double() * 2).all()  # efficiency: they sum to v(all)


def test_three_modalities_all_right_give_exactly_one():
    # v(S) = |S| for every S: each marginal is 1, weights sum to 1 -> phi = 1 exactly (not
    # 0.9999...), so the band "0.4 < phi < 1" gives no copy, as for two modalities
    mods = ["audio", "visual", "text"]
    right = torch.ones(2, dtype=torch.bool)
    correct = {s: right for s in [("audio",), ("visual",), ("text",), ("audio", "visual"),
                                  ("audio", "text"), ("visual", "text"), tuple(mods)]}
    phi = valuation_contributions(correct, mods)
    assert phi.tolist() == [[1.0, 1.0, 1.0]] * 2
    assert sample_copies(phi).tolist() == [[0, 0, 0]] * 2
    # only audio alone right: v({a}) = 1, the rest 0 -> phi_a = 2!0!/3! * 1 = 1/3 and
    # phi_v = phi_t = 1!1!/3! * (0 - 1) = -1/6
    wrong = torch.zeros(1, dtype=torch.bool)
    correct = {s: (torch.ones(1, dtype=torch.bool) if s == ("audio",) else wrong)
               for s in correct}
    phi = valuation_contributions(correct, mods)
    assert phi[0].tolist() == pytest.approx([1 / 3, -1 / 6, -1 / 6], abs=1e-12)
    assert sample_copies(phi).tolist() == [[2, 3, 3]]  # -0.1 < 1/3 < 0.4; -1/6 < -0.1


def test_copy_bands_by_hand():
    phi = torch.tensor([[-0.5, 0.0], [0.5, 1.0], [1.5, 0.45], [0.39, -0.09]], dtype=torch.float64)
    # -0.5 < -0.1: 3; 0.0 in (-0.1, 0.4): 2; 0.5 in (0.4, 1): 1; 1.0: none; 1.5: none;
    # 0.45: 1; 0.39: 2; -0.09: 2
    assert sample_copies(phi).tolist() == [[3, 2], [1, 0], [0, 1], [2, 2]]


def test_modality_gap_by_hand():
    phi = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.5, 0.5], [0.0, 1.0]], dtype=torch.float64)
    # Z = rows 0, 2, 2: mean phi_a = (1 + 1.5 + 1.5)/3 = 4/3, phi_v = (0 + .5 + .5)/3 = 1/3;
    # gap_a = -1/3, gap_v = 2/3; difference = |(-1/3) - 2/3| / 3 * 2 * alpha = 2/3 * 0.5 = 1/3
    gap, diff = modality_gap(phi, torch.tensor([0, 2, 2]), 0.5)
    assert gap.tolist() == pytest.approx([-1 / 3, 2 / 3], abs=1e-12)
    assert float(diff) == pytest.approx(1 / 3, abs=1e-12)


# --- the reference ------------------------------------------------------------------------------


def ref_contributions(model, batch):
    """released execute_modulation for one batch: [(contrib_a, contrib_v)] per sample."""
    with torch.no_grad():
        model.eval()
        feats = model.features(batch)
        a, v = feats["audio"], feats["visual"]
        fc = model.fusion.fc_out
        out = fc(torch.cat((a, v), 1))
        out_v = fc(torch.cat((torch.zeros_like(a), v), 1))  # exec_drop(drop="audio")
        out_a = fc(torch.cat((a, torch.zeros_like(v)), 1))
        rows = []
        for i, label in enumerate(batch["label"].tolist()):
            value_all = 2.0 if int(out[i].argmax()) == label else 0.0
            value_v = 1.0 if int(out_v[i].argmax()) == label else 0.0
            value_a = 1.0 if int(out_a[i].argmax()) == label else 0.0
            rows.append(((value_a + value_all - value_v) / 2.0,
                         (value_v + value_all - value_a) / 2.0))
        model.train()
    return rows


def ref_copies(keys, contribution):
    """AV_KS_Dataset_sample_level: (key, drop) of every added copy; drop 2 = visual zeroed
    (audio kept), 1 = audio zeroed."""
    added = []
    for i, key in enumerate(keys):
        contrib_a, contrib_v = contribution[i]
        for c, drop in ((contrib_a, 2), (contrib_v, 1)):
            if 0.4 < c < 1:
                added += [(key, drop)]
            elif -0.1 < c < 0.4:
                added += [(key, drop)] * 2
            elif c < -0.1:
                added += [(key, drop)] * 3
    return sorted(added)


def ref_step(model, optimizer, batch, drop):
    """released train_epoch with the copies' drop flags (models.py forward)."""
    model.train()
    optimizer.zero_grad()
    feats = model.features(batch)
    a, v = feats["audio"], feats["visual"]
    for i in range(len(drop)):
        if drop[i] == 1:
            a[i, :] = 0.0
        elif drop[i] == 2:
            v[i, :] = 0.0
    out = model.fusion.fc_out(torch.cat((a, v), 1))
    loss = nn.CrossEntropyLoss()(out, batch["label"])
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


def trainer(**settings):
    return step_trainer("valuation", "concat", CLASSES, optimizer="sgd", lr=0.05, seed=2,
                        **settings)


def test_valuation_equals_the_released_one():
    torch.manual_seed(0)
    t = trainer()
    batches = keyed(make_batches(5, BATCH, 3, CLASSES))
    # train a few steps so the three predictions disagree on some samples
    for b in batches:
        t.train_step(b, 0)
    want = [r for b in batches for r in ref_contributions(copy.deepcopy(t.model), b)]
    keys, phi = t.balancer.value(iter(batches), lambda: torch.autocast("cpu", enabled=False))
    all_keys = [k for b in batches for k in b["key"]]
    assert keys == sorted(all_keys)
    order = [all_keys.index(k) for k in keys]
    assert phi.tolist() == [list(want[i]) for i in order]
    assert len({tuple(r) for r in phi.tolist()}) > 1  # not one constant row
    copies, counts = t.balancer.plan(keys, phi, epoch=5)
    got = sorted((k, {1: 2, 2: 1}[mask]) for k, masks in copies.items() for mask in masks)
    assert got == ref_copies(keys, [want[i] for i in order])
    assert counts.sum() == len(got) > 0
    assert t.model.training  # valuation left the model in train mode


def test_steps_with_copies_equal_the_released_step():
    torch.manual_seed(0)
    t = trainer()
    ref = copy.deepcopy(t.model)
    ref.fusion._forward_pre_hooks.clear()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(4)
    for b in keyed(make_batches(6, BATCH, 4, CLASSES)):
        keep = torch.randint(1, 4, (BATCH,), generator=g)  # 3 = both, 1 = audio, 2 = visual
        drop = [{3: 0, 1: 2, 2: 1}[int(k)] for k in keep]
        want_loss = ref_step(ref, ref_opt, b, drop)
        loss, logits = t.train_step({**b, "keep": keep}, 5)
        assert float(loss.detach()) == pytest.approx(want_loss, rel=1e-6, abs=1e-6)
        for (name, p), q in zip(t.model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, **TOL, msg=name)
    # a batch without masks is the baseline step
    b = keyed(make_batches(8, BATCH, 1, CLASSES))[0]
    want_loss = ref_step(ref, ref_opt, b, [0] * BATCH)
    assert float(t.train_step(b, 5)[0].detach()) == pytest.approx(want_loss, rel=1e-6, abs=1e-6)


def test_modality_level_adds_the_weak_modality_alone():
    torch.manual_seed(0)
    t = trainer(valuation_level="modality", valuation_alpha=1.0, valuation_part_ratio=0.5)
    keys = [f"k{i}" for i in range(40)]
    # audio contributes everything, visual nothing: gap_a = 0, gap_v = 1 -> difference 2/3:
    # int(2/3 * 40) = 26 copies keeping visual (bit 1) alone
    phi = torch.tensor([[1.0, 0.0]] * 40, dtype=torch.float64)
    copies, counts = t.balancer.plan(keys, phi, epoch=7)
    masks = [m for v in copies.values() for m in v]
    assert len(masks) == 26 and set(masks) == {2}
    assert counts.tolist() == [0.0, 26.0]
    again, _ = t.balancer.plan(keys, phi, epoch=7)
    assert again == copies  # seeded by (seed, epoch): every rank and resume draws the same


# --- the re-sampled stream ----------------------------------------------------------------------


def test_copies_stage_yields_originals_then_their_copies():
    from avtrain.data import _copies_stage

    src = [{"__key__": "a", "x": 1}, {"__key__": "b", "x": 2}]
    out = list(_copies_stage(iter(src), copies={"b": (1, 2, 2)}, everything=3))
    assert [(s["__key__"], s["__keep__"]) for s in out] == [("a", 3), ("b", 3), ("b", 1),
                                                              ("b", 2), ("b", 2)]
    assert src[1] == {"__key__": "b", "x": 2}  # the input samples are not changed


def test_train_loader_carries_each_copys_mask(method_shards):
    from avtrain.data import open_shards, train_loader
    from avtrain.decode import DataOptions

    s = open_shards(str(method_shards))
    opts = DataOptions.for_shards(s, image_size=32)
    first = next(iter(train_loader(s, "train", opts, batch_size=4, steps=1, workers=0)))
    key = first["key"][0]
    # the shuffle buffer fills with 100 samples first: read well past it (~45 of the key's)
    loader = train_loader(s, "train", opts, batch_size=4, steps=60, workers=0,
                          copies={key: (1, 2)}, modalities=2)
    seen = [(k, int(m)) for b in loader for k, m in zip(b["key"], b["keep"])]
    assert {m for k, m in seen if k != key} == {3}  # every other sample keeps both
    mine = [m for k, m in seen if k == key]
    assert set(mine) == {1, 2, 3}  # the original and its two copies
    assert 0.25 < mine.count(3) / (mine.count(1) + mine.count(2)) < 1  # 1 original per 2 copies


# --- DDP ----------------------------------------------------------------------------------------


def _ddp_run(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    t = step_trainer("valuation", "concat", CLASSES, bn=False, optimizer="sgd", lr=0.05, seed=2)
    data = keyed(make_batches(5, BATCH, 4, CLASSES))
    per = BATCH // world
    part = slice(rank * per, (rank + 1) * per)
    metrics = []
    for step, b in enumerate(data[:2]):  # train, then value every sample once across ranks
        t.step = step
        t.train_step({k: v[part] for k, v in b.items()}, 0)
    mine = [{k: v[part] for k, v in b.items()} for b in data]
    keys, phi = t.balancer.value(iter(mine), lambda: torch.autocast("cpu", enabled=False))
    copies, _ = t.balancer.plan(keys, phi, epoch=5)
    g = torch.Generator().manual_seed(9)
    for step, b in enumerate(data[2:], start=2):
        t.step = step
        keep = torch.randint(1, 4, (BATCH,), generator=g)
        t.train_step({**{k: v[part] for k, v in b.items()}, "keep": keep[part]}, 5)
        metrics.append({"copies": float(sum(len(v) for v in copies.values()))})
    return {"params": {k: p.detach().clone() for k, p in t.model.named_parameters()},
            "metrics": metrics, "keys": keys, "phi": phi}


@pytest.mark.slow
def test_two_gloo_processes_equal_one_with_the_global_batch(tmp_path):
    ranks = run_gloo(_ddp_run, tmp_path)
    one = _ddp_run(0, 1)
    assert ranks[0]["keys"] == ranks[1]["keys"] == one["keys"]
    assert torch.equal(ranks[0]["phi"], one["phi"]) and torch.equal(ranks[1]["phi"], one["phi"])
    assert_ranks_equal_one(ranks, one)


# --- the real trainer ---------------------------------------------------------------------------


def fit_args(method_shards, run, epochs, *extra):
    return ["fit", "--shards", str(method_shards), "--run-dir", str(run), "--method", "valuation",
            "--model", "tiny", "--fusion", "concat", "--epochs", str(epochs), "--batch-size", "4",
            "--lr", "0.05", "--image-size", "32", "--workers", "0", "--device", "cpu",
            "--no-progress", "--log-every", "1", "--seed", "1", "--scheduler", "none",
            "--valuation-warmup", "1", *extra]


def test_cli_run_grows_the_epoch_and_logs_the_signal(method_shards, tmp_path):
    from avtrain.data import open_shards
    from avtrain.report import balancing_keys, load_run
    from cli import avtrain

    run = tmp_path / "run"
    out = CliRunner().invoke(avtrain, fit_args(method_shards, run, 2))
    assert out.exit_code == 0, out.output
    steps = step_records(run)
    per_epoch = [sum(r["epoch"] == e for r in steps) for e in (0, 1)]
    last = [r for r in steps if r["epoch"] == 1][-1]
    train = open_shards(str(method_shards)).samples("train")
    assert last["valuation_copies"] > 0  # epoch 1 was re-sampled
    extra = round(last["valuation_copies"] * train)
    assert per_epoch == [train // 4, (train + extra) // 4]
    assert per_epoch[1] > per_epoch[0]
    for key in ("valuation_contrib_audio", "valuation_contrib_visual", "valuation_copies_audio"):
        assert key in last
    assert "valuation_contrib_audio" in balancing_keys(load_run(str(run)))
    assert json.loads((run / "summary.json").read_text())["method"] == "valuation"


def test_resume_is_exact(method_shards, tmp_path):

    full, part = tmp_path / "full", tmp_path / "part"
    a, b = fit_and_resume(lambda run, epochs: fit_args(method_shards, run, epochs), full, part)
    assert a["step"] == b["step"]
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-6, atol=1e-7)
    want = [r for r in step_records(full) if r["epoch"] == 2]
    got = [r for r in step_records(part) if r["epoch"] == 2]
    assert len(got) == len(want) > 0
    assert got[0]["valuation_copies"] > 0  # the resumed epoch was really re-sampled
    for g, w in zip(got, want):
        for key in ("valuation_copies", "valuation_contrib_audio", "loss"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("settings,words", [
    ({"valuation_warmup": 0}, "--valuation-warmup must be at least 1, got 0"),
    ({"valuation_part_ratio": 1.5}, "--valuation-part-ratio must be in (0, 1], got 1.5"),
    ({"valuation_part_ratio": "nan"}, "--valuation-part-ratio must be a finite number"),
    ({"valuation_alpha": -1}, "--valuation-alpha must be 0 or more, got -1.0"),
])
def test_bad_input_is_one_error_line(method_shards, tmp_path, settings, words):
    """Its own rows; those of every method are test_contract.py's."""
    assert_fit_refused(method_shards, tmp_path / "run", "valuation", settings, words)
