"""CLI section: a flag for every setting, --config files, notebook arguments and errors users can act on."""
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, m


def test_every_config_field_is_a_flag():
    parser = m.build_parser()
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in m.dataclasses.fields(m.Config)} <= flags


def test_flags_win_over_the_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"crop_size": 64, "input_size": 64, "seed": 7, "time_mask": False}))
    cfg = m.parse_config(["--config", str(path), "--seed", "9", "--hflip-prob", "0.25", "--no-word-boundary"])
    assert (cfg.crop_size, cfg.seed, cfg.hflip_prob, cfg.time_mask, cfg.word_boundary) == (64, 9, 0.25, False, False)


def test_an_av_run_drops_sound_by_its_measured_default_unless_a_flag_or_the_config_file_says(tmp_path):
    assert m.parse_config(["--modality", "av"]).drop_sound == 0.2  # MEASUREMENTS.md: modality dropout
    assert m.parse_config(["--modality", "av", "--drop-sound", "0"]).drop_sound == 0
    assert m.parse_config([]).drop_sound == 0 and m.parse_config(["--modality", "audio"]).drop_sound == 0
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"modality": "av", "drop_sound": 0.1}))
    assert m.parse_config(["--config", str(path)]).drop_sound == 0.1
    path.write_text(json.dumps({"modality": "av"}))
    assert m.parse_config(["--config", str(path)]).drop_sound == 0.2
    assert "0.2 under --modality av" in " ".join(m.build_parser().format_help().split())


def test_a_config_file_with_an_unknown_setting_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"crop_sise": 64}))
    with pytest.raises(m.UserError, match="crop_sise"):
        m.parse_config(["--config", str(path)])


def test_notebook_kernel_arguments_are_ignored(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel.json"])
    assert m.in_notebook()
    seen = {}
    monkeypatch.setitem(m.MODES, "train", lambda cfg: seen.setdefault("cfg", cfg))
    m.main()
    assert seen["cfg"] == m.Config()


def run_script(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "master_all_avsr.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_user_errors_exit_2_with_a_message_and_no_traceback(tmp_path):
    result = run_script("--mode", "stats", "--data-dir", str(tmp_path / "missing"), cwd=tmp_path)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_synth_then_stats_from_the_command_line(tmp_path):
    result = run_script("--mode", "synth", "--output", "data", "--synthetic-clips", "6", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run_script("--mode", "stats", "--data-dir", "data", "--work-dir", "w", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "clips 6" in result.stdout and (tmp_path / "w" / "stats.png").exists()


@pytest.mark.parametrize("flags, complaint", [
    (["--accum-steps", "0"], "--accum-steps must be 1 or more"),
    (["--crop-size", "120"], "input <= crop <= frame size"),
    (["--ctc-weight", "1.5"], "--ctc-weight must lie in [0, 1]"),
    (["--modality", "audio", "--arch", "baseline"], "--arch baseline reads video only"),
    (["--modality", "av", "--time-warp"], "--time-warp changes a clip's frame count"),
    (["--sound", "loud"], "--sound clean, mute or one SNR"),
    (["--noise-snrs", "5,high"], "--noise-snrs takes SNRs in dB"),
    (["--grad-clip", "-1"], "--grad-clip and --adam-eps must be above 0"),
    (["--lr", "-1"], "--lr, --grad-clip"),
    (["--weight-decay", "-1"], "--weight-decay, --warmup-epochs and --time-budget must be 0 or more"),
    (["--dropout", "1.5"], "--dropout, --label-smoothing, --beta1 and --beta2 must lie in [0, 1)"),
    (["--label-smoothing", "2"], "--dropout, --label-smoothing"),
    (["--hflip-prob", "3"], "--hflip-prob must lie in [0, 1]"),
    (["--epochs", "0"], "--epochs, --max-frames"),
    (["--max-frames", "0"], "--epochs, --max-frames"),
    (["--test-fraction", "-0.5"], "--val-fraction and --test-fraction must be 0 or more"),
    (["--val-fraction", "0.5", "--test-fraction", "0.5"], "leave clips to train on"),
    (["--stop-after", "-1"], "--stop-after, --average-last and --extra-weight must be 0 or more"),
    (["--fit-budget"], "--fit-budget fits the epochs to --time-budget: give that too"),
    (["--std", "0"], "--std must be above 0"),
])
def test_settings_that_cannot_work_are_refused_up_front(flags, complaint):
    with pytest.raises(m.UserError, match=re.escape(complaint)):
        m.parse_config(flags)


def test_a_config_file_value_of_the_wrong_kind_or_choice_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": "ten", "decoder": "beam-ish", "accum_steps": "two"}))
    with pytest.raises(m.UserError) as e:
        m.parse_config(["--config", str(path)])
    assert "epochs = 'ten' should be a int" in str(e.value) and "--decoder 'beam-ish'" in str(e.value)


def test_a_config_file_that_is_not_an_object_of_settings_says_what_it_needs(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(["--preset", "tiny"]))
    with pytest.raises(m.UserError, match="holds a JSON list; it needs an object of settings"):
        m.parse_config(["--config", str(path)])


def damaged(data: bytes, rng) -> bytes:
    """Cut short, or a few bytes flipped."""
    if rng.random() < 0.5:
        return data[:rng.randrange(len(data))]
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def no_half_written(folder) -> bool:
    """atomic_write's temporary files start with a dot and hold the final name: none may be left."""
    return not [p for p in folder.rglob(".*") if p.name != ".lock"]


def test_fuzz_damaged_clips_labels_caches_checkpoints_and_settings_never_give_a_traceback(tmp_path):
    import random
    rng = random.Random(2026)
    data = tmp_path / "data"
    m.write_synthetic_dataset(m.Config(output=str(data), synthetic_clips=6, seed=4), m.Vocabulary.seed())
    files = sorted(p for p in data.rglob("*") if p.suffix in (".mp4", ".csv"))
    work = tmp_path / "w"
    cfg = m.Config(data_dir=str(data), videos_dir=str(data / "Preprocessed_Video"), work_dir=str(work),
                   preset="tiny", input_size=44, max_frames=400, epochs=1)
    m.load_dataset(cfg, m.Vocabulary.seed(), m.torch.device("cpu"))
    caches = sorted((work / "cache").iterdir())
    trained = m.dataclasses.replace(cfg, data="synthetic", synthetic_clips=12, work_dir=str(tmp_path / "t"))
    m.train(trained)
    checkpoint = tmp_path / "t" / "checkpoints" / "last.pt"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"preset": "tiny", "epochs": 3, "lr": 0.002, "ctc_weight_schedule": "1:0.7,2-:0.3"}))
    targets = [("data", f) for f in files] + [("cache", f) for f in caches] + [("checkpoint", checkpoint)] * 8 + \
        [("settings", settings)] * 8
    outcomes = {"ok": 0, "refused": 0}
    for trial in range(200):
        kind, path = rng.choice(targets)
        original = path.read_bytes()
        path.write_bytes(damaged(original, rng))
        try:
            if kind in ("data", "cache"):
                ds = m.load_dataset(cfg, m.Vocabulary.seed(), m.torch.device("cpu"))
                assert len(ds.samples) >= 5  # one damaged file costs one clip at most
                json.loads((work / "data_report.json").read_text(encoding="utf-8"))
            elif kind == "checkpoint":
                m.model_from_checkpoint(checkpoint, trained, m.torch.device("cpu"))
            else:
                m.parse_config(["--config", str(settings)])
            outcomes["ok"] += 1
        except m.UserError:
            outcomes["refused"] += 1
        finally:
            path.write_bytes(original)
        assert no_half_written(work), (trial, kind, path)
    assert sum(outcomes.values()) == 200 and min(outcomes.values()) > 10, outcomes


def test_help_gives_every_flag_its_text_in_groups_with_examples():
    helps, groups = m.settings_help()
    fields = [f.name for f in m.dataclasses.fields(m.Config)]
    assert set(helps) == set(fields) and all(helps[f] for f in fields), [f for f in fields if not helps.get(f)]
    assert groups["time_budget"] == "training" and groups["beam_size"] == "test and decode"
    text = m.build_parser().format_help()
    assert "minutes; stop with a checkpoint" in text and "\ntraining:\n" in text and "examples:" in text


def test_decode_prints_one_line_a_clip_whatever_its_name_holds(tmp_path, synthetic_root, capsys):
    work = tmp_path / "run"
    m.run_train(m.parse_config(["--preset", "tiny", "--input-size", "44", "--synthetic-clips", "24", "--epochs", "1",
                                "--decoder", "ctc", "--work-dir", str(work)]))
    clips = tmp_path / "clips"
    clips.mkdir()
    frames = m.read_video(next((synthetic_root / "Preprocessed_Video").glob("*.mp4")))
    names = ["two\nlines", "a\ttab", "=cmd|' -C calc'!A0", "\u0642\u064e\u0627\u0644\u064e \u200fmark"]
    for name in names:
        m.np.save(clips / f"{name}.npy", frames)
    capsys.readouterr()
    m.main(["--mode", "decode", "--work-dir", str(work), "--input", str(clips), "--nbest", "2", "--beam-size", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(names) and all(len(line.split("\t")) == 4 for line in lines)
    assert sorted({line.split("\t")[0] for line in lines}) == sorted(
        ["two\\nlines", "a\\ttab", "=cmd|' -C calc'!A0", "\u0642\u064e\u0627\u0644\u064e \\u200fmark"])
    written = m.csv.DictReader((work / "decode.csv").read_text(encoding="utf-8-sig").splitlines(keepends=True))
    assert sorted({row["name"] for row in written}) == sorted(names[:2] + ["'" + names[2], names[3]])


# Settings that take any text: paths and names, and values the run reads itself (an SNR list, a schedule, parts)
FREE_TEXT = {"work_dir", "data_dir", "videos_dir", "labels_dir", "cache_dir", "output", "vocab", "split_lists",
             "audio_dir", "noise", "noise_snrs", "sound", "init_from", "init_from_audio", "init_parts", "freeze", "teacher",
             "ctc_weight_schedule", "checkpoint", "input", "lm", "landmark_model", "host", "serve_allowed_hosts"}


def test_every_flag_with_a_set_of_values_refuses_any_other_from_the_command_line_and_a_config_file(capsys):
    """Walks every text setting of --help: one with a set of values (modes, devices, decoders, presets, encoders,
    ...) lists them in --help, and argparse and validate both refuse another, naming them."""
    choices, help_text = m.setting_choices(), " ".join(m.build_parser().format_help().split())
    assert set(choices["mode"]) == set(m.MODES) and choices["preset"] == tuple(m.PRESETS)
    for f in m.dataclasses.fields(m.Config):
        if f.type != "str" or f.name in FREE_TEXT:
            continue
        flag = "--" + f.name.replace("_", "-")
        assert f.name in choices, f"{flag} takes any text: give it its choices, or list it here as free text"
        assert getattr(m.Config(), f.name) in choices[f.name] and "{" + ",".join(choices[f.name]) + "}" in help_text
        with pytest.raises(SystemExit):
            m.parse_config([flag, "not-a-choice"])
        named = ", ".join(repr(c) for c in choices[f.name])
        assert f"argument {flag}: invalid choice: 'not-a-choice' (choose from {named})" in capsys.readouterr().err
        with pytest.raises(m.UserError, match=f"{flag} 'not-a-choice': choose one of {', '.join(choices[f.name])}"):
            m.validate(m.Config(**{f.name: "not-a-choice"}))  # as a --config file or a notebook gives it

