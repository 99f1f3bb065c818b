"""Section 9: dataset statistics (stats.json, stats.png) and the debugging checklist for a stuck model: learning
curves and their verdict, gradient flow, the two losses, worst clips, unit confusions, the settings' sanity,
parameter updates, --mode sanity and --mode diagnose."""
import csv
import json
import random
from pathlib import Path

import editdistance
import numpy as np
import pytest
import torch

from conftest import m


def test_stats_mode_reports_what_seed_001_shows(cfg, synthetic_root, capsys):
    cfg = m.dataclasses.replace(cfg, mode="stats", data_dir=str(synthetic_root))
    stats = m.run_stats(cfg)
    ds = m.load_dataset(cfg, m.load_vocabulary(cfg), torch.device("cpu"))
    frames = [s.frames for s in ds.samples]
    units = [len([i for i in s.ids if i != m.SPECIALS["<space>"]]) for s in ds.samples]
    assert stats["clips"] == 24 and sum(stats["splits"].values()) == 24
    assert (stats["frames"]["min"], stats["frames"]["max"]) == (min(frames), max(frames))
    assert stats["frames"]["mean"] == round(float(np.mean(frames)), 2)
    assert (stats["label_units"]["min"], stats["label_units"]["max"]) == (min(units), max(units))
    assert sum(stats["unit_frequency"].values()) == sum(units)
    assert sum(stats["frames"]["histogram"].values()) == 24
    all_pixels = ds.bank.frames.double() / 255
    assert abs(stats["pixel_mean"] - all_pixels.mean().item()) < 1e-4
    assert abs(stats["pixel_std"] - all_pixels.std().item()) < 1e-3
    out = capsys.readouterr().out
    assert f"frames a clip: min {min(frames)}  max {max(frames)}" in out and "pixel mean" in out
    work = Path(cfg.work_dir)
    assert json.loads((work / "stats.json").read_text(encoding="utf-8")) == json.loads(json.dumps(stats))
    assert (work / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# The debugging checklist for a stuck model -------------------------------------------------------------------

FAST = ["--preset", "tiny", "--input-size", "44", "--synthetic-clips", "48", "--max-frames", "400",
        "--warmup-epochs", "1"]
FATHA, KASRA, DAMMA, SHADDA = "\u064e", "\u0650", "\u064f", "\u0651"
BA, TA, THA, SIN = "\u0628", "\u062a", "\u062b", "\u0633"


def fast_cfg(work, *flags, **changes):
    return m.dataclasses.replace(m.parse_config(FAST + list(flags) + ["--work-dir", str(work)]), **changes)


def read_csv(path):
    return list(csv.DictReader(open(path, encoding="utf-8-sig")))


def test_alignment_is_a_minimal_edit_path():
    rng = random.Random(0)
    for _ in range(200):
        ref = [rng.choice("abcd") for _ in range(rng.randint(0, 9))]
        hyp = [rng.choice("abcd") for _ in range(rng.randint(0, 9))]
        pairs = m.alignment(ref, hyp)
        assert [r for r, _ in pairs if r is not None] == ref and [h for _, h in pairs if h is not None] == hyp
        assert sum(r != h for r, h in pairs) == editdistance.eval(ref, hyp)


def test_confusions_split_letter_errors_from_diacritic_errors():
    vocab = m.Vocabulary.seed()
    ids = lambda units: [vocab.ids[m.normalize_unit(u)] for u in units]
    # ba-fatha read as ba-kasra (only the diacritic), ta-kasra as tha-kasra (only the letter),
    # sin-damma deleted, ba-shadda-fatha right
    refs = [ids([BA + FATHA, TA + KASRA, SIN + DAMMA, BA + SHADDA + FATHA])]
    hyps = [ids([BA + KASRA, THA + KASRA, BA + SHADDA + FATHA])]
    pairs = m.unit_pairs(refs, hyps, vocab)
    s = m.confusion_summary(pairs)
    assert (s["reference_units"], s["substitutions"], s["deletions"], s["insertions"]) == (4, 2, 1, 0)
    assert s["substitutions_only_diacritic"] == s["substitutions_only_letter"] == 0.5
    assert s["letter_right"] == pytest.approx(2 / 3) and s["diacritic_right"] == pytest.approx(2 / 3)
    assert m.diacritic_of(m.normalize_unit(BA + FATHA + SHADDA)) == "shadda+fatha" and m.diacritic_of(BA) == "none"
    rows = {(r["level"], r["reference"], r["hypothesis"]): r["count"] for r in m.confusion_rows(pairs)}
    assert rows[("diacritic", "fatha", "kasra")] == 1 and rows[("letter", TA, THA)] == 1
    assert rows[("diacritic", "damma", "")] == 1 and rows[("letter", BA, BA)] == 2
    matrix = m.confusion_matrix(m.pairs_by(pairs, m.diacritic_of), ["fatha", "kasra", "damma", "shadda+fatha"])
    assert matrix[0].tolist() == [0, 1, 0, 0, 0, 0] and matrix[2, -1] == 1 and matrix[3, 3] == 1
    text = "\n".join(m.confusion_lines(pairs))
    assert f"{TA} -> {THA}: 1" in text and "fatha -> kasra: 1" in text and "only the diacritic wrong" in text


def rows_of(train, val, same=0.0):
    return [{"epoch": e + 1, "train_cer_ctc": t, "train_cer_att": None, "val_cer_ctc": v, "val_cer_att": None,
             "val_same_hyp": same} for e, (t, v) in enumerate(zip(train, val))]


@pytest.mark.parametrize("train, val, same, verdict", [
    ([0.6, 0.3, 0.1, 0.05, 0.03], [0.7, 0.55, 0.56, 0.58, 0.61], 0.0,
     "overfitting: train CER 0.030, val CER 0.610 and rising for 3 epochs (best 0.550 at epoch 2)"),
    ([0.6, 0.3, 0.1, 0.05, 0.03, 0.02], [0.7, 0.55, 0.6, 0.55, 0.58, 0.6], 0.0,  # a tie: best.pt is the later
     "overfitting: train CER 0.020, val CER 0.600 and rising for 2 epochs (best 0.550 at epoch 4)"),
    ([0.6, 0.3, 0.1, 0.05, 0.03], [0.7, 0.55, 0.56, 0.55, 0.555], 0.0, "overfitting: train CER 0.030, val CER 0.555 "
                                                                       "and not better for 1 epoch (best 0.550 at "
                                                                       "epoch 4)"),
    ([0.6, 0.3, 0.2], [0.7, 0.55, 0.45], 0.0, "overfitting begins"),
    ([0.86, 0.85, 0.85, 0.85, 0.86], [0.87, 0.85, 0.86, 0.85, 0.86], 0.0, "stuck, underfitting"),
    ([0.9, 0.8, 0.7], [0.92, 0.82, 0.75], 0.0, "underfitting: train CER 0.700, val CER 0.750 (val -0.170"),
    ([0.5, 0.3, 0.2], [0.55, 0.38, 0.3], 0.0, "learning: train CER 0.200, val CER 0.300"),
    ([0.2, 0.2, 0.2, 0.2, 0.2], [0.3, 0.29, 0.3, 0.3, 0.3], 0.0, "converged"),
    ([0.9, 0.9], [0.9, 0.9], 0.8, "collapsed: 80% of validation clips get the same hypothesis"),
    ([0.5, 0.1, 0.0, 0.0, 0.0], [1.0, 1.1, 1.2, 1.3, 1.3], 0.67, "overfitting: train CER 0.000, val CER 1.300 and "
                                                                  "not better for 4 epochs (best 1.000 at epoch 1); "
                                                                  "67% of validation clips get one and the same"),
    ([None] * 5, [0.9, 0.8, 0.81, 0.8, 0.82], 0.0, "val CER 0.820, not better in the last 3 epochs; over- or "
                                                  "underfitting needs the training probe"),
])
def test_the_verdict_reads_the_learning_curves(train, val, same, verdict):
    history = rows_of(train, val, same)
    assert m.fit_verdict(history, m.Config(patience=3, warmup_epochs=0)).startswith(verdict)


def test_a_stuck_run_that_augments_from_the_start_is_told_to_hold_augmentation_back():
    stuck = rows_of([0.86, 0.85, 0.85, 0.85, 0.86], [0.87, 0.85, 0.86, 0.85, 0.86], 0.0)
    collapsed = rows_of([0.9, 0.9, 0.9, 0.9], [0.9, 0.9, 0.9, 0.9], 0.8)
    hint = "--augment-from 16"
    for history in (stuck, collapsed):
        assert hint in m.fit_verdict(history, m.Config(patience=3, warmup_epochs=0, augment_from=1))
        assert hint not in m.fit_verdict(history, m.Config(patience=3, warmup_epochs=0, augment_from=16))
        nothing = m.Config(patience=3, warmup_epochs=0, random_crop=False, hflip_prob=0, time_mask=False)
        assert hint not in m.fit_verdict(history, nothing)
    learning = rows_of([0.5, 0.3, 0.2], [0.55, 0.38, 0.3], 0.0)
    assert hint not in m.fit_verdict(learning, m.Config(patience=3, warmup_epochs=0, augment_from=1))


class Parts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frontend, self.encoder, self.ctc = torch.nn.Linear(10, 10), torch.nn.Linear(10, 10), torch.nn.Linear(10, 1)


def test_gradient_flow_warns_of_vanishing_and_of_frozen_parts_that_move():
    model = Parts()
    lively = {"grad_frontend": 1.0, "grad_encoder": 2.0, "grad_ctc": 0.5}
    assert not [n for n in m.gradient_notes(lively, model) if n.startswith("warning")]
    notes = m.gradient_notes({**lively, "grad_frontend": 1e-6}, model)
    assert any(n.startswith("warning: frontend's gradients vanish") for n in notes)
    m.set_frozen(model, ["frontend"])
    assert m.frozen_parts(model) == ["frontend"]
    assert not [n for n in m.gradient_notes({**lively, "grad_frontend": 0.0}, model) if n.startswith("warning")]
    assert any("frontend is frozen but its gradients are not zero" in n for n in m.gradient_notes(lively, model))
    with pytest.raises(m.UserError, match="--freeze and --init-parts name parts of --arch baseline: cnn, lstm, ctc"):
        m.validate(m.Config(arch="baseline", freeze="frontend"))
    assert m.validate(m.Config(arch="baseline", freeze="cnn")).init_parts == ""  # unused


def test_a_loss_that_drowns_the_other_is_named():
    cfg, model = m.Config(ctc_weight=0.3), m.build_model(m.Config(preset="tiny"), 230)
    even = m.loss_note({"train_ctc": 10.0, "train_att": 5.0, "ctc_share": 0.46}, cfg, model)
    assert "46% of the objective" in even[0] and "warning" not in even[0]
    loud = m.loss_note({"train_ctc": 10.0, "train_att": 0.1, "ctc_share": 0.98}, cfg, model)
    assert "warning: the CTC loss makes 98% of the objective" in loud[0]


def test_hyperparameter_report_states_steps_warmup_and_parameters(cfg, capsys):
    cfg = m.dataclasses.replace(cfg, preset="tiny", input_size=44, max_frames=400, lr=0.1, epochs=2,
                                warmup_epochs=3, freeze="frontend")
    vocab = m.load_vocabulary(cfg)
    ds = m.load_dataset(cfg, vocab, torch.device("cpu"))
    model = m.build_model(cfg, vocab.size)
    m.set_frozen(model, m.frozen_in(cfg, 1))
    lines = m.report_setup(model, ds, cfg, Path(cfg.work_dir) / "setup.txt")
    steps = m.steps_per_epoch(ds, cfg)
    frozen = sum(p.numel() for p in model.frontend.parameters())
    trainable = sum(p.numel() for p in model.parameters()) - frozen
    text = "\n".join(lines)
    assert f"steps: {steps} optimizer steps an epoch, {2 * steps} in 2 epochs; warmup {3 * steps} steps" in text
    assert f"parameters: {trainable:,} trainable, {frozen:,} frozen" in text
    assert "peak learning rate 0.1" in text and "0.3 x CTC + 0.7 x attention" in text
    assert "warning: a peak learning rate of 0.1 is high" in text and "warning: the warmup never ends" in text
    assert (Path(cfg.work_dir) / "setup.txt").read_text(encoding="utf-8") == text + "\n"
    assert text in capsys.readouterr().out


def test_the_console_gives_an_epoch_a_line_and_its_verdict_then_a_closing_block(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(m, "PLAIN_PROGRESS_EVERY", 0.0)  # captured output is no terminal: plain progress lines
    work = tmp_path / "w"
    m.run_train(fast_cfg(work, "--epochs", "3"))
    lines = capsys.readouterr().out.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [e.split(" |")[0] for e in epochs] == ["epoch   1/3", "epoch   2/3", "epoch   3/3"]
    assert "ETA 0m" in epochs[0] and "ETA" not in epochs[-1]
    after = lines[lines.index(epochs[0]) + 1]
    assert after.startswith("verdict: ") and lines[lines.index(epochs[0]) + 2].startswith("  epoch 2: 1/")
    assert not any(line.startswith(("gradient norm:", "worst ", "losses: ")) for line in lines)  # --verbose shows them
    assert any(line.startswith("  epoch 1: 1/") for line in lines)  # a progress line a batch here
    closing = lines[-4:]
    assert closing[0].startswith("Finished after epoch 3: the best was epoch ") and f"Files in {work}" in closing[1]
    assert f"--mode decode --work-dir {work}" in closing[2] and closing[3].startswith("CER=")


def test_every_epoch_writes_the_checklist_with_the_right_numbers(tmp_path, capsys):
    work = tmp_path / "w"
    cfg = fast_cfg(work, "--epochs", "2", "--freeze", "frontend", "--log-param-updates", "--worst-k", "3",
                   "--train-eval-clips", "12", "--verbose")
    result = m.train(cfg)
    out = capsys.readouterr().out
    model, ds, vocab = result["model"], result["dataset"], result["vocab"]
    rows = read_csv(work / "metrics.csv")
    assert len(rows) == 2 and all(r["verdict"] for r in rows) and out.count("verdict: ") == 2
    # the train side of the curves is the fixed probe, scored like validation, here by the final model
    probe = m.training_probe(ds, cfg)
    assert len(probe) == 12 and set(probe) <= set(ds.subset("train"))
    scores = m.evaluate(model, ds, probe, vocab, cfg, torch.device("cpu"))
    assert float(rows[-1]["train_cer_ctc"]) == pytest.approx(scores["ctc"]["cer"])
    assert float(rows[-1]["train_eval_loss"]) == pytest.approx(scores["loss"], rel=1e-5)
    # gradient flow: the frozen frontend gets none and is said to be frozen; every other part gets some
    assert float(rows[0]["grad_frontend"]) == 0 and all(float(rows[0][f"grad_{g}"]) > 0
                                                        for g in ("proj_encoder", "encoder", "decoder", "ctc"))
    assert "frontend 0.00e+00 (frozen)" in out and "warning" not in out.split("parameters:")[1].split("\n")[0]
    share = 0.3 * float(rows[0]["train_ctc"]) / (0.3 * float(rows[0]["train_ctc"]) + 0.7 * float(rows[0]["train_att"]))
    assert float(rows[0]["ctc_share"]) == pytest.approx(share)
    # the worst validation clips of the last epoch, worst first, with their true CER
    val = m.evaluate(model, ds, ds.subset("val"), vocab, cfg, torch.device("cpu"))
    decoder = m.better_greedy_decoder(val)
    worst = [r for r in read_csv(work / "diagnostics" / "worst_samples.csv") if r["epoch"] == "2"]
    assert len(worst) == 3 and [float(r["cer"]) for r in worst] == sorted((float(r["cer"]) for r in worst), reverse=True)
    all_cers = [c["cer"] for c in m.scored_clips(val, ds, vocab, decoder)]
    assert float(worst[0]["cer"]) == max(all_cers)
    for r in worst:
        ref, hyp = vocab.encode(r["reference"])[0], vocab.encode(r["hypothesis"])[0]
        assert float(r["cer"]) == pytest.approx(m.error_rates([ref], [hyp], vocab)["cer"], abs=1e-4)
        assert f"  {r['id']}  {r['frames']} frames  CER" in out
    # confusions: the unit-level edits add up to the CER's numerator
    pairs = [r for r in read_csv(work / "diagnostics" / "confusions.csv") if r["level"] == "unit"]
    errors = sum(int(r["count"]) for r in pairs if r["reference"] != r["hypothesis"])
    refs = [[i for i in r if i != vocab.space] for r in val["rows"]["refs"]]
    assert errors == round(val[decoder]["cer"] * sum(len(r) for r in refs))
    for name in ("confusions.txt", "confusions.png", "setup.txt"):
        assert (work / "diagnostics" / name).stat().st_size > 0
    # parameter updates: a row per optimizer step and part; the frozen part never moves
    updates = read_csv(work / "diagnostics" / "param_updates.csv")
    steps = m.steps_per_epoch(ds, cfg)
    assert len(updates) == 2 * steps * 5 and {r["step"] for r in updates} == {str(s) for s in range(1, 2 * steps + 1)}
    assert all(float(r["update_norm"]) == 0 for r in updates if r["group"] == "frontend")
    assert all(float(r["update_ratio"]) > 0 for r in updates if r["group"] != "frontend" and float(r["lr"]) > 0)
    assert any(float(r["lr"]) > 0 for r in updates)
    final = {r["group"]: float(r["param_norm"]) for r in updates if r["step"] == str(2 * steps)}
    for group, params in m.module_groups(model).items():
        assert final[group] == pytest.approx(torch.nn.utils.get_total_norm([p.detach() for p in params]).item())


def test_a_run_built_to_overfit_is_called_overfitting(tmp_path, capsys):
    cfg = fast_cfg(tmp_path / "w", "--epochs", "200", "--lr", "5e-3", "--no-random-crop", "--hflip-prob", "0",
                   "--no-time-mask", "--patience", "3", "--worst-k", "0")
    vocab = m.load_vocabulary(cfg)
    ds = m.load_dataset(cfg, vocab, torch.device("cpu"))
    train = ds.subset("train")
    few = m.Dataset(ds.samples, ds.bank, {"train": train[:4], "val": train[4:16]})  # 4 clips to learn by heart
    learnt = lambda row: min(row["train_cer_ctc"], row["train_cer_att"]) < 0.1
    history = m.train(cfg, few, done=learnt)["history"]
    assert learnt(history[-1]), "the 4 clips were not learnt"
    assert history[-1]["verdict"].startswith("overfitting: train CER"), history[-1]["verdict"]
    assert f"verdict: {history[-1]['verdict']}" in capsys.readouterr().out


def test_sanity_mode_learns_a_few_clips_and_says_how_fast(tmp_path, capsys):
    work = tmp_path / "w"
    result = m.main(FAST + ["--mode", "sanity", "--work-dir", str(work), "--sanity-clips", "4", "--lr", "3e-3",
                            "--sanity-epochs", "150"])
    out = capsys.readouterr().out
    assert result["passed"] and "sanity passed" in out and len(result["clips"]) == 4
    rows = read_csv(work / "sanity" / "metrics.csv")
    first = lambda key: next(int(r["epoch"]) for r in rows if float(r[key]) <= m.SANITY_CER)
    assert result["epochs_to_learn"] == {"greedy CTC": first("val_cer_ctc"), "attention": first("val_cer_att")}
    assert int(rows[-1]["epoch"]) == max(result["epochs_to_learn"].values())  # stops once every decoder knows them
    assert f"greedy CTC: CER about 0 after {first('val_cer_ctc')} epochs" in out
    assert json.loads((work / "sanity" / "sanity.json").read_text())["passed"] is True


def test_sanity_mode_that_cannot_learn_says_so_and_what_to_check(tmp_path, capsys):
    result = m.main(FAST + ["--mode", "sanity", "--work-dir", str(tmp_path / "w"), "--sanity-clips", "3", "--lr",
                            "1e-9", "--sanity-epochs", "2", "--frontend", "noise"])
    out = capsys.readouterr().out
    assert not result["passed"] and result["epochs_to_learn"] == {"greedy CTC": None, "attention": None}
    assert "sanity FAILED: the 3 clips (--frontend noise) were not learnt in 2 epochs" in out and "--lr (1e-09)" in out


def test_diagnose_mode_runs_the_checklist_on_a_checkpoint(tmp_path, capsys):
    work = tmp_path / "w"
    m.train(fast_cfg(work, "--epochs", "2"))
    report = m.main(FAST + ["--mode", "diagnose", "--work-dir", str(work), "--split", "val", "--beam-size", "3"])
    out = capsys.readouterr().out
    folder = work / "diagnose_val"
    test = m.run_test(fast_cfg(work, "--split", "val", "--beam-size", "3"))
    assert report["cer"]["beam"] == pytest.approx(test["cer"]) and report["cer"]["ctc"] == pytest.approx(test["cer_greedy_ctc"])
    assert set(report["cer"]) == {"ctc", "attention", "beam"} and report["clips"] == test["n"]
    assert all(report[f"grad_{g}"] > 0 for g in ("frontend", "proj_encoder", "encoder", "decoder", "ctc"))
    clips = read_csv(folder / "clips_by_cer.csv")
    assert len(clips) == test["n"] and float(clips[0]["cer"]) == max(float(c["cer"]) for c in clips)
    predictions = {r["id"]: r["hypothesis"] for r in read_csv(work / "predictions.csv")}
    assert all(predictions[c["id"]] == c["hypothesis"] for c in clips)
    assert report["verdict"] and f"verdict of its last epoch (2): {report['verdict']}" in out
    for name in ("report.json", "setup.txt", "confusions.txt", "confusions.csv", "confusions.png", "curves.png"):
        assert (folder / name).stat().st_size > 0
