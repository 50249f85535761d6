"""Dataset adapters on fixture trees in each dataset's real layout, with tiny real media."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from mediagen import make_video, make_wav

from avprep.datasets import available, dataset_defaults, load_dataset, scan_dataset
from avprep.errors import UserError
from avprep.manifest import read_manifest
from cli import avprep


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """One real mp4, flv and wav; trees get copies under the names each dataset uses."""
    d = tmp_path_factory.mktemp("clips")
    return {
        "mp4": make_video(d / "c.mp4", seconds=1.0, size=(160, 120), fps=25),
        "flv": make_video(d / "c.flv", seconds=1.0, size=(160, 120), fps=30, vcodec="flv",
                          acodec="libmp3lame"),
        "wav": make_wav(d / "c.wav", seconds=1.0, rate=16000),
    }


def put(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def by_key(manifest):
    return {r.key: r for r in manifest.records}


# --- CREMA-D ---------------------------------------------------------------------------------

EMOTIONS = ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
# The released ids (OGM-GE dataset/CramedDataset.py, OLM datasets/cremad_dataset.py)
RELEASED_CREMAD = {"NEU": 0, "HAP": 1, "SAD": 2, "FEA": 3, "DIS": 4, "ANG": 5}


@pytest.fixture()
def cremad_root(tmp_path, clips):
    root = tmp_path / "CREMA-D"
    for actor in range(1001, 1031):
        for i, emo in enumerate(EMOTIONS):
            sentence = ("DFA", "IEO")[i % 2]
            stem = f"{actor}_{sentence}_{emo}_XX"
            put(clips["flv"], root / "VideoFlash" / f"{stem}.flv")
            put(clips["wav"], root / "AudioWAV" / f"{stem}.wav")
    put(clips["flv"], root / "VideoFlash" / "README.flv")  # not a CREMA-D name
    return root


def test_cremad_records_labels_and_speaker_independent_split(cremad_root):
    m = load_dataset("cremad", cremad_root)
    assert len(m.records) == 30 * 6
    assert m.classes == sorted(RELEASED_CREMAD, key=RELEASED_CREMAD.get)
    r = by_key(m)["1001_DFA_ANG_XX"]
    assert (r.label, r.label_id) == ("ANG", 5)
    assert r.video == str(cremad_root / "VideoFlash" / "1001_DFA_ANG_XX.flv")
    assert r.audio == str(cremad_root / "AudioWAV" / "1001_DFA_ANG_XX.wav")
    assert r.extra["actor"] == "1001"
    assert all(rec.label_id == RELEASED_CREMAD[rec.label] for rec in m.records)
    splits_of_actor = defaultdict(set)
    for rec in m.records:
        splits_of_actor[rec.extra["actor"]].add(rec.split)
    assert all(len(s) == 1 for s in splits_of_actor.values()), "a speaker spans two splits"
    assert {rec.split for rec in m.records} == {"train", "val", "test"}
    # deterministic: the same root gives the same split
    assert [(x.key, x.split) for x in load_dataset("cremad", cremad_root).records] == \
           [(x.key, x.split) for x in m.records]


def test_cremad_unlisted_and_wrong_root(cremad_root):
    scan = scan_dataset("cremad", cremad_root)
    assert scan.unlisted == [str(cremad_root / "VideoFlash" / "README.flv")]
    with pytest.raises(UserError, match=r"AudioWAV folder itself.*CREMA-D"):
        load_dataset("cremad", cremad_root / "AudioWAV")
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("cremad", cremad_root / "nope")


def test_cremad_label_not_in_class_list(cremad_root, clips):
    put(clips["flv"], cremad_root / "VideoFlash" / "1002_DFA_XYZ_XX.flv")
    with pytest.raises(UserError, match=r"label 'XYZ' .*1002_DFA_XYZ_XX.*cremad class list"):
        load_dataset("cremad", cremad_root)


def test_cremad_split_file_reproduces_list_and_carves_val(cremad_root, tmp_path):
    stems = sorted(p.stem for p in (cremad_root / "VideoFlash").glob("1*.flv"))
    train, test = stems[:150], stems[150:170]  # 10 clips listed nowhere
    (tmp_path / "train.csv").write_text("".join(f"{s},{s.split('_')[2]}\n" for s in train))
    (tmp_path / "test.csv").write_text("".join(f"{s},{s.split('_')[2]}\n" for s in test)
                                       + "1099_DFA_ANG_XX,ANG\n")  # listed, not on disk
    scan = scan_dataset("cremad", cremad_root, split_file=[tmp_path / "train.csv",
                                                           tmp_path / "test.csv"],
                        val_fraction=0.2)
    got = {r.key: r.split for r in scan.records}
    assert {k for k, s in got.items() if s == "test"} == set(test)
    assert {k for k, s in got.items() if s in ("train", "val")} == set(train)
    val_actors = {r.extra["actor"] for r in scan.records if r.split == "val"}
    train_actors = {r.extra["actor"] for r in scan.records if r.split == "train"}
    assert val_actors and not val_actors & train_actors  # carved by actor
    assert scan.dropped_by_split_file == 10
    assert [r.extra["clip"] for r in scan.missing] == ["1099_DFA_ANG_XX"]


def test_seed_extracted_frames_and_audio_are_reused(cremad_root, tmp_path, clips):
    frames = tmp_path / "Image-01-FPS"
    (frames / "1001_DFA_ANG_XX").mkdir(parents=True)
    (frames / "1001_DFA_ANG_XX" / "00000.jpg").write_bytes(b"\xff\xd8jpeg")
    (frames / "1003_IEO_DIS_XX").mkdir()
    (frames / "1003_IEO_DIS_XX" / "00000.jpg").write_bytes(b"\xff\xd8jpeg")
    wavs = tmp_path / "audio"
    put(clips["wav"], wavs / "1001_DFA_ANG_XX.wav")
    (cremad_root / "VideoFlash" / "1003_IEO_DIS_XX.flv").unlink()  # only its frames remain
    m = load_dataset("cremad", cremad_root, frames_dir=frames, audio_dir=wavs)
    recs = by_key(m)
    assert recs["1001_DFA_ANG_XX"].extra["frames_dir"] == str(frames / "1001_DFA_ANG_XX")
    assert recs["1001_DFA_ANG_XX"].audio == str(wavs / "1001_DFA_ANG_XX.wav")
    assert recs["1003_IEO_DIS_XX"].video is None
    assert recs["1003_IEO_DIS_XX"].extra["frames_dir"] == str(frames / "1003_IEO_DIS_XX")
    assert "frames_dir" not in recs["1002_DFA_ANG_XX"].extra
    assert len(m.records) == 180


# --- AVE -------------------------------------------------------------------------------------

AVE_HEADER = "Category&VideoID&Quality&StartTime&EndTime\n"


@pytest.fixture()
def ave_root(tmp_path, clips):
    root = tmp_path / "AVE_Dataset"
    for vid in ("-abcDEF12_x", "vid0000001", "vid0000002", "vid0000003", "vid0000004"):
        put(clips["mp4"], root / "AVE" / f"{vid}.mp4")
    put(clips["mp4"], root / "AVE" / "extra_clip.mp4")
    train = [
        "Church bell&-abcDEF12_x&good&0&4",
        "Male speech, man speaking&-abcDEF12_x&good&5&10",  # same video, second event
        "Church bell&-abcDEF12_x&good&0&4",  # exact repeat
        "Bark&vid0000001&good&2&8",
        "Goat&vid_missing&good&0&10",  # listed, not on disk
    ]
    val = ["Banjo&vid0000002&bad&0&10"]
    test = ["Cat&vid0000003&good&1&9", "Horse&vid0000004&good&0&10"]
    for name, lines in (("trainSet.txt", train), ("valSet.txt", val), ("testSet.txt", test)):
        (root / name).write_text(AVE_HEADER + "\n".join(lines) + "\n")
    (root / "Annotations.txt").write_text(AVE_HEADER + "\n".join(train + val + test) + "\n")
    return root


def test_ave_segments_duplicated_ids_and_splits(ave_root):
    scan = scan_dataset("ave", ave_root)
    m = scan.manifest
    assert len(m.classes) == 28
    recs = by_key(m)
    assert set(recs) == {"-abcDEF12_x_0_4", "-abcDEF12_x_5_10", "vid0000001_2_8",
                         "vid0000002_0_10", "vid0000003_1_9", "vid0000004_0_10"}
    a, b = recs["-abcDEF12_x_0_4"], recs["-abcDEF12_x_5_10"]
    assert (a.label, a.start, a.end, a.split) == ("Church bell", 0.0, 4.0, "train")
    assert (b.label, b.start, b.end) == ("Male speech, man speaking", 5.0, 10.0)
    assert b.label_id == m.classes.index("Male speech, man speaking")
    assert a.video == b.video == str(ave_root / "AVE" / "-abcDEF12_x.mp4")
    assert recs["vid0000002_0_10"].split == "val"
    assert {recs["vid0000003_1_9"].split, recs["vid0000004_0_10"].split} == {"test"}
    assert [r.extra["clip"] for r in scan.missing] == ["vid_missing"]
    assert scan.unlisted == [str(ave_root / "AVE" / "extra_clip.mp4")]
    assert any("repeated" in n for n in scan.notes)


def test_ave_annotations_only_root_in_parent_folder(ave_root, tmp_path):
    for name in ("trainSet.txt", "valSet.txt", "testSet.txt"):
        (ave_root / name).unlink()
    m = load_dataset("ave", ave_root.parent)  # files one folder down are found
    assert len(m.records) == 6
    assert {r.split for r in m.records} <= {"train", "val", "test"}


# The 28 categories exactly as AVE's Annotations.txt spells them, in Annotations.txt's order
# (Tian et al., ECCV 2018); a name that differs by a word makes every such line an error.
AVE_CATEGORIES = [
    "Church bell", "Male speech, man speaking", "Bark", "Fixed-wing aircraft, airplane",
    "Race car, auto racing", "Female speech, woman speaking", "Helicopter", "Violin, fiddle",
    "Flute", "Ukulele", "Frying (food)", "Truck", "Shofar", "Motorcycle", "Acoustic guitar",
    "Train horn", "Clock", "Banjo", "Goat", "Baby cry, infant cry", "Bus", "Chainsaw", "Cat",
    "Horse", "Toilet flush", "Rodents, rats, mice", "Accordion", "Mandolin",
]


# OLM's data/AVE/stat.txt, in its order: the released loader (OLM datasets/avedataset.py, as
# OGM-GE dataset/dataset.py) numbers classes by their index in sorted(these names).
AVE_STAT_TXT = [
    "Violin-fiddle", "Female_speech-woman_speaking", "Toilet_flush", "Baby_cry-infant_cry",
    "Bark", "Church_bell", "Race_car-auto_racing", "Male_speech-man_speaking", "Horse",
    "Train_horn", "Acoustic_guitar", "Fixed-wing_aircraft-airplane", "Accordion", "Truck",
    "Goat", "Clock", "Cat", "Chainsaw", "Motorcycle", "Mandolin", "Ukulele", "Helicopter",
    "Frying_(food)", "Rodents-rats-mice", "Shofar", "Bus", "Banjo", "Flute",
]


def test_ave_reads_every_official_category_with_the_released_ids(tmp_path, clips):
    root = tmp_path / "AVE_Dataset"
    lines = []
    for i, category in enumerate(AVE_CATEGORIES):
        put(clips["mp4"], root / "AVE" / f"vid{i:07d}.mp4")
        lines.append(f"{category}&vid{i:07d}&good&0&10")
    (root / "Annotations.txt").write_text(AVE_HEADER + "\n".join(lines) + "\n")
    released = sorted(AVE_STAT_TXT)
    for name in ("ave", "ave_olm"):
        loaded = load_dataset(name, root)
        assert sorted(loaded.classes) == sorted(AVE_CATEGORIES)
        by_video = {r.extra["video_id"]: r for r in loaded.records}
        for i, category in enumerate(AVE_CATEGORIES):
            stat_name = category.replace(", ", "-").replace(" ", "_")
            assert by_video[f"vid{i:07d}"].label_id == released.index(stat_name), category


def test_ave_malformed_line_and_unknown_category(ave_root):
    (ave_root / "valSet.txt").write_text(AVE_HEADER + "Banjo&vid0000002&bad&0\n")
    with pytest.raises(UserError, match=r"valSet.txt:2: expected Category&VideoID"):
        load_dataset("ave", ave_root)
    (ave_root / "valSet.txt").write_text(AVE_HEADER + "Kazoo&vid0000002&bad&0&10\n")
    with pytest.raises(UserError, match=r"valSet.txt:2: label 'Kazoo'"):
        load_dataset("ave", ave_root)
    (ave_root / "valSet.txt").write_text(AVE_HEADER + "Banjo&vid0000002&bad&0&x\n")
    with pytest.raises(UserError, match=r"valSet.txt:2: StartTime/EndTime must be numbers"):
        load_dataset("ave", ave_root)


# --- VGGSound --------------------------------------------------------------------------------


@pytest.fixture()
def vgg_root(tmp_path, clips):
    root = tmp_path / "vggsound"
    put(clips["mp4"], root / "video" / "-0aBc_d1234_000030.mp4")
    put(clips["mp4"], root / "video" / "zzzzzzzzzz1_5.mp4")  # unpadded start
    put(clips["mp4"], root / "full" / "fullvideo01.mp4")  # the whole video
    put(clips["mp4"], root / "video" / "yyyyyyyyyy1_000000.mp4")
    put(clips["mp4"], root / "video" / "notlisted01_000010.mp4")
    (root / "vggsound.csv").write_text(
        '-0aBc_d1234,30,"people marching, drumming",train\n'
        "zzzzzzzzzz1,5,dog barking,train\n"
        "fullvideo01,20,dog barking,test\n"
        "yyyyyyyyyy1,0,\"people marching, drumming\",test\n"
        "missing0001,40,dog barking,train\n")
    return root


def test_vggsound_csv_quoted_labels_names_and_missing(vgg_root):
    scan = scan_dataset("vggsound", vgg_root)
    m = scan.manifest
    # the released order: each class where its first train row is ("people marching" first)
    assert m.classes == ["people marching, drumming", "dog barking"]
    recs = by_key(m)
    assert set(recs) == {"-0aBc_d1234_000030", "zzzzzzzzzz1_000005", "fullvideo01_000020",
                         "yyyyyyyyyy1_000000"}
    r = recs["-0aBc_d1234_000030"]
    assert (r.label, r.label_id) == ("people marching, drumming", 0)
    assert recs["fullvideo01_000020"].label_id == 1
    assert r.start is None and r.video.endswith("-0aBc_d1234_000030.mp4")
    assert recs["zzzzzzzzzz1_000005"].video.endswith("zzzzzzzzzz1_5.mp4")
    full = recs["fullvideo01_000020"]
    assert (full.start, full.end, full.split) == (20.0, 30.0, "test")
    assert [x.extra["clip"] for x in scan.missing] == ["missing0001_000040"]
    assert scan.unlisted == [str(vgg_root / "video" / "notlisted01_000010.mp4")]


def test_vggsound_class_ids_follow_first_train_rows(tmp_path, clips):
    # OGM-GE dataset/VGGSoundDataset.py: train_class.append(label) at its first train row
    root = tmp_path / "vgg"
    put(clips["mp4"], root / "b0000000001_000000.mp4")
    (root / "vggsound.csv").write_text("a0000000001,0,cat,test\nb0000000001,0,dog,train\n"
                                       "c0000000001,0,cat,train\nd0000000001,0,owl,test\n"
                                       "e0000000001,0,dog,train\n")
    scan = scan_dataset("vggsound", root)
    assert scan.classes == ["dog", "cat", "owl"]  # a test-only label comes after
    assert by_key(scan.manifest)["b0000000001_000000"].label_id == 0
    (root / "classes.txt").write_text("owl\ncat\ndog\n")
    pinned = scan_dataset("vggsound", root, classes_file=str(root / "classes.txt"))
    assert by_key(pinned.manifest)["b0000000001_000000"].label_id == 2


def test_vggsound_val_carved_from_train_by_video(vgg_root):
    m = load_dataset("vggsound", vgg_root, val_fraction=0.3)
    splits = {r.key: r.split for r in m.records}
    # hash of the YouTube id: 0.06 for zzzzzzzzzz1 (< 0.3: val), 0.45 for -0aBc_d1234
    assert splits["zzzzzzzzzz1_000005"] == "val"
    assert splits["-0aBc_d1234_000030"] == "train"
    assert splits["fullvideo01_000020"] == "test"  # test rows stay test
    assert {r.split for r in load_dataset("vggsound", vgg_root, val_fraction=0.0).records} \
        == {"train", "test"}


def test_vggsound_bad_csv(vgg_root):
    (vgg_root / "vggsound.csv").write_text("abc,30,people marching, drumming,train\n")
    with pytest.raises(UserError, match=r"vggsound.csv:1: expected 4 CSV fields"):
        load_dataset("vggsound", vgg_root)
    (vgg_root / "vggsound.csv").write_text("abc,30,dog,holdout\n")
    with pytest.raises(UserError, match=r"vggsound.csv:1: split must be train or test"):
        load_dataset("vggsound", vgg_root)
    (vgg_root / "vggsound.csv").unlink()
    with pytest.raises(UserError, match=r"vggsound.csv not found"):
        load_dataset("vggsound", vgg_root)


# --- Kinetics-Sounds -------------------------------------------------------------------------


def test_kinetics_sounds_class_folders(tmp_path, clips):
    root = tmp_path / "ks"
    for split, label, name in (("train", "playing drums", "aaa"), ("train", "playing drums", "b"),
                               ("train", "blowing nose", "c"), ("test", "blowing nose", "d"),
                               ("val", "playing drums", "e")):
        put(clips["mp4"], root / split / label / f"{name}.mp4")
    m = load_dataset("kinetics_sounds", root)
    assert m.classes == ["blowing nose", "playing drums"]
    got = {r.extra["clip"]: (r.split, r.label, r.label_id) for r in m.records}
    assert got == {"aaa": ("train", "playing drums", 1), "b": ("train", "playing drums", 1),
                   "c": ("train", "blowing nose", 0), "d": ("test", "blowing nose", 0),
                   "e": ("val", "playing drums", 1)}


def test_kinetics_sounds_split_lists_with_class_indexes(tmp_path, clips):
    root = tmp_path / "ks"
    for name in ("clipA", "clipB", "clipC", "clipD", "stray"):
        put(clips["mp4"], root / "videos" / f"{name}.mp4")
    (root / "class.txt").write_text("playing bagpipes,playing drums,singing\n")
    (root / "my_train.txt").write_text("clipA,x,0\nclipB,x,2\nclipGone,x,1\n")
    (root / "my_test.txt").write_text("clipC.mp4,x,1\nvideos/clipD.mp4,x,2\n")
    scan = scan_dataset("kinetics_sounds", root, val_fraction=0.0)
    got = {r.key: (r.split, r.label) for r in scan.records}
    assert got == {"clipA": ("train", "playing bagpipes"), "clipB": ("train", "singing"),
                   "clipC": ("test", "playing drums"), "clipD": ("test", "singing")}
    assert scan.classes == ["playing bagpipes", "playing drums", "singing"]
    assert [r.key for r in scan.missing] == ["clipGone"]
    assert scan.unlisted == [str(root / "videos" / "stray.mp4")]
    (root / "class.txt").unlink()
    with pytest.raises(UserError, match=r"my_train.txt:1: the list gives class indexes"):
        load_dataset("kinetics_sounds", root)


# --- MER-MULTI -------------------------------------------------------------------------------


@pytest.fixture()
def mer_root(tmp_path, clips):
    root = tmp_path / "mer2023"
    names = [f"sample_{i:08d}" for i in range(1, 13)]
    for name in names[:11]:  # the last one is missing
        put(clips["mp4"], root / "video" / f"{name}.mp4")
    emotions = ["neutral", "angry", "happy", "sad", "worried", "surprise"]
    rows = [f"{n},{emotions[i % 6]},{(i - 6) / 2:.1f}" for i, n in enumerate(names)]
    (root / "train-label.csv").write_text("name,discrete,valence\n" + "\n".join(rows) + "\n")
    (root / "transcription.csv").write_text("name,chinese,english\n"
                                            f"{names[0]},你好,hello there\n")
    return root


def test_mer_label_csv(mer_root):
    scan = scan_dataset("mer", mer_root)
    m = scan.manifest
    assert m.classes == ["neutral", "angry", "happy", "sad", "worried", "surprise"]
    assert len(m.records) == 11 and [r.key for r in scan.missing] == ["sample_00000012"]
    r = by_key(m)["sample_00000002"]
    assert (r.label, r.label_id, r.extra["valence"]) == ("angry", 1, -2.5)
    assert by_key(m)["sample_00000001"].extra["transcript"] == "hello there"
    assert all(0 <= x.extra["fold"] < 5 for x in m.records)
    assert {x.split for x in m.records} <= {"train", "val", "test"}


def test_mer_npz_needs_trust_for_pickle(mer_root):
    (mer_root / "train-label.csv").unlink()
    corpus = {f"sample_{i:08d}": {"emo": "happy" if i % 2 else "sad", "val": 1.0}
              for i in range(1, 12)}
    np.savez(mer_root / "label-6way.npz", train_corpus=np.array(corpus, dtype=object))
    with pytest.raises(UserError, match=r"pickled Python objects.*--trust-pickle"):
        load_dataset("mer", mer_root)
    m = load_dataset("mer", mer_root, trust_pickle=True)
    assert len(m.records) == 11
    assert by_key(m)["sample_00000001"].label == "happy"
    assert by_key(m)["sample_00000002"].label_id == 3  # sad


def test_mer_bad_label_files(mer_root):
    (mer_root / "train-label.csv").write_text("name,discrete,valence\nsample_00000001,bored,0\n")
    with pytest.raises(UserError, match=r"train-label.csv:2: label 'bored'"):
        load_dataset("mer", mer_root)
    (mer_root / "train-label.csv").write_text("sample_00000001,happy,0\n")
    with pytest.raises(UserError, match=r"expected a header line name,discrete,valence"):
        load_dataset("mer", mer_root)


# --- folder, synth, registry, CLI ------------------------------------------------------------


def test_folder_adapter(tmp_path, clips):
    root = tmp_path / "mine"
    for label, name in (("cat", "a.mp4"), ("cat", "b c.mkv"), ("dog", "a.mp4"), ("dog", "x.flv")):
        put(clips["mp4"], root / label / name)
    (root / "dog" / "notes.txt").write_text("not a video")
    put(clips["mp4"], root / "loose.mp4")
    scan = scan_dataset("folder", root)
    assert scan.classes == ["cat", "dog"]
    got = {r.key: r.label for r in scan.records}
    assert got == {"cat_a": "cat", "cat_b_c": "cat", "dog_a": "dog", "dog_x": "dog"}
    assert sorted(scan.unlisted) == [str(root / "dog" / "notes.txt"), str(root / "loose.mp4")]
    with pytest.raises(UserError, match="no videos found"):
        load_dataset("folder", root / "dog")


def test_synth_adapter(synth_dir):
    m = load_dataset("synth", synth_dir)
    original = read_manifest(synth_dir / "manifest.jsonl")
    assert m.classes == original.classes
    assert {(r.key, r.split, r.label_id) for r in m.records} == \
           {(r.key, r.split, r.label_id) for r in original.records}
    with pytest.raises(UserError, match="no manifest.jsonl"):
        load_dataset("synth", synth_dir / "videos")


def test_registry_and_defaults():
    assert set(available()) == {"cremad", "ave", "ave_olm", "vggsound", "kinetics_sounds", "mer",
                                "folder", "synth"}
    assert dataset_defaults("ks")["name"] == "kinetics_sounds"
    with pytest.raises(UserError, match=r"unknown dataset 'imagenet'; choose one of: cremad"):
        load_dataset("imagenet", ".")
    with pytest.raises(UserError, match="unexpected keyword"):
        load_dataset("cremad", ".", colour="red")


def test_cli_manifest_summary_and_missing_file(vgg_root, tmp_path):
    out = tmp_path / "vgg.jsonl"
    result = CliRunner().invoke(avprep, ["manifest", "--dataset", "vggsound", "--root",
                                         str(vgg_root), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "listed but missing on disk: 1" in result.output
    assert "files on disk not in any list: 1" in result.output
    assert " test: 2 (people marching, drumming 1, dog barking 1)" in result.output
    assert (tmp_path / "vgg.jsonl.missing.txt").read_text().startswith("missing0001_000040\t")
    m = read_manifest(out)
    assert m.dataset == "vggsound" and len(m.records) == 4


def test_cli_bad_input_is_one_line(cremad_root, tmp_path):
    runner = CliRunner()
    for args in (["manifest", "--dataset", "nosuch", "--root", str(cremad_root), "-o",
                  str(tmp_path / "m.jsonl")],
                 ["manifest", "--dataset", "cremad", "--root", str(cremad_root / "AudioWAV"),
                  "-o", str(tmp_path / "m.jsonl")]):
        result = runner.invoke(avprep, args)
        assert result.exit_code == 2
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ")
        assert "Traceback" not in result.output
    assert not (tmp_path / "m.jsonl").exists()
