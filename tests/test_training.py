"""Section 8: schedule, mixed-precision choice, checkpoints, exact resume (after SIGKILL too), time budget,
and the outputs of train, test and decode."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, UNIT, m, saying_one_unit

FAST = ["--preset", "tiny", "--input-size", "44", "--synthetic-clips", "48", "--max-frames", "400",
        "--warmup-epochs", "1"]


def fast_cfg(work, **changes):
    return m.dataclasses.replace(m.parse_config(FAST + ["--work-dir", str(work)]), **changes)


def test_warmup_cosine_rises_linearly_then_falls_to_zero():
    assert [m.warmup_cosine(s, 4, 12) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert m.warmup_cosine(8, 4, 12) == pytest.approx(0.5)
    assert m.warmup_cosine(12, 4, 12) == pytest.approx(0.0)
    values = [m.warmup_cosine(s, 4, 12) for s in range(4, 13)]
    assert values == sorted(values, reverse=True)


@pytest.mark.parametrize("capability, expected", [((6, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_mixed_precision_follows_the_gpu(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert m.amp_dtype(torch.device("cuda"), m.Config()) is expected
    assert m.amp_dtype(torch.device("cuda"), m.Config(amp="off")) is None
    assert m.amp_dtype(torch.device("cpu"), m.Config()) is None
    assert m.amp_dtype(torch.device("cuda"), m.Config(amp="fp16")) is torch.float16  # a T4's, on any GPU


def test_bf16_asked_of_a_gpu_without_it_is_refused_with_the_alternative(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(m.UserError, match="Tesla T4 .*7.5.* --amp fp16"):
        m.amp_dtype(torch.device("cuda"), m.Config(amp="bf16"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert m.amp_dtype(torch.device("cuda"), m.Config(amp="bf16")) is torch.bfloat16


def test_a_step_the_fp16_scaler_skips_still_advances_the_schedule_without_torchs_warning():
    model = m.build_model(m.Config(preset="tiny", input_size=44), m.Vocabulary.seed().size)
    cfg = m.Config()
    optimizer, scheduler = m.make_optimizer(model, cfg, 100)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    scaler.scale(torch.ones(()))  # as a backward pass would have, once
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))  # overflowed fp16 gradients: the scaler skips the step
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.optimizer_step(model, optimizer, scheduler, scaler, cfg)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert scheduler.last_epoch == 1 and scaler.get_scale() < 2.0 ** 16


def test_training_writes_log_lines_metrics_curves_and_checkpoints(tmp_path, capsys):
    cfg = fast_cfg(tmp_path / "w", epochs=2)
    result = m.run_train(cfg)
    out = capsys.readouterr().out
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch")]
    assert len(epoch_lines) == 2 and all("val CER ctc" in line and "clips/s" in line for line in epoch_lines)
    assert out.strip().splitlines()[-1].startswith("CER=")
    rows = list(csv.DictReader(open(tmp_path / "w" / "metrics.csv", encoding="utf-8-sig")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[0]["train_loss"]) == pytest.approx(result["history"][0]["train_loss"])
    assert (tmp_path / "w" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    state = torch.load(tmp_path / "w" / "checkpoints" / "last.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "history", "config", "vocab"} <= set(state)
    assert state["epoch"] == 2 and state["config"]["preset"] == "tiny"
    assert (tmp_path / "w" / "checkpoints" / "best.pt").exists()
    metrics = json.loads((tmp_path / "w" / "test_metrics.json").read_text())
    assert {"cer", "wer", "cer_mean_per_clip", "n", "decoding"} <= set(metrics) and metrics["n"] > 0


def run_script(args, **kwargs):
    return subprocess.Popen([sys.executable, str(ROOT / "master_all_avsr.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def history_without_timings(work: Path) -> list[dict]:
    state = torch.load(work / "checkpoints" / "last.pt", weights_only=False)
    return [{k: v for k, v in row.items() if k not in ("epoch_s", "clips_per_s")} for row in state["history"]]


def extra_clips(folder: Path, clips: int = 12) -> list[str]:
    """Flags that add a second generated set as extra training clips."""
    m.write_synthetic_dataset(m.Config(output=str(folder), synthetic_clips=clips, seed=11), m.Vocabulary.seed())
    return ["--extra-data-dir", str(folder), "--extra-weight", "0.5"]


def test_resume_after_sigkill_ends_where_the_uninterrupted_run_ends(tmp_path):
    """With every setting whose state lives across epochs: the CTC-weight schedule, the extra clips' draws, the
    kept epoch weights and their average, early stopping."""
    args = FAST + ["--epochs", "4", "--mode", "train", "--ctc-weight-schedule", "1-2:0.8,3-:0.5>0.2",
                   "--average-last", "2", "--stop-after", "3"] + extra_clips(tmp_path / "extra")
    whole = run_script(args + ["--work-dir", str(tmp_path / "whole")])
    assert whole.wait(timeout=600) == 0, whole.stdout.read()

    killed_dir = tmp_path / "killed"
    killed = run_script(args + ["--work-dir", str(killed_dir)])
    last = killed_dir / "checkpoints" / "last.pt"
    while not last.exists() and killed.poll() is None:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert torch.load(last, weights_only=False)["epoch"] < 4  # really cut short
    resumed = run_script(args + ["--work-dir", str(killed_dir), "--resume"])
    output = resumed.stdout.read()
    assert resumed.wait(timeout=600) == 0, output
    assert "Resumed from" in output
    assert history_without_timings(killed_dir) == history_without_timings(tmp_path / "whole")
    a = torch.load(killed_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise on CPU
    for name in ("worst_samples.csv", "confusions.txt", "confusions.csv"):  # each epoch's rows once, as unbroken
        assert (killed_dir / "diagnostics" / name).read_bytes() == (tmp_path / "whole" / "diagnostics" / name).read_bytes()
    a, b = (torch.load(d / "checkpoints" / "averaged.pt", weights_only=False) for d in (killed_dir, tmp_path / "whole"))
    assert a["averaged_epochs"] == [3, 4] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_checkpoint_from_another_architecture_or_vocabulary_is_refused(tmp_path):
    m.train(fast_cfg(tmp_path / "w", epochs=1))
    with pytest.raises(m.UserError, match="preset: checkpoint 'tiny', now 'small'"):
        m.train(fast_cfg(tmp_path / "w", epochs=2, resume=True, preset="small"))
    vocab = m.Vocabulary.seed().with_units(["x"])
    vocab.save(tmp_path / "v.json")
    with pytest.raises(m.UserError, match="another vocabulary"):
        m.train(fast_cfg(tmp_path / "w", epochs=2, resume=True, vocab=str(tmp_path / "v.json")))


def test_time_budget_stops_cleanly_with_a_checkpoint(tmp_path, capsys):
    result = m.train(fast_cfg(tmp_path / "w", epochs=50, time_budget=0.001))
    assert len(result["history"]) == 1
    assert "--time-budget" in capsys.readouterr().out
    assert torch.load(tmp_path / "w" / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 1


def test_test_and_decode_modes_use_the_checkpoint(tmp_path, capsys):
    work = tmp_path / "w"
    m.train(fast_cfg(work, epochs=1))
    metrics = m.run_test(fast_cfg(work, split="all", nbest=3, beam_size=4))
    rows = list(csv.DictReader(open(work / "predictions.csv", encoding="utf-8-sig")))
    assert len(rows) == metrics["n"] == 48 and set(rows[0]) == {"id", "reference", "hypothesis", "cer", "score"}
    assert metrics["decoding"] == {"decoder": "beam", "beam_size": 4, "ctc_weight": 0.3, "max_length_ratio": 0.0,
                                   "min_length_ratio": 0.0, "length_bonus": 0.0, "nbest": 3}
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"CER={metrics['cer']:.4f} WER={metrics['wer']:.4f} n=48 (all split, best.pt, beam)")
    nbest = list(csv.DictReader(open(work / "nbest.csv", encoding="utf-8-sig")))
    for name in ("predictions.csv", "nbest.csv", "metrics.csv"):  # with a BOM, so that Excel reads them as UTF-8
        assert (work / name).read_bytes().startswith(b"\xef\xbb\xbf"), name
    first = [r for r in nbest if r["id"] == rows[0]["id"]]
    assert [r["rank"] for r in first] == ["1", "2", "3"] and first[0]["hypothesis"] == rows[0]["hypothesis"]
    assert float(first[0]["score"]) >= float(first[1]["score"]) >= float(first[2]["score"])
    clips = tmp_path / "clips"
    m.write_synthetic_dataset(m.Config(output=str(clips), synthetic_clips=3), m.Vocabulary.seed())
    for decoder in ("beam", "attention", "ctc"):
        decoded = m.run_decode(fast_cfg(work, input=str(clips / "Preprocessed_Video"), decoder=decoder))
        lines = capsys.readouterr().out.rstrip("\n").splitlines()  # an untrained model may say nothing
        assert [d[0] for d in decoded] == ["synth_00000", "synth_00001", "synth_00002"]
        assert lines[-3:] == [f"{stem}\t{hyps[0][0]}" for stem, hyps in decoded]
    decoded = m.run_decode(fast_cfg(work, input=str(clips / "Preprocessed_Video"), nbest=2, beam_size=3))
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 6 and lines[0].startswith("synth_00000\t1\t") and lines[1].startswith("synth_00000\t2\t")
    # decode.csv: every hypothesis with its rank, the clip's frames and time, and the CER against the label of
    # its name (the dataset's Csv folder, found under --input's parent by --labels-dir)
    written = list(csv.DictReader(open(work / "decode.csv", encoding="utf-8-sig")))
    assert [(r["name"], r["rank"]) for r in written][:2] == [("synth_00000", "1"), ("synth_00000", "2")]
    assert written[0]["text"] == decoded[0][1][0][0] and int(written[0]["frames"]) > 0 and written[0]["reference"] == ""
    m.run_decode(fast_cfg(work, input=str(clips / "Preprocessed_Video"), labels_dir=str(clips / "Csv"),
                          output=str(tmp_path / "out.jsonl")))
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    labels = {p.stem: m.read_label(p) for p in (clips / "Csv").glob("*.csv")}
    assert len(records) == 3 and all(r["reference"] == labels[r["name"]] for r in records)
    vocab = m.load_vocabulary(m.Config())
    for r in records:
        said = r["text"].replace("<unk>", "\ufffd")  # the unit <unk> as one unit the vocabulary lacks
        expected = m.error_rates([vocab.encode(r["reference"])[0]], [vocab.encode(said)[0]], vocab)["cer"]
        assert r["cer"] == pytest.approx(expected, abs=1e-4)
    assert "3 with a label of their name, CER" in capsys.readouterr().err


def test_sound_models_are_tested_clean_muted_or_noisy_and_decode_sound_files(tmp_path, capsys):
    clips = tmp_path / "clips"
    m.write_synthetic_dataset(m.Config(output=str(clips), synthetic_clips=3), m.Vocabulary.seed())
    folder = str(clips / "Preprocessed_Video")  # mouth clips (mp4, silent) with their sound beside them (wav)
    for modality in ("audio", "av"):
        work = tmp_path / modality
        m.train(fast_cfg(work, epochs=1, modality=modality))
        for sound in ("clean", "mute", "5"):
            metrics = m.run_test(fast_cfg(work, decoder="ctc", sound=sound))
            assert metrics["modality"] == modality and metrics["sound"] == sound and metrics["n"] > 0
            assert json.loads((work / "test_metrics.json").read_text())["sound"] == sound
        capsys.readouterr()
        decoded = m.run_decode(fast_cfg(work, input=folder, decoder="ctc"))
        captured = capsys.readouterr()
        assert [d[0] for d in decoded] == ["synth_00000", "synth_00001", "synth_00002"] and "Skipped" not in captured.err
        (clips / "Preprocessed_Video" / "synth_00001.wav").unlink()
        decoded = m.run_decode(fast_cfg(work, input=folder, decoder="ctc"))
        err = capsys.readouterr().err
        if modality == "av":  # the mouth clip is there, its sound is not
            assert [d[0] for d in decoded] == ["synth_00000", "synth_00002"] and "synth_00001.mp4: no sound" in err
        else:  # no wav: the clip's own (silent) video is tried
            assert "synth_00001.mp4: no audio track" in err
        m.write_wav(clips / "Preprocessed_Video" / "synth_00001.wav", np.sin(np.arange(20_000) / 5).astype(np.float32))


def test_a_second_run_in_the_same_work_dir_must_say_resume(tmp_path):
    m.train(fast_cfg(tmp_path / "w", epochs=1))
    before = (tmp_path / "w" / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(m.UserError, match="--resume"):
        m.train(fast_cfg(tmp_path / "w", epochs=1))
    assert (tmp_path / "w" / "checkpoints" / "last.pt").read_bytes() == before


def test_resume_where_fp16_needs_a_scaler_accepts_a_checkpoint_saved_without_one(tmp_path, monkeypatch):
    m.train(fast_cfg(tmp_path / "w", epochs=1))  # on the CPU: the scaler is off and saves {}
    enabled = torch.amp.GradScaler("cpu", enabled=True)
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: enabled)  # as on a T4 or P100
    result = m.train(fast_cfg(tmp_path / "w", epochs=2, resume=True))
    assert [r["epoch"] for r in result["history"]] == [1, 2]


def test_resume_refuses_other_data_settings(tmp_path):
    m.train(fast_cfg(tmp_path / "w", epochs=1))
    with pytest.raises(m.UserError, match="split_seed: checkpoint 0, now 3"):
        m.train(fast_cfg(tmp_path / "w", epochs=2, resume=True, split_seed=3))


# A teacher's soft targets (--teacher) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """Trained teachers: an audio-visual run; a video run whose CTC head says conftest's UNIT on every frame; one
    of another vocabulary; one that held out other clips."""
    root, runs = tmp_path_factory.mktemp("teachers"), {}
    for name, extra in (("av", ["--modality", "av"]), ("unit", []), ("letters", ["--units", "letters"])):
        runs[name] = root / name
        m.train(m.parse_config(FAST + extra + ["--epochs", "1", "--no-diagnostics", "--work-dir", str(runs[name])]))
    saying_one_unit(runs["unit"])
    runs["other_split"] = root / "other_split.pt"
    state = torch.load(runs["unit"] / "checkpoints" / "best.pt", weights_only=False)
    state["config"]["split_seed"] = 9  # as a run with --split-seed 9 saves it
    torch.save(state, runs["other_split"])
    return runs


def test_a_teacher_reads_every_training_clip_once_and_no_validation_or_test_clip(tmp_path, teachers, monkeypatch):
    read, batch_inputs = [], m.batch_inputs
    def spy(ds, chosen, augment, *args, **kwargs):
        if augment.cfg.modality == "av":  # the teacher's reading
            read.extend(ds.samples[i].stem for i in chosen)
        return batch_inputs(ds, chosen, augment, *args, **kwargs)
    monkeypatch.setattr(m, "batch_inputs", spy)
    cfg = fast_cfg(tmp_path / "w", teacher=str(teachers["av"]))
    vocab = m.load_vocabulary(cfg)
    ds = m.load_dataset(cfg, vocab, torch.device("cpu"))
    targets = m.teacher_targets(cfg, ds, vocab, torch.device("cpu"))
    assert sorted(read) == sorted(ds.samples[i].stem for i in ds.trained()) and set(targets.index) == set(ds.trained())
    clips = ds.trained()[:3]
    soft = targets.batch(clips, 40, 30, torch.device("cpu"))
    frames = [ds.samples[i].frames for i in clips]
    assert soft.ctc.shape[:2] == (3, 40) and soft.ctc_known.sum(1).tolist() == frames
    assert soft.ctc[0, :frames[0]].exp().sum(-1) == pytest.approx(torch.ones(frames[0]), abs=1e-4)
    assert soft.dec_known.sum(1).tolist() == [len(ds.samples[i].ids) + 1 for i in clips]
    unknown = targets.batch([ds.subset("val")[0]], 40, 30, torch.device("cpu"))
    assert unknown.ctc_known.sum() == 0 and unknown.dec_known.sum() == 0


def test_a_student_learns_what_its_teacher_says(tmp_path, teachers, capsys):
    """Taught by a model that says UNIT on every frame, with all the loss on the teacher, a student says it too,
    whatever the labels say (from a frozen frontend's cached features, then unfrozen)."""
    taught = dict(teacher=str(teachers["unit"]), teacher_weight=1.0, ctc_weight=1.0, epochs=3, lr=3e-3, decoder="ctc",
                  freeze="frontend", unfreeze_at=3, feature_views=1)
    result = seeded_train(fast_cfg(tmp_path / "whole", **taught))
    out = capsys.readouterr().out
    assert "teacher: " in (tmp_path / "whole" / "diagnostics" / "setup.txt").read_text() and "soft targets of" in out
    assert "features of 48 clips cached" in out  # the frozen frontend's cache feeds the student
    vocab, ds = result["vocab"], result["dataset"]
    scored = m.evaluate(result["model"], ds, ds.subset("val"), vocab, fast_cfg(tmp_path, **taught), torch.device("cpu"),
                        ("ctc",))
    said = {vocab.decode(h[0][0]) for h in scored["rows"]["ctc"]}
    assert said == {UNIT}, said
    kd = [r["train_kd"] for r in result["history"]]
    assert kd[-1] < 0.5 * kd[0], kd


def test_a_teacher_of_other_units_or_other_held_out_clips_is_refused_and_time_warp_with_one(tmp_path, teachers):
    with pytest.raises(m.UserError, match=r"letters/checkpoints/best.pt reads \d+ units, this run \d+: a teacher must "
                                          "share the vocabulary"):
        m.train(fast_cfg(tmp_path / "a", teacher=str(teachers["letters"]), epochs=1))
    with pytest.raises(m.UserError, match="other_split.pt held out other clips than this run: split_seed 9 against 0. It may have "
                                          "trained on this run's validation or test clips"):
        m.train(fast_cfg(tmp_path / "b", teacher=str(teachers["other_split"]), epochs=1))
    with pytest.raises(m.UserError, match="--time-warp moves a clip's frames in time"):
        m.parse_config(FAST + ["--teacher", str(teachers["av"]), "--time-warp"])


DDP = FAST + ["--epochs", "3", "--max-frames", "300", "--dropout", "0", "--sync-batchnorm", "--decoder", "ctc",
              "--freeze", "frontend", "--unfreeze-at", "2", "--mode", "train"]  # cached features, then all parts
LOSSES = ("train_loss", "train_ctc", "train_att", "train_eval_loss", "val_loss")


def torchrun(args, processes=2, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={processes}", str(ROOT / "master_all_avsr.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def finished(process) -> str:
    output = process.stdout.read()
    assert process.wait(timeout=600) == 0, output
    return output


def test_torchrun_two_processes_train_as_one_with_the_same_global_batch_and_resume(tmp_path, teachers):
    """Augmentation on (every process draws the global batch alike); dropout off, as its masks are per process.
    The first epoch trains from a frozen frontend's cached features, the others everything; an audio-visual
    teacher's soft targets beside the labels (its reading leaves the random streams as they were)."""
    args = DDP + ["--ctc-weight-schedule", "1:0.6,2-:0.4>0.2", "--average-last", "2", "--time-budget", "600",
                  "--fit-budget", "--teacher", str(teachers["av"])] + extra_clips(tmp_path / "extra", 8)
    one = finished(run_script(args + ["--work-dir", str(tmp_path / "one")]))
    two = finished(torchrun(args + ["--work-dir", str(tmp_path / "two")]))
    assert "x 2 processes" in two and two.count("epoch   1/") == 1 == two.count("all 3 epochs fit")  # rank 0 alone speaks
    said = [m.re.findall(r"soft targets of (\d+) training clips", out) for out in (one, two)]
    assert said[0] == said[1] and len(said[1]) == 1
    assert two.strip().splitlines()[-1].startswith("CER=")  # then tests, once
    single, double = history_without_timings(tmp_path / "one"), history_without_timings(tmp_path / "two")
    assert len(single) == len(double) == 3
    assert [r["ctc_weight"] for r in double] == [0.6, 0.4, 0.2] and "+ 8 extra training clips" in two
    averaged = [torch.load(tmp_path / d / "checkpoints" / "averaged.pt", weights_only=False) for d in ("one", "two")]
    assert averaged[0]["averaged_epochs"] == averaged[1]["averaged_epochs"] == [2, 3]
    key = "encoder.encoders.0.feed_forward.w_1.weight"  # Adam magnifies the runs' float differences a little
    one_last = torch.load(tmp_path / "one" / "checkpoints" / "epochs" / "epoch_0003.pt")[key]
    a, b = averaged[0]["model"][key], averaged[1]["model"][key]
    assert (a - b).norm() < 0.05 * (a - one_last).norm()
    for a, b in zip(single, double):
        for k in LOSSES + ("train_kd",):
            assert b[k] == pytest.approx(a[k], rel=1e-4), (a["epoch"], k)

    killed_dir = tmp_path / "killed"
    killed = torchrun(args + ["--work-dir", str(killed_dir)], start_new_session=True)
    last = killed_dir / "checkpoints" / "last.pt"
    while not last.exists() and killed.poll() is None:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", str(killed_dir)])  # torchrun's workers have a process group of their own
    killed.wait()
    holder = m.lock_holder(killed_dir / ".lock")
    deadline = time.time() + 60
    while holder and m.alive(*holder) and time.time() < deadline:
        time.sleep(0.1)
    assert torch.load(last, weights_only=False)["epoch"] < 3
    assert "Resumed from" in finished(torchrun(args + ["--work-dir", str(killed_dir), "--resume"]))
    assert history_without_timings(killed_dir) == double


@pytest.mark.parametrize("encoder", ["mstcn", "dctcn"])
def test_torchrun_trains_the_tcn_encoders_as_one_process_does(tmp_path, encoder):
    """Their BatchNorm synchronised, two processes' first epoch is one process's (unsynchronised, 2e-3 apart); every
    branch takes part (DDP refuses a parameter that gets no gradient). A batch's padding enters BatchNorm's
    statistics (as in the team's code), and two processes pad to their own halves' longest clip: float-sized
    differences that Adam's early steps grow, more so through DC-TCN's many BatchNorms, hence the looser later bound."""
    args = FAST + ["--epochs", "2", "--max-frames", "300", "--dropout", "0", "--sync-batchnorm", "--decoder", "ctc",
                   "--encoder", encoder, "--mode", "train"]
    one = finished(run_script(args + ["--work-dir", str(tmp_path / "one")]))
    two = finished(torchrun(args + ["--work-dir", str(tmp_path / "two")]))
    assert "x 2 processes" in two and "x 2 processes" not in one
    single, double = history_without_timings(tmp_path / "one"), history_without_timings(tmp_path / "two")
    assert len(single) == len(double) == 2
    for a, b in zip(single, double):
        for k in LOSSES:
            assert b[k] == pytest.approx(a[k], rel=2e-4 if a["epoch"] == 1 else 1e-2), (a["epoch"], k)


CU128 = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.8-2.10's CUDA 12.8 wheels
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


def test_a_gpu_the_torch_build_cannot_run_is_named_with_the_fix():
    problem = m.gpu_build_problem("Tesla P100-PCIE-16GB", (6, 0), CU128, "2.10.0+cu128", "12.8")
    assert "Tesla P100-PCIE-16GB" in problem and "6.0" in problem and "2.10.0+cu128" in problem
    assert "whl/cu126" in problem and "sm_120" in problem
    assert m.gpu_build_problem("Tesla T4", (7, 5), CU128, "2.10.0+cu128", "12.8") is None
    assert m.gpu_build_problem("Tesla P100", (6, 0), CU126, "2.10.0+cu126", "12.6") is None
    assert m.gpu_build_problem("GTX 1080", (6, 1), CU126, "2.10.0+cu126", "12.6") is None  # sm_60 runs on 6.1
    assert m.gpu_build_problem("RTX 3090", (8, 6), ["sm_80"], "x", "12.8") is None
    assert m.gpu_build_problem("RTX 5090", (12, 0), ["sm_80", "compute_90"], "x", "12.8") is None  # PTX, JIT
    assert "get-started" in m.gpu_build_problem("RTX 5090", (12, 0), CU126, "x", "12.6")


def test_more_torchrun_processes_than_gpus_are_refused_with_the_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(m.UserError, match=r"than it has GPUs \(1\).*--nproc_per_node 1"):
        m.pick_device("auto")


def test_compile_wraps_the_encoding_and_skips_gpus_before_compute_capability_7(monkeypatch, capsys):
    model = m.build_model(m.Config(preset="tiny", input_size=44), m.Vocabulary.seed().size)
    plain = model.encode
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100")
    m.compile_model(model, torch.device("cuda", 0))
    assert model.encode == plain and "Tesla P100 has 6.0" in capsys.readouterr().out
    m.compile_model(model, torch.device("cpu"))
    assert model.encode != plain and getattr(model.encode, "_torchdynamo_orig_callable", None) == plain
    assert set(model.state_dict()) == set(m.build_model(m.Config(preset="tiny"), m.Vocabulary.seed().size).state_dict())


# Starting from weights, freezing, unfreezing, the feature cache ---------------------------------------------

def test_unfrozen_parts_get_their_own_lower_learning_rate_ramped_up_from_their_epoch():
    model = m.build_model(m.Config(preset="tiny"), 230)
    cfg = m.Config(preset="tiny", freeze="frontend", unfreeze_at=3, unfreeze_lr=0.1, warmup_epochs=1, epochs=6)
    optimizer, scheduler = m.make_optimizer(model, cfg, 5)
    frontend = {id(p) for p in model.frontend.parameters()}
    assert [{id(p) for p in g["params"]} == frontend for g in optimizer.param_groups] == [False, True]
    lrs = []
    for _ in range(30):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert all(rate == 0 for _, rate in lrs[:10])  # epochs 1 and 2: frozen
    for k in range(10, 30):
        assert lrs[k][1] == pytest.approx(0.1 * lrs[k][0] * min((k - 9) / 5, 1)), k
    for_good = m.make_optimizer(model, m.dataclasses.replace(cfg, unfreeze_at=0), 5)[0]
    assert len(for_good.param_groups) == 1 and not frontend & {id(p) for p in for_good.param_groups[0]["params"]}


def seeded_train(cfg, run=None, **kwargs) -> dict:
    """As main() starts a run (m.train, or `run`): seeded, so that runs in one process can be compared."""
    torch.manual_seed(cfg.seed)
    m.random.seed(cfg.seed)
    return (run or m.train)(cfg, **kwargs)


def state_of(work: Path) -> dict:
    return torch.load(work / "checkpoints" / "last.pt", weights_only=False)


def test_a_frozen_frontend_stays_put_trains_from_its_cache_then_unfreezes_and_resumes_exactly(tmp_path, capsys):
    seeded_train(fast_cfg(tmp_path / "start", epochs=1))
    start = state_of(tmp_path / "start")["model"]
    frozen = dict(init_from=str(tmp_path / "start" / "checkpoints" / "last.pt"), freeze="frontend", unfreeze_at=3,
                  epochs=3, feature_views=2)
    seeded_train(fast_cfg(tmp_path / "cut", **frozen), done=lambda row: row["epoch"] == 2)
    out = capsys.readouterr().out
    assert "features of 48 clips cached, center crop and 2 training views" in out and "unfrozen" not in out
    after_two = state_of(tmp_path / "cut")["model"]
    for key in start:  # weights and BatchNorm statistics alike: the frozen frontend is in eval mode
        assert torch.equal(after_two[key], start[key]) == key.startswith("frontend."), key
    seeded_train(fast_cfg(tmp_path / "cut", resume=True, **frozen))
    assert "epoch 3: frontend unfrozen, at 0.1 x the learning rate" in capsys.readouterr().out
    resumed = state_of(tmp_path / "cut")
    assert not torch.equal(resumed["model"]["frontend.frontend3D.0.weight"], start["frontend.frontend3D.0.weight"])
    assert not torch.equal(resumed["model"]["frontend.frontend3D.1.running_mean"],
                           start["frontend.frontend3D.1.running_mean"])
    seeded_train(fast_cfg(tmp_path / "whole", **frozen))
    whole = state_of(tmp_path / "whole")
    assert history_without_timings(tmp_path / "cut") == history_without_timings(tmp_path / "whole")
    assert all(torch.equal(resumed["model"][k], whole["model"][k]) for k in whole["model"])


@pytest.mark.parametrize("encoder", ["conformer", "mstcn"])
def test_training_from_the_cache_equals_training_through_the_frozen_frontend(tmp_path, encoder):
    """Without augmentation every view is the center crop, so the cache must change nothing but the speed."""
    plain = dict(epochs=2, freeze="frontend", random_crop=False, hflip_prob=0.0, time_mask=False, encoder=encoder)
    cached = seeded_train(fast_cfg(tmp_path / "cached", feature_views=2, **plain))["history"]
    direct = seeded_train(fast_cfg(tmp_path / "direct", feature_views=0, **plain))["history"]
    for a, b in zip(cached, direct):
        # float32 sums in another order (the frontend over other batches, another torch's kernels) moved these by
        # up to 1.1e-5 (torch 2.10.0) and 0 (2.13.0, one thread); a frontend left in training mode moves them 2.8e-2.
        # (A cache shifted by a frame moves them only 3e-5: the test below, on the features, catches that.)
        for k in LOSSES + ("val_cer_ctc", "train_cer_ctc"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), (a["epoch"], k)


def test_the_cache_holds_the_center_crop_and_augmented_views(tmp_path):
    cfg = fast_cfg(tmp_path, feature_views=3)
    vocab = m.load_vocabulary(cfg)
    ds = m.load_dataset(cfg, vocab, torch.device("cpu"))
    model = m.build_model(cfg, vocab.size).eval()
    bank = m.FeatureBank(model, ds, cfg, torch.device("cpu"))
    assert bank.views.shape == (4, int(ds.bank.lengths.sum()), 64)
    clips = ds.subset("val")[:3]
    frames, lengths = ds.bank.batch(clips)
    center = model.frontend(m.Augment(cfg, training=False)(frames, lengths)[0])
    features, same_lengths = bank.batch(clips, [0, 0, 0])
    assert torch.equal(same_lengths, lengths) and torch.allclose(features, center * (features != 0), atol=1e-5)
    assert torch.all(features[1, lengths[1]:] == 0) and torch.all(features[1, :lengths[1]].abs().sum(-1) > 0)
    train = ds.subset("train")[:4]
    views = [bank.batch(train, [v] * 4)[0] for v in range(4)]
    assert not any(torch.equal(views[a], views[b]) for a in range(4) for b in range(a + 1, 4))  # crops and flips
    assert torch.all(bank.views[1:, bank.offsets[clips[0]]] == 0)  # no training views of validation clips


def test_a_tiny_audio_visual_model_learns_from_generated_sound_and_relies_on_it(tmp_path):
    cfg = m.Config(preset="tiny", modality="av", input_size=44, synthetic_clips=400, epochs=6, lr=2e-3,
                   warmup_epochs=1, max_frames=200, decoder="ctc", diagnostics=False, time_mask=False,
                   noise_snrs="20,inf", work_dir=str(tmp_path / "av"))
    result = seeded_train(cfg)
    history, ds, model = result["history"], result["dataset"], result["model"]
    assert ds.sound is not None and ds.noise is not None  # generated sound, and babble made of it
    # learnt on clips it never trained on (0.60 and 0.885 on one machine, lower on another: CPUs differ in the
    # last bits, and six epochs amplify them; a model that learnt nothing stays at 1.0)
    assert history[-1]["val_loss"] < 0.7 * history[0]["val_loss"]
    assert history[-1]["val_cer_ctc"] < 0.95
    val, vocab = ds.subset("val"), result["vocab"]
    heard = m.evaluate(model, ds, val, vocab, cfg, torch.device("cpu"), ("ctc",))
    deaf = m.evaluate(model, ds, val, vocab, m.dataclasses.replace(cfg, sound="mute"), torch.device("cpu"), ("ctc",))
    assert heard["loss"] == pytest.approx(history[-1]["val_loss"], rel=1e-4)
    assert deaf["loss"] > 1.1 * heard["loss"]  # muted, the same model does worse: it listens


def test_under_drop_sound_best_pt_weighs_validation_muted_as_training_mixes_it():
    """An epoch before the dropout started reads clean sound best and muted sound worst: it must not win."""
    rows = [{"epoch": 1, "val_cer_ctc": 0.55, "val_cer_att": 0.60, "val_muted_cer_ctc": 0.98, "val_muted_cer_att": 0.99,
             "muted_weight": 0.5},
            {"epoch": 2, "val_cer_ctc": 0.58, "val_cer_att": 0.62, "val_muted_cer_ctc": 0.84, "val_muted_cer_att": 0.90,
             "muted_weight": 0.5}]
    assert m.selection_cer(rows[0], "ctc") == pytest.approx(0.765) and m.selection_cer(rows[1], "ctc") == pytest.approx(0.71)
    assert m.selection_cer(rows[1], "beam") == pytest.approx(0.5 * 0.58 + 0.5 * 0.84)  # each the better scorer
    assert m.best_row(rows, "ctc")["epoch"] == 2
    assert m.best_row([rows[1], {**rows[1], "epoch": 3}], "ctc")["epoch"] == 3  # a tie: the later, as best.pt is saved
    assert m.selection_cer({**rows[0], "muted_weight": None}, "ctc") == 0.55  # no dropout: clean alone
    assert m.selection_cer(rows[0], "ctc", "train") == m.math.inf  # the probe is never muted


def test_a_drop_sound_run_drops_from_its_epoch_scores_validation_muted_and_says_how_best_pt_was_picked(
        tmp_path, capsys, monkeypatch):
    heard_as, evaluate = [], m.evaluate
    def spy(model, ds, index, vocab, cfg, *args, **kwargs):
        result = evaluate(model, ds, index, vocab, cfg, *args, **kwargs)
        heard_as.append((cfg.sound, index == ds.subset("val"), result["ctc"]["cer"]))
        return result
    monkeypatch.setattr(m, "evaluate", spy)
    dropping, drop_senses = [], m.Augment.drop_senses
    def drop_spy(self, video, audio):
        dropping.extend([self.drop] * self.train)
        return drop_senses(self, video, audio)
    monkeypatch.setattr(m.Augment, "drop_senses", drop_spy)
    cfg = m.Config(preset="tiny", modality="av", input_size=44, synthetic_clips=80, epochs=2, lr=2e-3,
                   warmup_epochs=1, max_frames=200, decoder="ctc", diagnostics=False, time_mask=False,
                   noise_snrs="20,inf", drop_sound=0.5, drop_from=2, work_dir=str(tmp_path / "av"))
    history = seeded_train(cfg)["history"]
    assert dropping == [False] * (len(dropping) // 2) + [True] * (len(dropping) // 2)  # --drop-from 2: epoch 2 only
    muted = [cer for sound, val, cer in heard_as if sound == "mute" and val]
    assert len(muted) == 2 and [r["val_muted_cer_ctc"] for r in history] == muted  # once an epoch, the val split
    assert all(r["muted_weight"] == 0.5 for r in history) and "muted ctc" in capsys.readouterr().out
    saved = list(csv.DictReader(open(tmp_path / "av" / "metrics.csv", encoding="utf-8-sig")))
    assert [float(r["val_muted_cer_ctc"]) for r in saved] == pytest.approx(muted)
    m.print_closing(cfg, {"history": history})
    assert "heard and muted, weighted by --drop-sound" in capsys.readouterr().out


def test_the_ctc_weight_schedule_weights_each_epochs_loss_and_is_logged(tmp_path):
    history = m.train(fast_cfg(tmp_path / "w", epochs=3, ctc_weight_schedule="1:1,2-3:0>0.5"))["history"]
    assert [r["ctc_weight"] for r in history] == [1.0, 0.0, 0.5]
    for r in history:  # every batch's loss is w * ctc + (1 - w) * att, so their means are too
        assert r["train_loss"] == pytest.approx(r["ctc_weight"] * r["train_ctc"] + (1 - r["ctc_weight"]) * r["train_att"],
                                                rel=1e-5)
    assert [float(r["ctc_weight"]) for r in csv.DictReader(open(tmp_path / "w" / "metrics.csv", encoding="utf-8-sig"))] == [1.0, 0.0, 0.5]
    assert "1 x CTC + 0 x attention by epoch (1:1,2-3:0>0.5: 1 in epoch 1 .. 0.5 in epoch 3; else 0.3)" in \
        (tmp_path / "w" / "diagnostics" / "setup.txt").read_text(encoding="utf-8")


def test_stalled_for_counts_the_epochs_since_the_best_validation_cer():
    rows = lambda *cers: [{"val_cer_ctc": c, "val_cer_att": None} for c in cers]
    cfg = m.Config(stop_after=2, decoder="ctc")
    assert m.stalled_for(rows(0.9, 0.8, 0.85, 0.8), cfg)  # equal is no better
    assert not m.stalled_for(rows(0.9, 0.8, 0.85, 0.79), cfg)
    assert not m.stalled_for(rows(0.9, 0.95), cfg)  # too few epochs to tell
    assert not m.stalled_for(rows(0.9, 0.95, 0.96), m.Config(stop_after=0, decoder="ctc"))


def test_stop_after_ends_like_a_finished_run_with_averaging_and_the_test(tmp_path, capsys, monkeypatch):
    """A validation CER that never moves: the run stops once it has not for 2 epochs."""
    monkeypatch.setattr(m, "selection_cer", lambda row, decoder, split="val": 0.5)
    cfg = fast_cfg(tmp_path / "w", epochs=20, stop_after=2, average_last=2, decoder="ctc")
    result = m.run_train(cfg)
    out = capsys.readouterr().out
    assert len(result["history"]) == 3 and "no better validation CER for 2 epochs" in out
    assert "epochs 2-3 averaged" in out and result["test"]["checkpoint"].endswith("averaged.pt")
    assert result["test_best"]["checkpoint"].endswith("best.pt")
    assert (tmp_path / "w" / "test_metrics_best.json").exists() and (tmp_path / "w" / "predictions.csv").exists()


def test_fit_budget_plans_the_epochs_the_time_left_holds_at_the_pace_so_far():
    history = [{"epoch_s": s} for s in (50.0, 70.0, 60.0)]  # 60 s an epoch, planned at 66
    cfg = m.Config(epochs=70, time_budget=58, fit_budget=True)
    assert m.epochs_that_fit(history, cfg, elapsed=190) == 3 + 48  # 3,290 s left: 49 epochs of 66 s, less one
    assert m.epochs_that_fit(history, m.dataclasses.replace(cfg, epochs=40), elapsed=190) == 40  # never more
    assert m.epochs_that_fit(history, cfg, elapsed=58 * 60 - 10) == 4  # this epoch at least
    assert m.fit_epoch(m.Config(warmup_epochs=3)) == 4 and m.fit_epoch(m.Config(warmup_epochs=2.5)) == 3
    assert m.fit_epoch(m.Config(warmup_epochs=0)) == 2


def test_a_run_fitted_to_its_budget_is_the_run_of_that_many_epochs_and_resumes_with_them(tmp_path, capsys,
                                                                                       monkeypatch):
    """The plan is made at the start of epoch 2 (after one warmup epoch); the clock is taken out of it."""
    monkeypatch.setattr(m, "epochs_that_fit", lambda history, cfg, elapsed: 3)
    seeded_train(fast_cfg(tmp_path / "short", epochs=3, average_last=2, decoder="ctc"), m.run_train)
    fitted = fast_cfg(tmp_path / "fitted", epochs=6, average_last=2, decoder="ctc", time_budget=600, fit_budget=True)
    history = seeded_train(fitted)["history"]
    assert "3 epochs, not 6; the schedule now ends with epoch 3" in capsys.readouterr().out
    fitted_rows, short_rows = history_without_timings(tmp_path / "fitted"), history_without_timings(tmp_path / "short")
    for row in fitted_rows[:1] + short_rows[:1]:  # epoch 1's row logs the next step's rate, before the plan
        row.pop("lr")
    assert len(history) == 3 and fitted_rows == short_rows
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=False) for d in ("fitted", "short"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the schedule of 3 epochs, bit for bit
    assert a["config"]["epochs"] == 3

    stopped = m.dataclasses.replace(fitted, work_dir=str(tmp_path / "stopped"))
    seeded_train(stopped, done=lambda row: row["epoch"] == 2)
    monkeypatch.setattr(m, "epochs_that_fit", lambda history, cfg, elapsed: 6)  # a resumed run does not plan again
    seeded_train(m.dataclasses.replace(stopped, resume=True), m.run_train)
    out = capsys.readouterr().out
    assert "keeps the 3 epochs it planned" in out and "--resume --epochs 23 --no-fit-budget to train on" in out
    assert history_without_timings(tmp_path / "stopped")[1:] == history_without_timings(tmp_path / "short")[1:]
    a, b = (torch.load(tmp_path / d / "checkpoints" / "averaged.pt", weights_only=False) for d in ("stopped", "short"))
    assert a["averaged_epochs"] == [2, 3] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_average_last_averages_the_last_epochs_measures_batchnorm_anew_and_is_used_by_default(tmp_path, capsys):
    work = tmp_path / "w"
    ds = m.run_train(fast_cfg(work, epochs=3, average_last=2))["dataset"]
    folder = work / "checkpoints"
    assert sorted(p.name for p in (folder / "epochs").iterdir()) == ["epoch_0002.pt", "epoch_0003.pt"]
    two, three = (torch.load(folder / "epochs" / f"epoch_000{e}.pt") for e in (2, 3))
    averaged = torch.load(folder / "averaged.pt", weights_only=False)
    assert averaged["averaged_epochs"] == [2, 3]
    for k, v in averaged["model"].items():
        if "running_" in k or "num_batches" in k:
            continue
        assert torch.allclose(v, (two[k] + three[k]) / 2, atol=1e-7), k
    stats = "frontend.frontend3D.1.running_mean"
    assert not torch.allclose(averaged["model"][stats], (two[stats] + three[stats]) / 2)  # measured, not averaged
    assert averaged["model"]["frontend.frontend3D.1.num_batches_tracked"] == len(  # one pass over the training clips
        m.eval_batches(ds, ds.subset("train"), fast_cfg(work)))
    assert m.checkpoint_path(fast_cfg(work)) == folder / "averaged.pt"
    capsys.readouterr()
    again = m.run_average(fast_cfg(work, average_last=2))
    redone = torch.load(again, weights_only=False)["model"]
    assert all(torch.equal(redone[k], averaged["model"][k]) for k in redone)
    assert "epochs 2-3 averaged" in capsys.readouterr().out
    m.run_average(fast_cfg(work, average_last=1))
    assert torch.equal(torch.load(folder / "averaged.pt", weights_only=False)["model"]["ctc.ctc_lo.weight"],
                       three["ctc.ctc_lo.weight"])
    m.train(fast_cfg(work, epochs=4, resume=True))  # trained on without averaging: averaged.pt is behind last.pt
    assert m.checkpoint_path(fast_cfg(work)) == folder / "best.pt"
    with pytest.raises(m.UserError, match="--average-last N"):
        m.run_average(fast_cfg(work))


def test_a_best_pt_lost_while_written_in_the_last_epoch_is_restored_on_resume_and_the_run_tested(tmp_path, capsys):
    work = tmp_path / "w"
    m.run_train(fast_cfg(work, epochs=2, decoder="ctc"))
    last, best = work / "checkpoints" / "last.pt", work / "checkpoints" / "best.pt"
    state = torch.load(last, weights_only=False)

    def lose_best(cers):
        for cer, row in zip(cers, state["history"]):
            row["val_cer_ctc"] = cer
        torch.save(state, last)
        best.unlink(missing_ok=True)
        capsys.readouterr()
        return m.run_train(fast_cfg(work, epochs=2, decoder="ctc", resume=True)), capsys.readouterr().out

    _, out = lose_best((0.7, 0.8))  # epoch 1 the best: its weights are gone for good
    assert "it cannot be restored" in out and "No " in out and not best.exists()
    resumed, out = lose_best((0.9, 0.8))  # epoch 2 the best: killed while writing its best.pt
    assert "restored from last.pt, epoch 2" in out and resumed["test"]["n"] == 6
    assert torch.equal(torch.load(best, weights_only=False)["model"]["ctc.ctc_lo.weight"],
                       state["model"]["ctc.ctc_lo.weight"])
    last.unlink()
    with pytest.raises(m.UserError, match="no last.pt to continue from"):  # a fresh run would overwrite best.pt
        m.train(fast_cfg(work, epochs=2))


def test_a_best_pt_left_at_an_earlier_epoch_by_a_kill_while_copying_is_not_tested_and_is_restored(tmp_path, capsys):
    work = tmp_path / "w"
    m.run_train(fast_cfg(work, epochs=1, decoder="ctc"))
    folder = work / "checkpoints"
    earlier = (folder / "best.pt").read_bytes()  # epoch 1's
    m.run_train(fast_cfg(work, epochs=2, decoder="ctc", resume=True))
    state = torch.load(folder / "last.pt", weights_only=True)
    for cer, row in zip((0.9, 0.8), state["history"]):  # epoch 2 the best
        row["val_cer_ctc"] = cer
    torch.save(state, folder / "last.pt")
    (folder / "best.pt").write_bytes(earlier)  # killed (or out of disk) while copying last.pt to best.pt
    capsys.readouterr()
    assert m.checkpoint_path(fast_cfg(work, decoder="ctc")) == folder / "last.pt"
    assert "does not hold the run's best epoch (2" in capsys.readouterr().out
    resumed = m.run_train(fast_cfg(work, epochs=2, decoder="ctc", resume=True))
    assert "best.pt held epoch 1 (the run was stopped while writing it): restored from last.pt, epoch 2" in \
        capsys.readouterr().out and resumed["test"]["n"] == 6
    assert torch.load(folder / "best.pt", weights_only=True)["epoch"] == 2
    assert m.checkpoint_path(fast_cfg(work, decoder="ctc")) == folder / "best.pt"


def test_a_learning_rate_or_weight_decay_given_anew_on_resume_takes_effect(tmp_path, capsys):
    work = tmp_path / "w"
    m.train(fast_cfg(work, epochs=1))
    result = m.train(fast_cfg(work, epochs=3, lr=5e-4, weight_decay=0.05, resume=True), done=lambda r: r["epoch"] == 2)
    assert "Resumed with --lr 0.0005 (was 0.001) and --weight-decay 0.05 (was 0.01)" in capsys.readouterr().out
    saved = state_of(work)
    steps = saved["scheduler"]["last_epoch"]
    assert saved["scheduler"]["base_lrs"] == [5e-4] and saved["optimizer"]["param_groups"][0]["weight_decay"] == 0.05
    warmup, total = m.schedule_steps(fast_cfg(work, epochs=3), steps // 2)
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4 * m.warmup_cosine(steps + 1, warmup, total))
    assert result["history"][1]["lr"] < 5e-4


def test_new_rates_on_resume_set_the_very_next_steps_learning_rate():
    model = torch.nn.Linear(2, 2)
    cfg = m.Config(epochs=3, lr=1e-3)
    optimizer, scheduler = m.make_optimizer(model, cfg, 10)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    m.apply_new_rates(optimizer, scheduler, m.dataclasses.replace(cfg, lr=5e-4))
    warmup, total = m.schedule_steps(cfg, 10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * m.warmup_cosine(8, warmup, total))


def test_augmentation_switched_on_later_trains_the_first_epochs_on_the_center_crop(tmp_path):
    plain = dict(random_crop=False, hflip_prob=0.0, time_mask=False)
    stop = lambda row: row["epoch"] == 3
    later = seeded_train(fast_cfg(tmp_path / "later", epochs=4, augment_from=3), done=stop)["history"]
    never = seeded_train(fast_cfg(tmp_path / "never", epochs=4, **plain), done=stop)["history"]
    assert [r["train_loss"] for r in later[:2]] == [r["train_loss"] for r in never[:2]]  # same draws, bit for bit
    assert later[2]["train_loss"] != never[2]["train_loss"]
    setup = (tmp_path / "later" / "diagnostics" / "setup.txt").read_text(encoding="utf-8")
    assert "augmentation: random 88-pixel crop, flip p 0.5, time mask (window 10, stride 25), from epoch 3" in setup
    assert "augmentation: none" in (tmp_path / "never" / "diagnostics" / "setup.txt").read_text(encoding="utf-8")


def test_decode_with_no_clip_to_decode_says_so(tmp_path):
    work = tmp_path / "w"
    m.train(fast_cfg(work, epochs=1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(m.UserError, match="no clip to decode .none found"):
        m.run_decode(fast_cfg(work, input=str(tmp_path / "empty")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.mp4").write_bytes(b"not a video")
    with pytest.raises(m.UserError, match="every one was skipped"):
        m.run_decode(fast_cfg(work, input=str(tmp_path / "bad")))


def test_a_state_dict_or_a_list_given_as_checkpoint_says_what_to_pass(tmp_path):
    work = tmp_path / "w"
    m.train(fast_cfg(work, epochs=1))
    weights = torch.load(work / "checkpoints" / "last.pt", weights_only=False)["model"]
    for name, content in (("weights.pth", weights), ("list.pt", [1, 2])):
        torch.save(content, tmp_path / name)
        with pytest.raises(m.UserError, match="not a checkpoint of this tool.*--init-from"):
            m.run_test(fast_cfg(work, checkpoint=str(tmp_path / name)))


def test_a_full_disk_or_a_folder_that_cannot_be_written_stops_with_what_to_do_and_keeps_the_file(tmp_path, monkeypatch):
    target = tmp_path / "kept.txt"
    target.write_text("before")
    def no_space(tmp):
        raise OSError(28, "No space left on device")
    with pytest.raises(m.UserError, match="No space left on device.*earlier content is kept.*Free some space"):
        m.atomic_write(target, no_space)
    assert target.read_text() == "before" and [p.name for p in tmp_path.iterdir()] == ["kept.txt"]
    monkeypatch.setattr(m.shutil, "disk_usage", lambda path: m.shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 1000))
    def torch_full(tmp):  # torch.save's way of saying it: a RuntimeError from the C++ stream
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")
    with pytest.raises(m.UserError, match="the disk is full"):
        m.atomic_write(tmp_path / "new.pt", torch_full)
    assert not (tmp_path / "new.pt").exists()
    with monkeypatch.context() as patch, pytest.raises(m.UserError, match="Permission denied.*make the folder writable"):
        patch.setattr(m.os, "open", lambda *a, **kw: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
        m.atomic_write(tmp_path / "ro" / "x.json", lambda tmp: None)


def test_a_second_run_in_a_work_dir_in_use_stops_at_once_and_a_dead_runs_lock_is_taken_over(tmp_path):
    work = tmp_path / "w"
    first = run_script(FAST + ["--epochs", "3", "--decoder", "ctc", "--work-dir", str(work)])
    while not (work / ".lock").exists() and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run([sys.executable, str(ROOT / "master_all_avsr.py"), "--mode", "test", "--work-dir",
                             str(work)], capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and f"in use by another run (process {first.pid} on" in second.stderr
    assert "Traceback" not in second.stderr
    output = first.stdout.read()
    assert first.wait(timeout=600) == 0, output
    assert not (work / ".lock").exists()  # released at the end
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (work / ".lock").write_text(f"{gone.pid} {m.socket.gethostname()}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".lock").write_text(f"{os.getpid()} another-machine")  # a Kaggle session's earlier output
    for folder in (work, tmp_path / "other"):
        taken = subprocess.run([sys.executable, str(ROOT / "master_all_avsr.py"), "--mode", "stats", "--work-dir",
                                str(folder), "--synthetic-clips", "12"], capture_output=True, text=True, timeout=300)
        assert taken.returncode == 0 and "Taking over" in taken.stdout, taken.stderr
        assert not (folder / ".lock").exists()


def test_ctrl_c_leaves_whole_files_and_says_how_to_resume(tmp_path):
    work = tmp_path / "w"
    run = run_script(FAST + ["--epochs", "40", "--decoder", "ctc", "--work-dir", str(work)],
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a shell starts it
    while not (work / "checkpoints" / "last.pt").exists() and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    try:
        run.wait(timeout=10)
    except subprocess.TimeoutExpired:  # Python loses a Ctrl-C that lands in a lookup C code makes and clears
        run.send_signal(signal.SIGINT)  # (once in CI, the run trained on to its end): pressed again, as a user would
    output = run.stdout.read()
    assert run.wait(timeout=120) == 130 and "Traceback" not in output, output
    assert "Interrupted" in output and f"--work-dir {work} --resume" in output
    assert torch.load(work / "checkpoints" / "last.pt", weights_only=False)["epoch"] >= 1
    assert not list((work / "checkpoints").glob(".*")) and not (work / ".lock").exists()


# Language model (--mode lm) -------------------------------------------------------------------------------------

def test_the_language_model_learns_the_labels_resumes_exactly_and_serves_test_and_decode(tmp_path, capsys):
    text = tmp_path / "more.txt"
    vocab = m.load_vocabulary(m.Config())
    known = vocab.decode(vocab.encode("قَالَ")[0])
    text.write_text(f"\ufeff{known}\n\n{known} {known}\nqq unknown\n", encoding="utf-8")  # BOM, a blank line
    small = dict(lm_kind="lstm", lm_dim=32, lm_layers=1, lm_epochs=20, lm_text=[str(text)], lr=1e-2)
    whole = m.train_lm(fast_cfg(tmp_path / "whole", mode="lm", **small))
    out = capsys.readouterr().out
    assert "more.txt: 2 sentences used, 1 skipped for units outside the vocabulary" in out and "'qq unknown'" in out
    history = whole["history"]
    assert len(history) == 20 and min(r["val_perplexity"] for r in history) < 0.7 * history[0]["val_perplexity"]
    assert whole["sentences"]["train"] == len(m.load_dataset(fast_cfg(tmp_path / "d"), vocab, torch.device("cpu"))
                                              .subset("train")) + 2
    saved = torch.load(tmp_path / "whole" / "lm" / "lm.pt", weights_only=True)
    assert saved["val_perplexity"] == min(r["val_perplexity"] for r in history) and saved["dims"]["dim"] == 32
    # ten epochs, then ten more with --resume: the same model, bit for bit
    m.train_lm(fast_cfg(tmp_path / "split", mode="lm", **{**small, "lm_epochs": 10}))
    with pytest.raises(m.UserError, match="last.pt exists: add --resume"):
        m.train_lm(fast_cfg(tmp_path / "split", mode="lm", **small))
    resumed = m.train_lm(fast_cfg(tmp_path / "split", mode="lm", resume=True, **small))
    assert resumed["history"] == history
    again = torch.load(tmp_path / "split" / "lm" / "lm.pt", weights_only=True)
    assert all(torch.equal(v, saved["model"][k]) for k, v in again["model"].items())
    with pytest.raises(m.UserError, match="resume with its settings"):
        m.train_lm(fast_cfg(tmp_path / "split", mode="lm", resume=True, **{**small, "lm_dim": 64}))
    # a model's run uses it in test (recorded) and decode; greedy decoding goes without, and says so
    work = tmp_path / "run"
    m.train(fast_cfg(work, epochs=1))
    lm_path = str(tmp_path / "whole" / "lm" / "lm.pt")
    # in a model's run dir it takes that run's split, whatever is asked: no tested label trains it
    beside = m.train_lm(fast_cfg(work, mode="lm", val_fraction=0.5))  # the default: an n-gram, counted at once
    assert beside["sentences"]["train"] == whole["sentences"]["train"] - 2 and beside["kind"] == "ngram"
    ngram = torch.load(work / "lm" / "lm.pt", weights_only=True)
    assert ngram["order"] == 7 and ngram["tables"]["counts_7"].sum() == sum(  # one 7-gram a unit and eos
        len(ids) + 1 for ids in m.lm_sentences(m.lm_run_settings(fast_cfg(work, mode="lm"))[0], vocab)["train"])
    assert beside["val_perplexity"] < history[-1]["val_perplexity"]  # synthetic words: counting them is enough
    metrics = m.run_test(fast_cfg(work, mode="test", beam_size=3, lm=lm_path, lm_weight=0.5))
    assert metrics["decoding"]["lm"] == lm_path and metrics["decoding"]["lm_weight"] == 0.5
    plain = m.run_test(fast_cfg(work, mode="test", beam_size=3))
    assert "lm" not in plain["decoding"]
    m.run_test(fast_cfg(work, mode="test", decoder="ctc", lm=lm_path))
    assert "--lm counts in the beam search only" in capsys.readouterr().out
    diagnosed = m.run_diagnose(fast_cfg(work, mode="diagnose", split="val", beam_size=3, lm=lm_path))
    assert "beam" in diagnosed["cer"] and f"language model {lm_path}" in capsys.readouterr().out
    clips = tmp_path / "clips"
    m.run_synth(fast_cfg(tmp_path / "s", output=str(clips), synthetic_clips=3))
    decoded = m.run_decode(fast_cfg(work, mode="decode", input=str(clips / "Preprocessed_Video"), beam_size=3,
                                    lm=lm_path))
    assert len(decoded) == 3
    files = m.run_export(fast_cfg(work, mode="export", lm=lm_path))  # the language model travels with the model
    assert Path(files["lm"]).read_bytes() == Path(lm_path).read_bytes()


@pytest.mark.parametrize("encoder", ["mstcn", "dctcn"])
def test_the_tcn_encoders_train_resume_and_decode(tmp_path, encoder):
    work = tmp_path / encoder
    first = m.run_train(fast_cfg(work, epochs=1, encoder=encoder, decoder="ctc"))
    assert first["history"][0]["train_loss"] < 1e4
    resumed = m.run_train(fast_cfg(work, epochs=2, encoder=encoder, decoder="ctc", resume=True))
    assert [r["epoch"] for r in resumed["history"]] == [1, 2] and resumed["test"]["n"] == 6
    state = torch.load(work / "checkpoints" / "last.pt", weights_only=True)
    assert state["config"]["encoder"] == encoder and any(k.startswith("encoder.encoder_trunk.") for k in state["model"])
    with pytest.raises(m.UserError, match="encoder: checkpoint"):  # another encoder is another model
        m.run_train(fast_cfg(work, epochs=3, encoder="conformer", decoder="ctc", resume=True))
