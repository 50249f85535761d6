"""Uni-Modal Teacher against BalanceMM's trainer (differential), the loss by hand, DDP, resume,
the teachers' checks and the CLI (teachers fitted first, then the student).

No code of the authors was found; the reference is written from GeWu-Lab/BalanceBenchmark
(4c1482f) balancemm/trainer/UMT_trainer.py: `__init__` (lines 26-53: one teacher per modality,
the student's encoder alone, loaded from its unimodal run, not put in eval mode) and
`training_step` (129-147: CE of the output; in the window each teacher's forward under
no_grad, loss += scaling * MSELoss(teacher encoder_result[m], student encoder_result[m]); one
backward), configs/trainer_config.yaml lines 62-66 (scaling 10, window [0, 80]). The student
network is avtrain's tiny model (its `features` and fusion): the method is under test.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner
from released import (
    as_batch,
    assert_fit_refused,
    assert_one_error_line,
    assert_ranks_equal_one,
    fit_and_resume,
    make_batches,
    method_fit_args,
    no_dropout,
    run_gloo,
    step_trainer,
    text_batches,
    train_steps,
)
from test_balance_ogm import step_records

from avtrain.balance import distillation_losses, teacher_runs

CLASSES, BATCH = 3, 6
STEPS = ((0, 3), (1, 2))  # (epoch, steps); epoch 1 is after the window
END = 0  # last distilled epoch (BalanceMM: 80)
SCALING = 10.0  # BalanceMM's default
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the rule by hand ---------------------------------------------------------------------------


def test_distillation_loss_by_hand():
    # teacher [[1, 2], [3, 4]], student [[0, 2], [3, 6]]: differences 1, 0, 0, -2; squares
    # 1, 0, 0, 4; mean over the 2 x 2 elements 5/4. Its gradient w.r.t. the student is
    # 2 (s - t) / 4 = [[-0.5, 0], [0, 1]]; the teacher gets none.
    t = {"audio": torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)}
    s = {"audio": torch.tensor([[0.0, 2.0], [3.0, 6.0]], requires_grad=True)}
    loss = distillation_losses(t, s)["audio"]
    assert float(loss.detach()) == pytest.approx(1.25, abs=1e-7)
    loss.backward()
    assert s["audio"].grad.tolist() == [[-0.5, 0.0], [0.0, 1.0]]
    assert t["audio"].grad is None
    # two modalities, one sample of three features: visual teacher [0, 0, 3], student [1, 1, 1]
    # -> (1 + 1 + 4) / 3 = 2; audio equal -> 0
    t = {"audio": torch.ones(1, 3), "visual": torch.tensor([[0.0, 0.0, 3.0]])}
    s = {"audio": torch.ones(1, 3), "visual": torch.ones(1, 3)}
    got = distillation_losses(t, s)
    assert float(got["audio"]) == 0.0 and float(got["visual"]) == pytest.approx(2.0, abs=1e-7)


def test_step_loss_by_hand(tmp_path):
    # zero the fused layer: fused logits are 0, so CE = ln 3 = 1.0986123; the total is
    # ln 3 + 10 * (MSE_audio + MSE_visual), the MSEs of the real features.
    torch.manual_seed(0)
    runs = fake_teachers(tmp_path)
    t = trainer(runs)
    with torch.no_grad():
        t.model.fusion.fc_out.weight.zero_()
        t.model.fusion.fc_out.bias.zero_()
    batch = as_batch(make_batches(1, BATCH, 1, CLASSES)[0])
    t.model.train()
    with torch.no_grad():
        feats = copy.deepcopy(t.model).features(batch)
        want = {m: F.mse_loss(t.balancer.teachers[m].features(batch)[m], feats[m])
                for m in ("audio", "visual")}
    loss, _ = t.train_step(batch, 0)
    got = t.balancer.step_metrics()
    assert float(got["ce"]) == pytest.approx(1.0986123, abs=1e-6)
    for m in want:
        assert float(got[f"distill_{m}"]) == pytest.approx(float(want[m]), rel=1e-6)
    assert float(loss.detach()) == pytest.approx(1.0986123 + 10 * float(want["audio"] + want["visual"]),
                                        rel=1e-6)


def test_teacher_flags_parse():
    assert teacher_runs(("audio=/a/run", "visual= b=c ")) == {"audio": "/a/run",
                                                              "visual": "b=c"}
    assert teacher_runs({"audio": "x"}) == {"audio": "x"}
    assert teacher_runs(None) == {} and teacher_runs([]) == {}
    from avprep.errors import UserError

    with pytest.raises(UserError, match="expects MODALITY=RUN_DIR"):
        teacher_runs(["audio"])
    with pytest.raises(UserError, match="given twice"):
        teacher_runs(["audio=a", "audio=b"])


# --- teachers on disk (the checkpoint a finished unimodal run leaves) ----------------------------


def fake_teacher(run, modality, *, classes=CLASSES, model="tiny", dataset="synth", seed=None):
    """RUN/best.pt and RUN/summary.json of a single-modality tiny run (random weights)."""
    from avtrain.checkpoint import save_checkpoint
    from avtrain.models import build_model

    if seed is not None:
        torch.manual_seed(seed)
    net = build_model("tiny", "concat", classes, [modality])
    spec = {**net.spec, "model": model}
    os.makedirs(run, exist_ok=True)
    save_checkpoint(os.path.join(run, "best.pt"),
                    {"model": net.state_dict(), "spec": spec, "epoch": 0, "dataset": dataset,
                     "classes": [f"c{i}" for i in range(classes)], "config": {}})
    with open(os.path.join(run, "summary.json"), "w") as f:
        json.dump({"method": "none", "modalities": [modality]}, f)
    return str(run)


def fake_teachers(root, modalities=("audio", "visual")) -> list[str]:
    return [f"{m}={fake_teacher(os.path.join(root, m), m, seed=100 + i)}"
            for i, m in enumerate(modalities)]


def trainer(runs, fusion="concat", bn=True, mode="train", **extra):
    return step_trainer("unimodal_teacher", fusion, CLASSES, bn=bn, optimizer="sgd", lr=0.05,
                        unimodal_teacher_runs=runs, unimodal_teacher_mode=mode,
                        modulation_end=END, **extra)


# --- the reference ------------------------------------------------------------------------------


def ref_train(model, teachers, data, mode, steps=STEPS, scaling=SCALING):
    """UMT_trainer.training_step, step by step, on copies of our student and teachers."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    criterion, mse = nn.CrossEntropyLoss(), nn.MSELoss()
    for teacher in teachers.values():
        teacher.train(mode == "train")  # BalanceMM: never eval()
    records, params, step = [], [], 0
    model.train()
    for epoch, n_steps in steps:
        for _ in range(n_steps):
            batch = data[step]
            label = batch["label"]
            encoder_result = model.features(batch)  # BaseClassifierModel.forward
            out = model.fusion(encoder_result)
            loss = criterion(out, label)
            record = {}
            if 0 <= epoch <= END:
                for m, teacher in teachers.items():
                    with torch.no_grad():
                        out_unimodal = teacher.encoders[m](batch[m])
                    term = mse(out_unimodal, encoder_result[m])
                    record[m] = float(term.detach())
                    loss += scaling * term
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            record["loss"] = float(loss.detach())
            records.append(record)
            params.append({k: p.detach().clone() for k, p in model.named_parameters()})
            step += 1
    return records, params


def _compare(t, data, mode, steps=STEPS):
    ref = copy.deepcopy(t.model)
    for enc in ref.encoders.values():
        enc._forward_hooks.clear()  # the copy must not feed our balancer
    teachers = {m: copy.deepcopy(x) for m, x in t.balancer.teachers.items()}
    before = {m: copy.deepcopy(x.state_dict()) for m, x in t.balancer.teachers.items()}
    want_records, want_params = ref_train(ref, teachers, data, mode, steps)
    got_params, got_metrics, got_losses = train_steps(t, data, steps)
    for want, got, loss in zip(want_records, got_metrics, got_losses):
        assert loss == pytest.approx(want["loss"], rel=1e-6, abs=1e-6)
        for m in t.model.modalities:
            if m in want:
                assert got[f"distill_{m}"] == pytest.approx(want[m], rel=1e-6, abs=1e-7)
            else:
                assert f"distill_{m}" not in got  # outside the window: no teacher forward
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL)
    for m, teacher in t.balancer.teachers.items():  # frozen: no parameter moved
        assert all(not p.requires_grad for p in teacher.parameters())
        for name, p in teacher.named_parameters():
            assert torch.equal(p, before[m][name]), name
        if mode == "eval":  # running statistics untouched too
            for name, b in teacher.named_buffers():
                assert torch.equal(b, before[m][name]), name
    return got_metrics


@pytest.mark.parametrize("fusion,mode", [("concat", "train"), ("concat", "eval"),
                                         ("sum", "train")])
def test_steps_equal_the_released_step(tmp_path, fusion, mode):
    runs = fake_teachers(tmp_path)
    torch.manual_seed(0)
    t = trainer(runs, fusion, mode=mode)
    assert not any(k.startswith("teacher") for k in t.model.state_dict())
    n_opt = sum(p.numel() for g in t.optimizer.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in t.model.parameters())  # no teacher in the optimizer
    data = [as_batch(b) for b in make_batches(7, BATCH, sum(n for _, n in STEPS), CLASSES)]
    metrics = _compare(t, data, mode)
    assert all(m["distill_audio"] > 0 and m["distill_visual"] > 0 for m in metrics[:3])
    assert set(metrics[0]) == {"ce", "distill_audio", "distill_visual"}


def test_three_modalities_equal_the_reference(tmp_path):
    runs = fake_teachers(tmp_path, ("audio", "visual", "text"))
    torch.manual_seed(0)
    t = trainer(runs, "sum", modalities=["audio", "visual", "text"])
    for module in [t.model, *t.balancer.teachers.values()]:
        no_dropout(module)  # both runs see the same network
    data = text_batches(7, BATCH, 3, CLASSES)
    metrics = _compare(t, data, "train", ((0, 2), (1, 1)))
    assert metrics[0]["distill_text"] > 0


def _ddp_steps(rank: int, world: int, mode: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"umt-rank{rank}-") as root:
        runs = fake_teachers(root)  # seeded: the same weights on every rank
        torch.manual_seed(0)
        t = trainer(runs, bn=False, mode=mode)  # the teachers are loaded here
    if mode == "train":  # train-mode BatchNorm would see each rank's share of the batch
        for m, teacher in t.balancer.teachers.items():
            backbone = teacher.encoders[m].backbone
            for i, layer in enumerate(backbone):
                if isinstance(layer, nn.BatchNorm2d):
                    backbone[i] = nn.Identity()
    per = BATCH // world
    data = make_batches(7, BATCH, sum(n for _, n in STEPS), CLASSES)
    params, metrics, _ = train_steps(t, data, STEPS, slice(rank * per, (rank + 1) * per))
    return {"params": params[-1], "metrics": metrics}


def _ddp_run(rank: int, world: int) -> dict:
    return {mode: _ddp_steps(rank, world, mode) for mode in ("eval", "train")}


@pytest.mark.slow
def test_two_gloo_processes_equal_one_with_the_global_batch(tmp_path):
    # eval-mode teachers keep their BatchNorm (running statistics: per sample); train-mode
    # ones lose it here, as the student does (batch statistics differ per rank)
    ranks = run_gloo(_ddp_run, tmp_path)
    one = _ddp_run(0, 1)
    for mode in ("eval", "train"):
        assert all(m["distill_audio"] > 0 for m in one[mode]["metrics"][:3])
        assert_ranks_equal_one([r[mode] for r in ranks], one[mode])


# --- the real trainer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teachers(method_shards, tmp_path_factory):
    """Two tiny one-epoch single-modality runs, fitted with the CLI: the teachers."""
    from cli import avtrain

    root = tmp_path_factory.mktemp("umt-teachers")
    runs = {}
    for m in ("audio", "visual"):
        run = root / m
        out = CliRunner().invoke(avtrain, method_fit_args("none", method_shards, run, 1,
                                                          "--modalities", m))
        assert out.exit_code == 0, out.output
        assert (run / "summary.json").is_file() and (run / "best.pt").is_file()
        runs[m] = str(run)
    return runs


def fit_args(method_shards, teachers, run, epochs, *fixed, **extra):
    return method_fit_args("unimodal_teacher", method_shards, run, epochs,
                           *[a for m, path in teachers.items() for a in ("--teacher",
                                                                         f"{m}={path}")],
                           *fixed, **extra)


@pytest.mark.slow
def test_cli_one_epoch_on_synth_logs_the_signal(method_shards, teachers, tmp_path):
    from cli import avtrain

    run = tmp_path / "run"
    out = CliRunner().invoke(avtrain, fit_args(method_shards, teachers, run, 1))
    assert out.exit_code == 0, out.output
    steps = step_records(run)
    assert len(steps) == 3
    for r in steps:
        assert r["distill_audio"] > 0 and r["distill_visual"] > 0
        assert r["loss"] == pytest.approx(
            r["ce"] + 10 * (r["distill_audio"] + r["distill_visual"]), rel=1e-5)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "unimodal_teacher"
    from avtrain.report import balancing_keys, load_run

    assert "distill_audio" in balancing_keys(load_run(str(run)))  # drawn by `avtrain report`
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method_options"]["runs"] == [f"audio={teachers['audio']}",
                                               f"visual={teachers['visual']}"]
    from avtrain.checkpoint import load_checkpoint

    ckpt = load_checkpoint(str(run / "best.pt"))
    student = {k for k in ckpt["model"]}
    assert student and all(k.split(".")[0] in ("encoders", "fusion", "aux_heads")
                           for k in student)  # no teacher weights in the student's checkpoint
    assert set(ckpt["balancer"]["teachers"]) == {"audio", "visual"}
    ev = CliRunner().invoke(avtrain, ["eval", "--ckpt", str(run / "best.pt"), "--split", "val",
                                      "--workers", "0", "--device", "cpu", "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.output)["acc"] == pytest.approx(summary["val"]["acc"])


def test_resume_is_exact(method_shards, teachers, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    a, b = fit_and_resume(lambda run, epochs: fit_args(method_shards, teachers, run, epochs), full,
                          part)
    assert a["step"] == b["step"] == 9
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-6, atol=1e-7)
    assert a["balancer"] == b["balancer"]
    want = [r for r in step_records(full) if r["epoch"] == 2]
    got = [r for r in step_records(part) if r["epoch"] == 2]
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        for key in ("distill_audio", "distill_visual", "ce", "loss"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), key


def test_resume_with_a_changed_teacher_is_refused(method_shards, teachers, tmp_path):
    import shutil

    from cli import avtrain

    mine = {m: str(tmp_path / m) for m in teachers}
    for m, path in teachers.items():
        shutil.copytree(path, mine[m])
    run = tmp_path / "run"
    out = CliRunner().invoke(avtrain, fit_args(method_shards, mine, run, 1))
    assert out.exit_code == 0, out.output
    fake_teacher(mine["visual"], "visual", seed=5)  # other weights under the same path
    out = CliRunner().invoke(avtrain, ["fit", "--resume", str(run), "--epochs", "2"])
    assert out.exit_code != 0
    lines = [x for x in out.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "holds other weights than the teacher" in lines[0], out.output


def _bad(tmp_path, teachers):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "last.pt").write_bytes(b"")
    other = fake_teacher(tmp_path / "r18", "audio", model="resnet18")
    classes = fake_teacher(tmp_path / "c5", "audio", classes=5)
    dataset = fake_teacher(tmp_path / "ds", "audio", dataset="cremad")
    v = f"visual={teachers['visual']}"
    return [
        ([v], "missing --teacher audio=RUN_DIR"),
        ([f"audio={tmp_path / 'nowhere'}", v], "run directory not found"),
        ([f"audio={unfinished}", v], "is not a finished run (no summary.json or best.pt)"),
        ([f"audio={teachers['visual']}", v], "is a run on visual; a teacher is a single"),
        ([f"audio={other}", v], "has resnet18 encoders; this run's are tiny"),
        ([f"audio={classes}", v], "was trained for 5 classes; this run has 3"),
        ([f"audio={dataset}", v], "was trained on cremad; this run's shards are synth"),
        ([f"audio={teachers['audio']}", v, f"text={teachers['audio']}"],
         "--teacher text=...: this run's modalities are audio, visual"),
        (["audio", v], "--teacher expects MODALITY=RUN_DIR"),
    ]


def test_bad_teachers_are_one_error_line(method_shards, teachers, tmp_path):
    from cli import avtrain

    for i, (flags, words) in enumerate(_bad(tmp_path, teachers)):
        run = tmp_path / f"run{i}"
        args = method_fit_args("unimodal_teacher", method_shards, run, 1,
                               *[a for f in flags for a in ("--teacher", f)])
        assert_one_error_line(CliRunner().invoke(avtrain, args), words, run)


@pytest.mark.parametrize("settings,words", [
    ({"unimodal_teacher_scaling": -1}, "--unimodal-teacher-scaling must be 0 or more"),
])
def test_bad_input_is_one_error_line(method_shards, tmp_path, settings, words):
    """Its own rows; those of every method are test_contract.py's."""
    assert_fit_refused(method_shards, tmp_path / "run", "unimodal_teacher", settings, words)


def test_feature_size_and_sequence_models_are_refused(tmp_path):
    from avprep.errors import UserError
    from avtrain.balance import build_balancer
    from avtrain.balance.unimodal_teacher import load_teacher
    from avtrain.models import build_model

    run = fake_teacher(tmp_path / "a", "audio")
    student = build_model("tiny", "concat", CLASSES, ["audio", "visual"])
    student.encoders["audio"].out_dim = 99
    with pytest.raises(UserError, match="gives 64 features per clip; this run's audio encoder "
                                        "gives 99"):
        load_teacher("audio", run, student)
    inputs = {m: {"kind": "features", "dim": 8} for m in ("audio", "visual")}
    model = build_model("umt", "concat", CLASSES, ["audio", "visual"], inputs=inputs,
                        options={"d_model": 16, "heads": 2, "layers": 1, "ff": 16})
    with pytest.raises(UserError, match="not of the sequence model 'umt'"):
        build_balancer("unimodal_teacher", model, {"unimodal_teacher_runs": [f"audio={run}"]},
                       modalities=["audio", "visual"])


def test_teacher_with_another_method_is_one_error_line(method_shards, teachers, tmp_path):
    from cli import avtrain

    run = tmp_path / "run"
    args = method_fit_args("ogm_ge", method_shards, run, 1,
                           *[a for m, d in teachers.items() for a in ("--teacher", f"{m}={d}")])
    assert_one_error_line(CliRunner().invoke(avtrain, args),
                          "--teacher is an option of --method unimodal_teacher, not of --method "
                          "ogm_ge", run)
