"""MER-MULTI end to end with three modalities: a tiny MER 2023 tree (a real face looped into
clips, tones, a transcript CSV) -> manifest -> shards with faces, log-mel and `{key}.txt` ->
training on audio+visual+text (encoders+fusion and sequence transformers, OGM-GE and OLM);
feature shards -> k-fold cross-validation with mean ± std."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from mediagen import astronaut_path, ffmpeg

from avprep.datasets import scan_dataset
from avprep.features import import_features
from avprep.presets import get_preset
from avprep.shards import build_shards
from avtrain.folds import fold_of, make_folds, summarize_folds
from avtrain.loop import fit
from cli import avtrain

EMOTIONS = ["neutral", "happy", "sad"]
TONES = {"neutral": 300, "happy": 700, "sad": 180}
WORDS = {"neutral": "the bus leaves at nine", "happy": "this is wonderful news",
         "sad": "I miss her so much"}
TINY_SEQ = ["--model-option", "d_model=16", "--model-option", "heads=2", "--model-option",
            "layers=1", "--model-option", "bottleneck=2", "--model-option", "ff=32",
            "--model-option", "text_dim=8", "--model-option", "text_layers=1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def mer_root(tmp_path_factory) -> Path:
    """12 clips (3 emotions x 4), 1 s each: the astronaut's face and a tone per emotion;
    9 labelled in train-label.csv, 3 in test-label.csv; English transcripts, plus one line
    for a clip nobody labelled."""
    root = tmp_path_factory.mktemp("mer") / "mer2023"
    (root / "video").mkdir(parents=True)
    sources = {}
    for emo, tone in TONES.items():
        sources[emo] = root / f"{emo}.mp4"
        ffmpeg("-loop", "1", "-i", str(astronaut_path()), "-f", "lavfi", "-i",
               f"sine=frequency={tone}:sample_rate=16000:duration=1", "-t", "1", "-r", "4",
               "-vf", "scale=160:160", "-c:v", "libx264", "-preset", "ultrafast",
               "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(sources[emo]))
    train, test, texts = [], [], []
    for i in range(12):
        name, emo = f"sample_{i:08d}", EMOTIONS[i % 3]
        shutil.copy(sources[emo], root / "video" / f"{name}.mp4")
        (test if i >= 9 else train).append(f"{name},{emo},{(i % 3) - 1:.1f}")
        texts.append(f'{name},"{WORDS[emo]}"')
    for emo in TONES:
        os.remove(sources[emo])
    (root / "train-label.csv").write_text("name,discrete,valence\n" + "\n".join(train) + "\n")
    (root / "test-label.csv").write_text("name,discrete,valence\n" + "\n".join(test) + "\n")
    texts.append("sample_99999999,nobody labelled me")
    (root / "transcription.csv").write_text("name,sentence\n" + "\n".join(texts) + "\n")
    return root


@pytest.fixture(scope="module")
def mer_scan(mer_root):
    return scan_dataset("mer", mer_root, val_fraction=0.3)


@pytest.fixture(scope="module")
def mer_shards(mer_scan, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mer_shards")
    build_shards(mer_scan.records, str(out), get_preset("mer"), classes=mer_scan.classes,
                 dataset="mer", shard_size=4, workers=2)
    return out


@pytest.fixture(scope="module")
def feature_shards(mer_scan, tmp_path_factory) -> Path:
    """Per-clip features the way users bring them (named by MER clip name), with a class
    signal in audio: 16-d audio, 8-d visual, 12-d text, lengths varying by clip."""
    rng = np.random.default_rng(0)
    base = tmp_path_factory.mktemp("mer_features")
    dims = {"audio": 16, "visual": 8, "text": 12}
    for m, dim in dims.items():
        (base / m).mkdir()
        for r in mer_scan.records:
            x = rng.standard_normal((3 + hash(r.key) % 5, dim)).astype(np.float32)
            if m == "audio":
                x[:, r.label_id] += 3.0
            np.save(base / m / f"{r.extra['clip']}.npy", x)
    out = base / "shards"
    import_features(mer_scan.records, {m: str(base / m) for m in dims}, str(out),
                    classes=mer_scan.classes, dataset="mer", shard_size=3, workers=1)
    return out


def test_manifest_carries_transcripts_valence_and_folds(mer_scan):
    records = {r.key: r for r in mer_scan.records}
    assert len(records) == 12
    r = records["sample_00000004"]
    assert r.label == "happy" and r.extra["valence"] == 0.0
    assert r.extra["transcript"] == WORDS["happy"] and 0 <= r.extra["fold"] < 5
    assert {r.split for r in records.values() if int(r.key[-2:]) >= 9} == {"test"}
    assert any("1 transcript(s) name clips without a label" in n and "sample_99999999" in n
               for n in mer_scan.notes)


@pytest.mark.slow
def test_raw_mer_shards_hold_three_modalities(mer_shards):
    index = json.loads((mer_shards / "index.json").read_text())
    assert index["modalities"] == ["audio", "visual", "text"]
    assert index["failures"] == 0
    with tarfile.open(next(mer_shards.glob("train-*.tar"))) as tar:
        names = tar.getnames()
        key = names[0].split(".")[0]
        members = {n.split(".", 1)[1]: tar.extractfile(n).read() for n in names
                   if n.startswith(key + ".")}
    import cv2

    face = cv2.imdecode(np.frombuffer(members["f000.jpg"], np.uint8), cv2.IMREAD_COLOR)
    assert face.shape == (112, 112, 3)
    spec = np.load(__import__("io").BytesIO(members["spec.npy"]), allow_pickle=False)
    assert spec.shape == (128, 800)
    meta = json.loads(members["json"])
    assert meta["face_ratio"] > 0.5 and "valence" in meta["extra"]
    assert members["txt"].decode() == WORDS[meta["label"]]


@pytest.mark.parametrize("model, method", [("tiny", "ogm_ge"), ("ca", "olm")])
def test_train_three_modalities_on_raw_mer(mer_shards, tmp_path, model, method):
    config = {"shards": str(mer_shards), "run_dir": str(tmp_path / "run"), "model": model,
              "fusion": "concat", "method": method, "modalities": ["audio", "visual", "text"],
              "epochs": 1, "batch_size": 2, "image_size": 32, "frames": 2, "workers": 0,
              "optimizer": "adam", "device": "cpu", "progress": False, "tensorboard": False,
              "log_every": 1}
    if method == "ogm_ge":
        config["modulate"] = "encoder"
    if model == "ca":
        config["model_options"] = {"d_model": 16, "heads": 2, "layers": 1, "ff": 32,
                                   "text_dim": 8, "text_layers": 1, "patch": 40}
    summary = fit(config)
    for split in ("val", "test"):
        metrics = summary[split]
        assert {"acc", "acc_audio", "acc_visual", "acc_text", "macro_f1",
                "weighted_f1"} <= set(metrics)
        assert metrics["n"] == (3 if split == "test" else json.loads(
            (mer_shards / "index.json").read_text())["splits"]["val"]["samples"])
    steps = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()
             if '"kind": "step"' in line]
    assert steps  # the balancer's per-step signal was logged for three modalities
    keys = set().union(*steps)
    if method == "ogm_ge":
        assert {"coeff_audio", "coeff_visual", "coeff_text"} <= keys
    else:
        assert {"w_audio", "w_visual", "w_text", "w_fused"} <= keys


def test_folds_partition_train_and_val(feature_shards, tmp_path):
    folders = make_folds(str(feature_shards), 3, str(tmp_path / "folds"))
    index = json.loads((feature_shards / "index.json").read_text())
    pool = index["splits"]["train"]["samples"] + index["splits"]["val"]["samples"]

    def keys(folder, split):
        out = set()
        for name in sorted(os.listdir(folder)):
            if name.startswith(split) and name.endswith(".tar"):
                with tarfile.open(os.path.join(folder, name)) as tar:
                    out |= {n.split(".")[0] for n in tar.getnames()}
        return out

    vals = [keys(f, "val") for f in folders]
    assert sum(len(v) for v in vals) == pool and len(set().union(*vals)) == pool
    for i, f in enumerate(folders):
        assert keys(f, "train") == set().union(*vals) - vals[i]
        assert len(keys(f, "test")) == 3
        fold_index = json.loads(Path(f, "index.json").read_text())
        assert fold_index["splits"]["val"]["samples"] == len(vals[i])
        assert fold_index["features"] == index["features"] and fold_index["cv"]["fold"] == i
    # the same call again reuses the folds; MER's own fold is used when k = 5
    assert make_folds(str(feature_shards), 3, str(tmp_path / "folds")) == folders
    assert fold_of("x", {"extra": {"fold": 3}}, 5) == 3
    assert fold_of("x", {"extra": {"fold": 3}}, 3) == fold_of("x", {}, 3)


@pytest.mark.slow
def test_cross_validation_cli_reports_mean_and_std(feature_shards, tmp_path):
    run = tmp_path / "cv"
    args = ["fit", "--shards", str(feature_shards), "--run-dir", str(run), "--model", "emt",
            *TINY_SEQ, "--modalities", "audio,visual,text", "--method", "ogm_ge",
            "--modulate", "encoder", "--folds", "3", "--epochs", "2", "--batch-size", "2",
            "--workers", "0", "--optimizer", "adam", "--lr", "0.003", "--device", "cpu",
            "--no-progress"]
    result = CliRunner().invoke(avtrain, args)
    assert result.exit_code == 0, result.output
    cv = json.loads((run / "cv.json").read_text())
    assert cv["k"] == 3 and len(cv["folds"]) == 3
    accs = [f["val"]["acc"] for f in cv["folds"]]
    stats = cv["stats"]["val"]["acc"]
    assert stats["values"] == accs
    assert stats["mean"] == pytest.approx(np.mean(accs))
    assert stats["std"] == pytest.approx(np.std(accs))
    assert {"acc_text", "weighted_f1"} <= set(cv["stats"]["test"])
    assert "| acc |" in result.output and "±" in (run / "cv.md").read_text()
    # rerunning finishes nothing twice: every fold's summary is reused
    stamps = [os.path.getmtime(run / f"fold{i}" / "summary.json") for i in range(3)]
    again = CliRunner().invoke(avtrain, args)
    assert again.exit_code == 0, again.output
    assert stamps == [os.path.getmtime(run / f"fold{i}" / "summary.json") for i in range(3)]
    assert json.loads((run / "cv.json").read_text())["stats"] == cv["stats"]
    # the report takes the k-fold run directory as its folds, with the mean ± std table
    out = CliRunner().invoke(avtrain, ["report", str(run), "-o", str(tmp_path / "report")])
    assert out.exit_code == 0 and "3 runs" in out.output, out.output
    report = (tmp_path / "report" / "report.md").read_text()
    assert all(f"| fold{i} |" in report for i in range(3))
    assert "## Cross-validation" in report and (run / "cv.md").read_text().strip() in report


def test_summarize_folds_by_hand():
    results = [{"val": {"acc": 0.5, "weighted_f1": 0.4, "n": 3}, "test": None},
               {"val": {"acc": 1.0, "weighted_f1": 0.8, "n": 3}, "test": None}]
    stats = summarize_folds(results)
    assert stats["val"]["acc"] == {"mean": 0.75, "std": 0.25, "values": [0.5, 1.0]}
    assert stats["val"]["weighted_f1"]["mean"] == pytest.approx(0.6)
    assert "n" not in stats["val"] and "test" not in stats


def test_bad_cross_validation_input(feature_shards, tmp_path):
    runner = CliRunner()
    base = ["fit", "--shards", str(feature_shards), "--run-dir", str(tmp_path / "r"),
            "--model", "emt", "--modalities", "audio,visual", "--workers", "0"]
    out = runner.invoke(avtrain, base + ["--folds", "1"])
    assert out.exit_code == 2 and "--folds must be at least 2" in out.output
    out = runner.invoke(avtrain, base + ["--folds", "40"])
    assert out.exit_code == 2 and "use fewer --folds" in out.output
    out = runner.invoke(avtrain, base + ["--model-option", "depth=3"])
    assert out.exit_code == 2 and "unknown --model-option 'depth'" in out.output
    out = runner.invoke(avtrain, base[:7] + ["--modalities", "audio,face", "--batch-size", "2"])
    assert out.exit_code == 2 and "no 'face' modality" in out.output
