"""A corpus of bad inputs through the real CLI: each gives exit 2, one line naming the file (or the
option) and the problem, no traceback, and nothing at the output path."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from handseg.data.layout import discover
from handseg.formats.submission import read_predictions, write_predictions
from tests.conftest import run_cli, train_tiny


@pytest.fixture(scope="module")
def run(synth_data, tmp_path_factory):
    """A tiny trained run."""
    return train_tiny(synth_data / "train", tmp_path_factory.mktemp("bad") / "run")


def _fails(capsys, args, *needles, output=None):
    code, out, err = run_cli(args, capsys)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and out == ""
    for needle in needles:
        assert needle in lines[0], lines[0]
    if output is not None:
        assert not os.path.exists(output), output
    return lines[0]


def _csv(path, images, rle="1 5"):
    write_predictions(path, [(im, [rle] + [""] * 28) for im in images])


def test_output_paths_are_checked_before_any_work(run, synth_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    test = synth_data / "test"
    for args, needle in [
        (["predict", run, "--data", test, "-o", tmp_path], "is a folder; give a file name"),
        (["predict", run, "--data", test, "-o", blocker / "p.csv"], "is a file, not a folder"),
        (["predict", run, "--data", test, "-o", "/proc/handseg/p.csv"], "cannot write in /proc"),
        (["predict", run, "--data", test, "-o", tmp_path / "p.csv", "--probs", blocker], "is a file; give a folder"),
        (["tta", run, "--data", test, "-o", tmp_path], "is a folder"),
        (["kfold", "--data", synth_data / "train", "-o", blocker / "s.json"], "is a file, not a folder"),
        (["synth", blocker / "d", "--ids", 1], "is a file, not a folder"),
        (["pseudo", tmp_path / "x.csv", "--data", test, "--out", blocker], "is a file; give a folder"),
        (["train", "--data", synth_data / "train", "--out", blocker / "run", "--encoder-weights", "none"],
         "is a file, not a folder"),
    ]:
        _fails(capsys, args, needle)
    a = tmp_path / "a.csv"
    _csv(a, ["x.png"])
    _fails(capsys, ["vote", "hard", a, a, "-o", a], "is an input of this command")
    b = tmp_path / "b.csv"
    _csv(b, ["x.png"])
    _fails(capsys, ["vote", "hard", a, a, "-o", b], "already exists; pass --overwrite")
    assert read_predictions(a).images == ["x.png"] and read_predictions(b).images == ["x.png"]  # untouched


def test_existing_outputs_need_overwrite_everywhere(run, synth_data, tmp_path, capsys):
    out = tmp_path / "p.csv"
    args = ["predict", run, "--data", synth_data / "test", "-o", out, "--device", "cpu"]
    assert run_cli(args, capsys)[0] == 0
    before = out.read_bytes()
    _fails(capsys, args, "p.csv: already exists; pass --overwrite")
    assert out.read_bytes() == before
    assert run_cli([*args, "--overwrite"], capsys)[0] == 0


@pytest.mark.parametrize("option,value,needle", [
    ("--threshold", "2", "--threshold must lie strictly between 0 and 1"),
    ("--threshold", "-1", "--threshold must lie strictly between 0 and 1"),
    ("--weights", "0,0", "--weights are all zero"),
    ("--weights", "1,-1", "--weights must be finite and not negative"),
    ("--weights", "nan,1", "--weights must be finite and not negative"),
    ("--weights", "1,x", "is not a comma-separated list of numbers"),
])
def test_soft_vote_refuses_nonsense_values(tmp_path, capsys, option, value, needle):
    out = tmp_path / "v.csv"
    _fails(capsys, ["vote", "soft", tmp_path / "a", tmp_path / "b", option, value, "-o", out], needle, output=out)


@pytest.mark.parametrize("content,needle", [
    ('{"finger-1": 1.5}', "threshold for finger-1 is 1.5"),
    ('{"finger-1": "abc"}', "threshold 'abc' is not a number"),
    ("[0.5, 0.5]", "need 29 thresholds, got 2"),
    ('{"finger-99": 0.5}', "unknown class 'finger-99'"),
])
def test_predict_refuses_bad_thresholds(run, synth_data, tmp_path, capsys, content, needle):
    thr = tmp_path / "thr.json"
    thr.write_text(content)
    out = tmp_path / "p.csv"
    _fails(capsys, ["predict", run, "--data", synth_data / "test", "-o", out, "--thresholds", thr], "thr.json", needle,
           output=out)


@pytest.mark.parametrize("args,needle", [
    (["--size", "0"], "'--size'"),
    (["--size", "-32"], "'--size'"),
    (["--crop", "-32"], "'--crop'"),
    (["--size", "100"], "needs a multiple of 32"),
    (["--loss", "bce:-1"], "must be a positive number"),
    (["--max-steps", "0"], "'--max-steps'"),
    (["--augment", "wild"], "'--augment'"),
    (["--preprocess", "sharpen"], "--preprocess: unknown pre-processing 'sharpen'"),
    (["--preprocess", "clahe:0"], "the clip limit must be a positive number"),
    (["--init", "/nowhere/run"], "/nowhere/run: checkpoint not found"),
    (["--patience", "0"], "'--patience'"),
    (["--ema", "1.5"], "--ema: must be a decay between 0 and 1"),
    (["--patience", "3", "--fold", "-1"], "--patience stops on the validation Dice"),
])
def test_train_refuses_nonsense_flags(synth_data, tmp_path, capsys, args, needle):
    out = tmp_path / "run"
    _fails(capsys, ["train", "--data", synth_data / "train", "--encoder-weights", "none", "--out", out, *args], needle,
           output=out)


@pytest.mark.parametrize("yaml_text,needle", [
    ("epochs: 0", "--epochs: must be at least 1"),
    ("batch_size: 0", "--batch-size: must be at least 1"),
    ("size: abc", "--size: expected an integer, got 'abc'"),
    ("workers: -3", "--workers: must be at least 0"),
    ("amp: half", "--amp: unknown value 'half'"),
    ("nope: 1", "unknown option 'nope' in config"),
    ("[1, 2", "not valid YAML"),
])
def test_train_config_files_are_checked_like_flags(synth_data, tmp_path, capsys, yaml_text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    out = tmp_path / "run"
    _fails(capsys, ["train", "--data", synth_data / "train", "--encoder-weights", "none", "--config", cfg,
                    "--out", out], needle, output=out)


@pytest.mark.parametrize("doc,key", [
    ({"out": "VICTIM", "overwrite": True}, "'out'"),
    ({"overwrite": True}, "'overwrite'"),
    ({"resume": True}, "'resume'"),
])
def test_a_config_file_sets_training_options_only(synth_data, tmp_path, capsys, doc, key):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "mine.txt").write_text("mine")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({k: str(victim) if v == "VICTIM" else v for k, v in doc.items()}))
    out = tmp_path / "run"
    tiny = ["--arch", "unet", "--encoder", "resnet18", "--encoder-weights", "none", "--size", 64, "--epochs", 1,
            "--workers", 0, "--device", "cpu"]
    line = _fails(capsys, ["train", "--data", synth_data / "train", *tiny, "--config", cfg, "--out", out], output=out)
    assert line.startswith(f"handseg: error: {cfg}: {key} cannot be set in a config file"), line
    assert [p.name for p in victim.iterdir()] == ["mine.txt"]


def test_a_replayed_manifest_takes_neither_its_folder_nor_overwrite(synth_data, tmp_path, capsys, monkeypatch):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "mine.txt").write_text("mine")
    options = {"data": str(synth_data / "train"), "arch": "unet", "encoder": "resnet18", "encoder_weights": "none",
               "size": 64, "epochs": 1, "workers": 0, "device": "cpu", "augment": "none", "out": str(victim),
               "overwrite": True, "resume": False}
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"stage": "train", "options": options}))
    monkeypatch.chdir(tmp_path)
    assert run_cli(["train", "--config", manifest], capsys)[0] == 0
    assert [p.name for p in victim.iterdir()] == ["mine.txt"]
    assert (tmp_path / "runs" / "run" / "last.safetensors").is_file()  # the default --out, not the manifest's


def test_bad_data_files_are_named(run, synth_data, tmp_path, capsys):
    data = tmp_path / "test"
    shutil.copytree(synth_data / "test", data)
    victim = sorted((data / "DCM").rglob("*.png"))[1]
    victim.write_bytes(victim.read_bytes()[:300])
    out = tmp_path / "p.csv"
    _fails(capsys, ["predict", run, "--data", data, "-o", out, "--probs", tmp_path / "probs"],
           victim.name, "truncated PNG", output=out)
    assert not (tmp_path / "probs").exists() and not list(tmp_path.glob(".probs*"))
    os.symlink(tmp_path / "gone.png", victim.parent / "ghost.png")
    victim.unlink()
    _fails(capsys, ["predict", run, "--data", data, "-o", out], "ghost.png: broken link", output=out)

    labelled = tmp_path / "train"
    shutil.copytree(synth_data / "train", labelled)
    bad_json = sorted((labelled / "outputs_json").rglob("*.json"))[0]
    bad_json.write_text('{"annotations": [{"label": "finger-1", "points": [[1,2],[3,4],[5,')
    _fails(capsys, ["prep", "json2npy", "--data", labelled], bad_json.name, "not valid JSON")


def test_runs_past_the_image_end_are_refused(synth_data, tmp_path, capsys):
    images = [s.name for s in discover(synth_data / "test")]
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    _csv(good, images)
    _csv(bad, images, rle="16380 100")  # ends past 128 x 128
    out = tmp_path / "v.csv"
    _fails(capsys, ["vote", "hard", good, bad, "--data", synth_data / "test", "-o", out],
           "bad.csv", "finger-1", "RLE runs past the end of a 128 x 128 image", output=out)
    _fails(capsys, ["pseudo", bad, "--data", synth_data / "test", "--out", tmp_path / "ps"],
           "bad.csv", "RLE runs past the end", output=tmp_path / "ps")


def test_vote_writes_the_submission_order_whatever_the_inputs_order(synth_data, tmp_path, capsys):
    order = [s.name for s in discover(synth_data / "test")]
    shuffled = order[::-1]
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    _csv(a, shuffled)
    _csv(b, order)
    out = tmp_path / "v.csv"
    _fails(capsys, ["vote", "hard", a, b, "-o", out], "different orders; pass --data", output=out)
    assert run_cli(["vote", "hard", a, b, "--data", synth_data / "test", "-o", out], capsys)[0] == 0
    assert read_predictions(out).images == order
    _csv(b, shuffled)  # inputs that agree, and a manifest naming the data: the data's order wins
    (tmp_path / "a.manifest.json").write_text(json.dumps({"inputs": {"data": str(synth_data / "test")}}))
    assert run_cli(["vote", "hard", a, b, "-o", out, "--overwrite"], capsys)[0] == 0
    assert read_predictions(out).images == order


def test_crafted_probability_maps_and_checkpoints_are_refused(run, synth_data, tmp_path, capsys):
    from handseg.formats.probs import PROBS_INDEX

    folders = []
    for name in ("pa", "pb"):
        code, _, err = run_cli(["predict", run, "--data", synth_data / "test", "-o", tmp_path / f"{name}.csv",
                                "--probs", tmp_path / name, "--device", "cpu"], capsys)
        assert code == 0, err
        folders.append(tmp_path / name)
    victim = sorted(folders[1].glob("*.npy"))[0]
    buf = np.load(victim)
    header = buf[: 5 * 8 + 5 * 8 * 29].view(np.int64).copy()
    header[5 + 5 * 3 + 2] = 10**9  # class 3's crop claims a billion rows
    buf[: header.size * 8] = header.view(np.uint8)
    np.save(victim, buf)
    out = tmp_path / "v.csv"
    _fails(capsys, ["vote", "soft", *folders, "-o", out], victim.name, "not a handseg probability map", output=out)
    (folders[1] / PROBS_INDEX).write_text("{broken")
    _fails(capsys, ["vote", "soft", *folders, "-o", out], "index.json", "not valid JSON", output=out)

    import torch
    from safetensors.torch import save_file

    fake = tmp_path / "fake.safetensors"
    save_file({"w": torch.zeros(1)}, str(fake), metadata={"handseg": json.dumps({"arch": "unet"})})
    _fails(capsys, ["predict", fake, "--data", synth_data / "test", "-o", out], "fake.safetensors",
           "malformed model card", output=out)


def test_an_incomplete_pseudo_set_is_refused_by_train(synth_data, tmp_path, capsys):
    half = tmp_path / "pseudo"
    shutil.copytree(synth_data / "test_gt", half)
    (half / "manifest.json").write_text(json.dumps({"stage": "pseudo"}))  # no "complete": a crashed run
    out = tmp_path / "run"
    _fails(capsys, ["train", "--data", synth_data / "train", "--encoder-weights", "none", "--extra", half,
                    "--out", out, "--device", "cpu", "--workers", "0"], "pseudo", "incomplete", output=out)


def test_a_crashed_pseudo_leaves_nothing_and_overwrite_replaces_the_whole_set(synth_data, tmp_path, capsys,
                                                                              monkeypatch):
    import handseg.ensemble.pseudo as pseudo

    test = synth_data / "test_gt"
    from handseg.data.images import image_size
    from handseg.data.labels import class_runs, read_polygons
    from handseg.formats.rle import runs_to_rle

    samples = discover(test, labels="required")
    truth = tmp_path / "truth.csv"
    write_predictions(truth, [(s.name, [runs_to_rle(r) for r in class_runs(read_polygons(s.label_path),
                                                                              image_size(s.image_path))])
                              for s in samples])
    out = tmp_path / "ps"
    real = pseudo.atomic_write_json
    calls = []

    def crash(path, doc):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, doc)

    monkeypatch.setattr(pseudo, "atomic_write_json", crash)
    with pytest.raises(OSError):
        run_cli(["pseudo", truth, "--data", test, "--out", out])
    assert not out.exists() and not list(tmp_path.glob(".ps*"))
    monkeypatch.setattr(pseudo, "atomic_write_json", real)
    assert run_cli(["pseudo", truth, "--data", test, "--out", out], capsys)[0] == 0
    (out / "DCM" / "stale.png").write_bytes(b"old run")
    assert run_cli(["pseudo", truth, "--data", test, "--out", out, "--overwrite"], capsys)[0] == 0
    assert not (out / "DCM" / "stale.png").exists()
    assert len(discover(out, labels="required")) == len(samples)


def test_a_failed_command_prints_one_line_without_a_progress_bar(run, synth_data, tmp_path):
    data = tmp_path / "test"
    shutil.copytree(synth_data / "test", data)
    victim = sorted((data / "DCM").rglob("*.png"))[-1]
    victim.write_bytes(victim.read_bytes()[:-30])
    env = {k: v for k, v in os.environ.items() if k != "HANDSEG_NO_PROGRESS"}
    proc = subprocess.run([sys.executable, "-m", "handseg", "predict", str(run), "--data", str(data), "-o",
                           str(tmp_path / "p.csv"), "--device", "cpu"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"handseg: error: {victim}: truncated PNG: the file ends before its "
                                                "last chunk"]


def test_ctrl_c_says_interrupted_and_leaves_a_resumable_run(synth_data, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    env = dict(os.environ, HANDSEG_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, "-m", "handseg", "train", "--data", str(synth_data / "train"), "--arch",
                             "unet", "--encoder", "resnet18", "--encoder-weights", "none", "--size", "64", "--epochs",
                             "200", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--augment", "none",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while not (out / "last.safetensors").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "handseg: interrupted"
    assert not list(out.glob("*.tmp-*"))
    from handseg.models.checkpoint import read_card

    epoch = read_card(out / "last.safetensors").epoch
    assert (out / f"resume-{epoch:04d}.safetensors").is_file()


def test_outputs_that_would_destroy_inputs_are_refused(run, synth_data, tmp_path, capsys):
    data = tmp_path / "victim"
    shutil.copytree(synth_data, data)
    _fails(capsys, ["eda", "--data", data / "train", "--out", data, "--overwrite"], "holds an input of this command")
    _fails(capsys, ["predict", run, "--data", data / "test", "-o", tmp_path / "p.csv", "--probs", data / "test",
                    "--overwrite"], "is an input of this command")
    assert len(discover(data / "train")) == len(discover(synth_data / "train"))  # untouched


def test_an_output_is_never_an_input_nor_inside_one(run, synth_data, tmp_path, capsys):
    """Security: with or without --overwrite, no output replaces an input or writes into one."""
    victim = tmp_path / "run"
    shutil.copytree(run, victim)
    before = {p.name: p.read_bytes() for p in victim.iterdir() if p.is_file()}
    maps = tmp_path / "maps"
    assert run_cli(["predict", victim, "--data", synth_data / "test", "-o", tmp_path / "p.csv", "--probs", maps,
                    "--device", "cpu"], capsys)[0] == 0
    index = (maps / "index.json").read_bytes()
    test = synth_data / "test"
    cases = [
        (["export", victim, "-o", victim / "best.safetensors", "--overwrite"], None, "lies inside"),
        (["export", victim / "best.safetensors", "-o", victim / "x.zip"], victim / "x.zip", "lies inside"),
        (["predict", victim, "--data", test, "-o", victim / "pred.csv"], victim / "pred.csv", "lies inside"),
        (["predict", victim, "--data", test, "-o", tmp_path / "q.csv", "--probs", victim / "maps"], victim / "maps",
         "lies inside"),
        (["predict", victim, "--data", test, "-o", test / "pred.csv"], test / "pred.csv", "lies inside"),
        (["tta", victim, "--data", test, "-o", victim / "metrics.csv", "--overwrite"], None, "lies inside"),
        (["vote", "soft", maps, "-o", maps / "index.json", "--overwrite"], None, "lies inside"),
        (["select", victim, "-o", victim / "oof" / "manifest.json"], None, "lies inside"),
        (["eda", "--data", test, "--out", test / "report"], test / "report", "lies inside"),
        (["pseudo", maps, "--data", test, "--out", maps / "pseudo"], maps / "pseudo", "lies inside"),
    ]
    for args, output, needle in cases:
        line = _fails(capsys, args, needle, "an input of this command", output=output)
        named = output or args[args.index("-o") + 1]
        assert line.startswith(f"handseg: error: {named}: "), line
    assert {p.name: p.read_bytes() for p in victim.iterdir() if p.is_file()} == before
    assert (maps / "index.json").read_bytes() == index
    # the manifest written beside a CSV counts too: it may not replace an input
    shutil.copy(tmp_path / "p.csv", tmp_path / "b.manifest.json")
    _fails(capsys, ["vote", "hard", tmp_path / "p.csv", tmp_path / "b.manifest.json", "-o", tmp_path / "b.csv"],
           "b.csv: is an input of this command", output=tmp_path / "b.csv")


def test_train_refuses_a_used_folder_and_another_fold_on_resume(synth_data, tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    base = ["train", "--data", synth_data / "train", "--arch", "unet", "--encoder", "resnet18", "--encoder-weights",
            "none", "--size", 64, "--epochs", 1, "--workers", 0, "--device", "cpu", "--augment", "none"]
    _fails(capsys, [*base, "--out", used], "exists and is not empty; pass --resume", "--overwrite")
    assert run_cli([*base, "--out", used, "--overwrite"], capsys)[0] == 0
    assert not (used / "notes.txt").exists() and (used / "last.safetensors").exists()
    _fails(capsys, [*base, "--out", used, "--resume", "--fold", 1, "--epochs", 2], "another --fold (0, now 1)")
    _fails(capsys, [*base, "--out", tmp_path / "big", "--size", 100000], "--size 100000: larger than the largest")


def test_prediction_inputs_that_cannot_be_told_apart_or_are_not_read(run, synth_data, tmp_path, capsys):
    folder = tmp_path / "odd"
    images = [s.image_path for s in discover(synth_data / "test")]
    (folder / "p1").mkdir(parents=True)
    (folder / "p2").mkdir()
    shutil.copy(images[0], folder / "p1" / "x.png")
    import cv2

    cv2.imwrite(str(folder / "p2" / "x.jpg"), cv2.imread(str(images[1]), cv2.IMREAD_GRAYSCALE))
    _fails(capsys, ["predict", run, "--data", folder, "-o", tmp_path / "p.csv", "--probs", tmp_path / "pr"],
           "two images share the name x", output=tmp_path / "pr")
    shutil.rmtree(folder / "p2")
    shutil.copy(images[1], folder / "p1" / ".hidden.png")
    (folder / "p1" / "scan.tif").write_bytes(b"II*\0")
    code, _, err = run_cli(["predict", run, "--data", folder, "-o", tmp_path / "q.csv", "--device", "cpu"], capsys)
    assert code == 0 and "1 files of" in err and ".tif" in err and "hidden" in err


def test_a_pseudo_set_with_nothing_kept_is_an_error(synth_data, tmp_path, capsys):
    images = [s.name for s in discover(synth_data / "test")]
    empty = tmp_path / "empty.csv"
    write_predictions(empty, [(im, [""] * 29) for im in images])
    _fails(capsys, ["pseudo", empty, "--data", synth_data / "test", "--out", tmp_path / "ps"], "no image passed",
           output=tmp_path / "ps")


def test_fold_predictions_need_runs_that_held_the_fold_out(run, synth_data, tmp_path, capsys):
    splits = tmp_path / "splits.json"
    assert run_cli(["kfold", "--data", synth_data / "train", "--folds", 2, "-o", splits], capsys)[0] == 0
    _fails(capsys, ["predict", run, "--splits", splits, "--fold", 1, "-o", tmp_path / "f.csv"],
           "was trained with --fold 0")


# ---------------------------------------------------------------------------------------------- model zips


def _rezip(src, dest, index=None, extra=()):
    """A copy of a model zip with its index edited by ``index(doc)`` and ``extra`` (name, bytes) members added."""
    import zipfile

    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    doc = json.loads(members["handseg_model.json"])
    if index is not None:
        index(doc)
    members["handseg_model.json"] = json.dumps(doc).encode()
    members.update(extra)
    with zipfile.ZipFile(dest, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return dest


def _set_central(path, member, offset, value):
    """Overwrite a 2-byte field of ``member``'s central-directory record (what zipfile trusts)."""
    import struct

    data = bytearray(path.read_bytes())
    at = 0
    while (at := data.find(b"PK\x01\x02", at + 1)) != -1:
        n = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46 : at + 46 + n].decode() == member:
            struct.pack_into("<H", data, at + offset, value)
    path.write_bytes(bytes(data))


def _no_leftovers(folder, *allowed):
    assert sorted(p.name for p in folder.iterdir()) == sorted(allowed)  # no .unpacked- folder, no output


def test_a_model_zip_predicts_elsewhere_and_its_manifest_names_the_zip(run, synth_data, tmp_path, capsys):
    import hashlib

    z = tmp_path / "m.zip"
    assert run_cli(["export", run, "-o", z], capsys)[0] == 0
    out = tmp_path / "p.csv"
    code, _, err = run_cli(["predict", z, "--data", synth_data / "test", "-o", out, "--device", "cpu"], capsys)
    assert code == 0, err
    _no_leftovers(tmp_path, "m.zip", "p.csv", "p.manifest.json")
    text = (tmp_path / "p.manifest.json").read_text()
    manifest = json.loads(text)
    assert manifest["inputs"]["model_zip"] == str(z)
    assert manifest["inputs"]["model_zip_sha256"] == hashlib.sha256(z.read_bytes()).hexdigest()
    assert manifest["options"]["checkpoints"] == [f"{z}:models/run/best.safetensors"]
    assert ".unpacked-" not in text
    direct = tmp_path / "d.csv"
    assert run_cli(["predict", run, "--data", synth_data / "test", "-o", direct, "--device", "cpu"], capsys)[0] == 0
    assert out.read_bytes() == direct.read_bytes()


def test_a_model_zip_names_nothing_outside_itself(run, synth_data, tmp_path, capsys):
    import zipfile

    z = tmp_path / "m.zip"
    assert run_cli(["export", run, "-o", z], capsys)[0] == 0
    with zipfile.ZipFile(z) as archive:
        weights = archive.read("models/run/best.safetensors")
    out = tmp_path / "p.csv"
    args = ["--data", synth_data / "test", "-o", out, "--device", "cpu"]

    def model(doc, **kw):
        doc["models"][0].update(kw)

    # a model name that points at a checkpoint elsewhere on disk, absolute or through ..
    bad = _rezip(z, tmp_path / "abs.zip", lambda d: model(d, name=str(run.resolve())))
    _fails(capsys, ["predict", bad, *args], "abs.zip", "is not a folder inside the zip", output=out)
    bad = _rezip(z, tmp_path / "up.zip", lambda d: model(d, name="../run", file="../run/best.safetensors"),
                 [("../run/best.safetensors", weights)])
    _fails(capsys, ["predict", bad, *args], "up.zip", "model name '../run' is not a folder inside the zip", output=out)
    # a checkpoint other than the one the index pins
    bad = _rezip(z, tmp_path / "swap.zip", lambda d: model(d, sha256="0" * 64))
    _fails(capsys, ["predict", bad, *args], "swap.zip", "models/run/best.safetensors is not the checkpoint its "
           "index pins", output=out)
    # a recipe inside the zip that names a run outside it (pinned by the right SHA-256, even)
    recipe = _recipe_doc({"0": str(run.resolve())}, {"0": json.loads(_index_of(z))["models"][0]["sha256"]})
    bad = _rezip(z, tmp_path / "outside.zip", lambda d: d.update(recipe="recipe.json"),
                 [("recipe.json", json.dumps(recipe).encode())])
    line = _fails(capsys, ["predict", bad, *args], "outside.zip: recipe.json names the run", "which is not in the zip",
                  output=out)
    assert ".unpacked-" not in line
    _no_leftovers(tmp_path, "m.zip", "abs.zip", "up.zip", "swap.zip", "outside.zip")


def _index_of(z):
    import zipfile

    with zipfile.ZipFile(z) as archive:
        return archive.read("handseg_model.json")


def _recipe_doc(runs, sha256=None):
    """A minimal valid recipe by hand: one configuration that makes every class at threshold 0.5."""
    from handseg.common.constants import CLASSES

    config = {"name": "a", "runs": runs, "tta": {"transforms": ["identity"], "merge": "mean"}}
    if sha256 is not None:
        config["sha256"] = sha256
    return {"format": "handseg-recipe", "version": 1, "configurations": [config],
            "classes": {c: {"source": "a", "threshold": 0.5} for c in CLASSES}}


def test_model_zip_sizes_encryption_and_compression_are_checked_before_unpacking(run, synth_data, tmp_path, capsys,
                                                                                  monkeypatch):
    z = tmp_path / "m.zip"
    assert run_cli(["export", run, "-o", z], capsys)[0] == 0
    out = tmp_path / "p.csv"
    args = ["--data", synth_data / "test", "-o", out, "--device", "cpu"]
    size = z.stat().st_size
    monkeypatch.setenv("HANDSEG_MAX_ZIP_BYTES", str(size // 2))
    _fails(capsys, ["predict", z, *args], "m.zip: the zip claims", f"more than the limit of {size // 2:,}",
           "HANDSEG_MAX_ZIP_BYTES", output=out)
    monkeypatch.setenv("HANDSEG_MAX_ZIP_BYTES", "lots")
    _fails(capsys, ["predict", z, *args], "HANDSEG_MAX_ZIP_BYTES='lots' is not a whole number", output=out)
    monkeypatch.delenv("HANDSEG_MAX_ZIP_BYTES")
    # a bomb: a member that claims more than the limit, caught from the central directory
    bomb = _rezip(z, tmp_path / "bomb.zip")
    _set_central(bomb, "models/run/best.safetensors", 26, 0xFFFF)  # uncompressed size, high half: ~4 GiB
    monkeypatch.setenv("HANDSEG_MAX_ZIP_BYTES", str(2**31))
    _fails(capsys, ["predict", bomb, *args], "bomb.zip: the zip claims", output=out)
    monkeypatch.delenv("HANDSEG_MAX_ZIP_BYTES")
    enc = _rezip(z, tmp_path / "enc.zip")
    _set_central(enc, "models/run/best.safetensors", 8, 0x1)  # general purpose flags: encrypted
    _fails(capsys, ["predict", enc, *args], "enc.zip: member models/run/best.safetensors is encrypted", output=out)
    aes = _rezip(z, tmp_path / "aes.zip")
    _set_central(aes, "models/run/best.safetensors", 10, 99)  # compression method 99 (WinZip AES)
    _fails(capsys, ["predict", aes, *args], "aes.zip: member models/run/best.safetensors uses compression method 99",
           output=out)
    _no_leftovers(tmp_path, "m.zip", "bomb.zip", "enc.zip", "aes.zip")


def test_pins_are_required_by_predict_recipe_export_and_model_zips(run, synth_data, tmp_path, capsys):
    import hashlib

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(_recipe_doc({"0": str(run)})))
    out, z = tmp_path / "p.csv", tmp_path / "m.zip"
    args = ["--data", synth_data / "test", "-o", out, "--device", "cpu"]
    _fails(capsys, ["predict", "--recipe", recipe, *args], "recipe.json: configuration 'a' has no \"sha256\" for "
           "fold 0", output=out)
    _fails(capsys, ["export", "--recipe", recipe, "-o", z], "recipe.json", '"sha256"', output=z)
    # pinned, it exports, and the zip predicts as the recipe does
    pin = hashlib.sha256((run / "best.safetensors").read_bytes()).hexdigest()
    recipe.write_text(json.dumps(_recipe_doc({"0": str(run)}, {"0": pin})))
    code, _, err = run_cli(["predict", "--recipe", recipe, *args], capsys)
    assert code == 0, err
    assert run_cli(["export", "--recipe", recipe, "-o", z], capsys)[0] == 0
    from_zip = tmp_path / "z.csv"
    code, _, err = run_cli(["predict", z, "--data", synth_data / "test", "-o", from_zip, "--device", "cpu"], capsys)
    assert code == 0, err
    assert from_zip.read_bytes() == out.read_bytes()
    manifest = json.loads((tmp_path / "z.manifest.json").read_text())
    assert manifest["options"]["recipe"] == f"{z}:recipe.json"
    assert manifest["inputs"]["model_zip_sha256"] == hashlib.sha256(z.read_bytes()).hexdigest()
    # a plain zip, or the recipe in a zip, without its pins
    for name, edit, extra, needle in [
        ("plain.zip", lambda d: d["models"][0].pop("sha256"), (), 'handseg_model.json gives no "sha256" for '),
        ("unpinned.zip", None, [("recipe.json", json.dumps(_recipe_doc({"0": "models/a/fold0"})).encode())],
         "recipe.json: configuration 'a' has no \"sha256\" for fold 0"),
    ]:
        bad = _rezip(z, tmp_path / name, edit, extra)
        line = _fails(capsys, ["predict", bad, "--data", synth_data / "test", "-o", tmp_path / "x.csv"], name,
                      needle, output=tmp_path / "x.csv")
        assert ".unpacked-" not in line
    _no_leftovers(tmp_path, "recipe.json", "p.csv", "p.manifest.json", "m.zip", "z.csv", "z.manifest.json",
                  "plain.zip", "unpinned.zip")


# ---------------------------------------------------------------------------------------------- resume state


@pytest.fixture(scope="module")
def resumable(synth_data, tmp_path_factory):
    """A finished 1-epoch run with a --lr and --batch-size other than the defaults."""
    from handseg.training.config import TrainConfig
    from handseg.training.loop import train

    out = tmp_path_factory.mktemp("resumable") / "run"
    train(TrainConfig(data=synth_data / "train", arch="unet", encoder="resnet18", encoder_weights="none", size=64,
                      epochs=1, batch_size=3, lr=3e-3, workers=0, device="cpu", out=out, augment="none"),
          log=lambda *a: None)
    return out


def _resume_args(synth_data, out, *more):
    return ["train", "--data", synth_data / "train", "--arch", "unet", "--encoder", "resnet18", "--encoder-weights",
            "none", "--size", 64, "--workers", 0, "--device", "cpu", "--augment", "none", "--out", out, "--resume",
            *more]


def _tamper(path, edit):
    """Rewrite a resume file: ``edit(tensors, header)`` changes either in place."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["handseg_resume"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, header)
    save_file(tensors, str(path), metadata={"handseg_resume": json.dumps(header)})


def _wrong_shape(tensors, header):
    import torch

    tensors["optimizer.0.exp_avg"] = torch.zeros(3)


def _nan_lr(tensors, header):
    header["optimizer"]["param_groups"][0]["lr"] = float("nan")


def _nan_moment(tensors, header):
    tensors["optimizer.1.exp_avg_sq"][0] = float("nan")


@pytest.mark.parametrize("edit,needle", [
    (lambda t, h: h.update(model={}), "resume state is incomplete: its model lacks arch, encoder, size"),
    (lambda t, h: h["model"].pop("in_channels"), "its model lacks in_channels"),
    (lambda t, h: h.update(run={}), "resume state is incomplete: its run lacks data, splits, fold"),
    (lambda t, h: h["run"].pop("lr"), "its run lacks lr"),
    (_wrong_shape, "does not fit this run: optimizer.0.exp_avg has shape [3], its parameter [64, 1, 7, 7]"),
    (_nan_lr, "resume state holds nan (optimizer.param_groups.0.lr)"),
    (lambda t, h: h["run"].update(lr=float("nan")), "resume state holds nan (run.lr)"),
    (lambda t, h: h["run"].update(batch_size="4"), "its run's lr, batch_size, accum or epochs is not a positive"),
    (_nan_moment, "resume state holds NaN or infinity (optimizer.1.exp_avg_sq)"),
    (lambda t, h: h.update(threads=0), "resume state is malformed: its threads is 0, not a positive integer"),
    (lambda t, h: h.update(threads="2"), "resume state is malformed: its threads is '2', not a positive integer"),
])
def test_resume_state_is_checked_whole_before_the_first_step(resumable, synth_data, tmp_path, capsys, edit, needle):
    out = tmp_path / "run"
    shutil.copytree(resumable, out)
    resume_file = out / "resume-0001.safetensors"
    _tamper(resume_file, edit)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = _fails(capsys, _resume_args(synth_data, out, "--epochs", 2), needle)
    assert line.startswith(f"handseg: error: {resume_file}: "), line
    assert "--lr" not in line
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # manifest included


@pytest.mark.parametrize("flag,value,needle", [
    ("--lr", 0.01, "the run was trained with --lr 0.003, not 0.01"),
    ("--batch-size", 4, "the run was trained with --batch-size 3, not 4"),
    ("--accum", 2, "the run was trained with --accum 1, not 2"),
])
def test_resume_refuses_another_schedule(resumable, synth_data, tmp_path, capsys, flag, value, needle):
    out = tmp_path / "run"
    shutil.copytree(resumable, out)
    manifest = (out / "manifest.json").read_bytes()
    line = _fails(capsys, _resume_args(synth_data, out, "--epochs", 2, flag, value), needle)
    assert str(out / "resume-0001.safetensors") in line
    assert (out / "manifest.json").read_bytes() == manifest


def test_resume_takes_the_options_not_given_from_the_run_and_says_a_longer_plan(resumable, synth_data, tmp_path,
                                                                               capsys):
    out = tmp_path / "run"
    shutil.copytree(resumable, out)
    code, said, err = run_cli(_resume_args(synth_data, out), capsys)  # no --epochs: the run's 1, nothing to do
    assert code == 0 and "finished all 1 epoch" in said, (said, err)
    code, said, err = run_cli(_resume_args(synth_data, out, "--epochs", 2), capsys)
    assert code == 0, err
    assert "--epochs 2: the run planned 1; its learning-rate schedule is re-planned over 2 epochs from step" in said
    options = json.loads((out / "manifest.json").read_text())["options"]
    assert (options["lr"], options["batch_size"], options["accum"], options["epochs"]) == (3e-3, 3, 1, 2)
    code, said, err = run_cli(_resume_args(synth_data, out, "--epochs", 3, "--max-steps", 100), capsys)
    assert code == 0, err  # another --max-steps re-plans the schedule too, and says so
    assert ("--max-steps 100: the run planned its warm-up and cosine with no --max-steps; its learning-rate schedule "
            "is re-planned with --max-steps 100 over 3 epochs from step") in said


def test_recipe_values_are_refused_in_one_line(run, synth_data, tmp_path, capsys):
    """Names that clean to one map folder, non-finite or overflowing soft weights, and a keep_largest that
    is not a boolean: each refused naming the recipe and the field (not an empty submission or a crash)."""
    from handseg.common.constants import CLASSES

    def two(names=("a", "b"), weights=None, keep=None):
        doc = _recipe_doc({"0": str(run)})
        doc["configurations"] = [dict(doc["configurations"][0], name=n) for n in names]
        doc["classes"] = {c: {"source": "soft", "threshold": 0.5} for c in CLASSES}
        if weights is not None:
            doc["ensemble"] = {"soft": {"weights": weights}}
        if keep is not None:
            doc["classes"]["Radius"]["keep_largest"] = keep
        return doc

    out = tmp_path / "p.csv"
    recipe = tmp_path / "recipe.json"
    for doc, needle in [
        (two(("a b", "a_b")), "configurations 'a b' and 'a_b' would share the map folder a_b"),
        (two(("A", "a")), "configurations 'A' and 'a' would share the map folder a"),
        (two(weights=[1e308, 1e308]), "ensemble.soft.weights sum to inf, more than 1e+06"),
        (two(weights=[1, float("inf")]), "ensemble.soft.weights must be 2 finite positive numbers"),
        (two(weights=[1, 10**400]), "ensemble.soft.weights must be 2 finite positive numbers"),
        (two(keep="no"), "Radius: keep_largest must be true or false, got 'no'"),
    ]:
        recipe.write_text(json.dumps(doc))
        _fails(capsys, ["predict", "--recipe", recipe, "--data", synth_data / "test", "-o", out],
               "recipe.json: not a valid recipe", needle, output=out)
    a = tmp_path / "a.csv"
    _csv(a, ["x.png"])
    _fails(capsys, ["vote", "soft", tmp_path, tmp_path, "--weights", "1e308,1e308", "-o", out],
           "--weights sum to inf, more than 1e+06", output=out)


def test_label_coordinates_must_be_numbers(synth_data, tmp_path, capsys):
    """Booleans and strings as coordinates are not numbers, however numpy would read them."""
    labelled = tmp_path / "train"
    shutil.copytree(synth_data / "train", labelled)
    label = sorted((labelled / "outputs_json").rglob("*.json"))[0]
    doc = json.loads(label.read_text())
    first = doc["annotations"][0]["label"]
    for points, needle in [([[True, 1], [3, 4], [5, 6]], "True is not a number"),
                           ([["7", 1], [3, 4], [5, 6]], "'7' is not a number"),
                           ([[1, 2, 3], [3, 4], [5, 6]], "[1, 2, 3] is not an [x, y] pair"),
                           ({"x": 1}, "expected a list of [x, y], got dict"),
                           ([[10**400, 1], [3, 4], [5, 6]], "has a coordinate out of range (inf")]:
        doc["annotations"][0]["points"] = points
        label.write_text(json.dumps(doc))
        _fails(capsys, ["prep", "json2npy", "--data", labelled], label.name, f"annotation 0 ({first})", needle)


def test_pseudo_labels_remember_their_runs_and_fold_k_refuses_others(synth_data, tmp_path, capsys):
    """pseudo records the runs (and folds) that made its labels; train --fold 0 --extra refuses labels made
    by fold 1's run (it trained on fold 0's validation images) or by unknown runs, and takes fold 0's own."""
    from handseg.data.images import image_size
    from handseg.data.labels import class_runs, read_polygons
    from handseg.formats.rle import runs_to_rle
    from handseg.training.dataset import check_extra_origin

    train = synth_data / "train"
    splits = tmp_path / "splits.json"
    assert run_cli(["kfold", "--data", train, "--folds", 2, "-o", splits], capsys)[0] == 0
    runs = []
    for fold in (0, 1):  # run folders as train writes their manifests (no weights needed to name them)
        run = tmp_path / f"r_f{fold}"
        run.mkdir()
        (run / "manifest.json").write_text(json.dumps({"stage": "train", "options": {"fold": fold},
                                                       "inputs": {"splits": str(splits)}}))
        runs.append(run)
    samples = discover(synth_data / "test_gt", labels="required")
    sets = {}
    for name, made in (("f0", runs[0]), ("f1", runs[1]), ("anon", None)):
        csv = tmp_path / f"{name}.csv"
        write_predictions(csv, [(s.name, [runs_to_rle(r) for r in class_runs(read_polygons(s.label_path),
                                                                              image_size(s.image_path))])
                                for s in samples])
        if made is not None:
            (tmp_path / f"{name}.manifest.json").write_text(json.dumps(
                {"stage": "predict", "options": {"checkpoints": [str(made / "best.safetensors")]}}))
        assert run_cli(["pseudo", csv, "--data", synth_data / "test", "--out", tmp_path / f"ps_{name}"], capsys)[0] == 0
        sets[name] = tmp_path / f"ps_{name}"
    made_by = json.loads((sets["f1"] / "manifest.json").read_text())["made_by"]
    assert made_by == [{"run": str(runs[1]), "fold": 1, "splits": str(splits)}]
    out = tmp_path / "run"
    args = ["train", "--data", train, "--splits", splits, "--fold", 0, "--encoder-weights", "none", "--out", out]
    _fails(capsys, [*args, "--extra", sets["f1"]], "ps_f1: the pseudo labels were made by", "r_f1, which was trained "
           "with --fold 1, so it trained on fold 0's validation images; make them with fold 0's own model", output=out)
    _fails(capsys, [*args, "--extra", sets["anon"]], "ps_anon: the pseudo labels do not record which runs made them",
           output=out)
    check_extra_origin(sets["f0"], 0, splits)  # fold 0's own model: taken


def test_one_writer_per_output(run, synth_data, tmp_path, capsys):
    """While a command holds an output (another process here), a second writer of it is refused in one
    line and the first one's output is untouched; once it is released, the output can be written."""
    out = tmp_path / "p.csv"
    out.write_text("first\n")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from handseg.formats.files import hold_output; "
                               "hold_output(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        _fails(capsys, ["predict", run, "--data", synth_data / "test", "-o", out, "--overwrite", "--device", "cpu"],
               "p.csv: another handseg command is writing this output now (it holds .p.csv.lock)")
        assert out.read_text() == "first\n"
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run_cli(["predict", run, "--data", synth_data / "test", "-o", out, "--overwrite", "--device", "cpu"],
                           capsys)
    assert code == 0, err
    _no_leftovers(tmp_path, "p.csv", "p.manifest.json")  # its lock is gone with the command


def test_killed_writers_leave_nothing_the_next_run_keeps(run, synth_data, tmp_path, capsys):
    """What a kill -9 leaves beside an output (a hidden temporary file, a partial map folder, an unpacked
    model zip, a half-replaced folder) is removed by the next writer of that output; others' are kept.
    A CSV's old manifest goes as its new CSV comes, so the two always describe the same run."""
    from handseg.formats.files import atomic_open

    out = tmp_path / "p.csv"
    debris = [tmp_path / ".p.csv.tmp-0123abcd", tmp_path / ".p.csv.unpacked-x1", tmp_path / ".probs.tmp-5e6f7a8b",
              tmp_path / ".probs.old-9abc0def"]
    debris[0].write_text("half")
    for d in debris[1:]:
        d.mkdir()
        (d / "big.npy").write_bytes(b"x" * 100)
    other = tmp_path / ".q.csv.tmp-0123abcd"  # another output's: not this run's to remove
    other.write_text("half")
    code, _, err = run_cli(["predict", run, "--data", synth_data / "test", "-o", out, "--probs", tmp_path / "probs",
                            "--device", "cpu"], capsys)
    assert code == 0, err
    assert not any(d.exists() for d in debris) and other.exists()
    # a file written atomically is hidden while it is written
    with atomic_open(tmp_path / "r.csv") as f:
        assert os.path.basename(f.name).startswith(".r.csv.tmp-")
    # a kill between the CSV and its manifest: the CSV has no manifest, never the old run's
    manifest = tmp_path / "p.manifest.json"
    assert manifest.is_file()
    from handseg.formats.submission import write_predictions as write

    write(out, [("x.png", [""] * 29)])
    assert not manifest.exists()


def test_select_workers_die_with_their_parent(tmp_path):
    """kill -9 of a process scoring in a pool: its workers end too (they watch their parent)."""
    import signal
    import time

    (tmp_path / "slowjob.py").write_text("import os, time\n\ndef job(ctx, j):\n    with open(ctx, 'a') as f:\n"
                                         "        f.write(f'{os.getpid()}\\n')\n    time.sleep(120)\n    return j\n")
    pids = tmp_path / "pids.txt"
    script = ("import os, signal, sys, threading, time\nfrom handseg.selection.scoring import ordered_map\n"
              "from slowjob import job\n"
              "threading.Thread(target=lambda: list(ordered_map(job, sys.argv[1], list(range(4)), workers=2)),"
              " daemon=True).start()\n"
              "while not os.path.exists(sys.argv[1]) or len(open(sys.argv[1]).read().split()) < 2:\n"
              "    time.sleep(0.05)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), str(tmp_path)])}
    proc = subprocess.run([sys.executable, "-c", script, str(pids)], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    workers = [int(p) for p in pids.read_text().split()]

    def alive(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                return "\nState:\tZ" not in f.read()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in workers), workers


def test_deeply_nested_json_and_odd_names_are_one_line(run, synth_data, tmp_path, capsys):
    """JSON nested past the parser's recursion (labels, recipes, thresholds, indexes, configs), a probability
    index listing non-names, file names that are not text, and a symlink loop: one line each, no traceback."""
    from handseg.formats.probs import PROBS_INDEX

    deep = "[" * 100_000 + "]" * 100_000
    out = tmp_path / "p.csv"
    test = synth_data / "test"
    for name, args in [("thr.json", ["predict", run, "--data", test, "-o", out, "--thresholds"]),
                       ("recipe.json", ["predict", "--data", test, "-o", out, "--recipe"]),
                       ("run.yaml", ["train", "--data", synth_data / "train", "--out", tmp_path / "r", "--config"])]:
        path = tmp_path / name
        path.write_text(deep)
        _fails(capsys, [*args, path], name, "nested too deeply", output=out)
    labelled = tmp_path / "train"
    shutil.copytree(synth_data / "train", labelled)
    label = sorted((labelled / "outputs_json").rglob("*.json"))[0]
    label.write_text(deep)
    _fails(capsys, ["prep", "json2npy", "--data", labelled], label.name, "nested too deeply")

    probs = tmp_path / "pa"
    assert run_cli(["predict", run, "--data", test, "-o", tmp_path / "pa.csv", "--probs", probs, "--device", "cpu"],
                   capsys)[0] == 0
    (probs / PROBS_INDEX).write_text(json.dumps({"images": [1, 2]}))
    _fails(capsys, ["vote", "soft", probs, probs, "-o", out], "index.json", '"images" must list each image name once '
           "as text: 1 is not an image name", output=out)

    for bad, shown in [(b"x\nrow.png", "'x\\nrow.png'"), (b"caf\xe9.png", "'caf\\udce9.png'")]:
        folder = tmp_path / f"odd{len(bad)}"
        folder.mkdir()
        shutil.copy(discover(test)[0].image_path, os.fsdecode(bytes(folder) + b"/" + bad))
        _fails(capsys, ["predict", run, "--data", folder, "-o", out], f"{folder}: the file name {shown}", output=out)
    loop = tmp_path / "loop"
    (loop / "a").mkdir(parents=True)
    shutil.copy(discover(test)[0].image_path, loop / "a" / "x.png")
    os.symlink(loop, loop / "a" / "back")
    _fails(capsys, ["predict", run, "--data", loop, "-o", out], "symlink loop: this folder is", output=out)


def test_an_output_that_cannot_be_replaced_is_refused_before_the_work(run, synth_data, tmp_path, capsys,
                                                                       monkeypatch):
    """A folder output that could not be moved aside at the end (not writable by us; simulated, as tests
    run as root) is refused when the output is checked, before anything is predicted."""
    import handseg.inference.run as inference_run

    probs = tmp_path / "probs"
    probs.mkdir()
    (probs / "old.npy").write_bytes(b"x")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if os.fspath(p) == os.fspath(probs)
                        and mode & os.W_OK else real(p, mode, **k))
    monkeypatch.setattr(inference_run, "run_predictions", lambda *a, **k: pytest.fail("predicted before refusing"))
    out = tmp_path / "p.csv"
    _fails(capsys, ["predict", run, "--data", synth_data / "test", "-o", out, "--probs", probs, "--overwrite"],
           "probs: cannot be replaced: the folder is not writable by this user", output=out)
    assert (probs / "old.npy").read_bytes() == b"x"


def test_a_map_of_another_dtype_or_rank_says_what_a_map_is(run, synth_data, tmp_path, capsys):
    probs = tmp_path / "pa"
    assert run_cli(["predict", run, "--data", synth_data / "test", "-o", tmp_path / "pa.csv", "--probs", probs,
                    "--device", "cpu"], capsys)[0] == 0
    victim = sorted(probs.glob("*.npy"))[0]
    out = tmp_path / "v.csv"
    for array, shown in [(np.zeros((29, 8, 8), np.float32), "a float32 array of shape 29 x 8 x 8"),
                         (np.zeros((8, 8), np.uint8), "a uint8 array of shape 8 x 8")]:
        np.save(victim, array)
        _fails(capsys, ["vote", "soft", probs, probs, "-o", out], victim.name, "not a handseg probability map: it "
               f"holds {shown}; a handseg map is uint8, 29 x H x W (dense) or a packed crop file", output=out)


def test_a_killed_prep_leaves_no_temporaries_after_the_next(synth_data, tmp_path, capsys):
    data = tmp_path / "train"
    shutil.copytree(synth_data / "train", data)
    assert run_cli(["prep", "json2npy", "--data", data], capsys)[0] == 0
    masks = data / "cache" / "masks"
    first = next(p for p in masks.rglob("*") if p.is_file() and p.name != "manifest.json")
    stale = first.with_name(f".{first.name}.tmp-0123abcd")  # what a kill -9 mid-write leaves
    stale.write_bytes(b"half")
    assert run_cli(["prep", "json2npy", "--data", data], capsys)[0] == 0
    assert not stale.exists() and first.is_file()
    assert not list((data / "cache").rglob("*.tmp-*")) and not list((data / "cache").glob(".*.lock"))
