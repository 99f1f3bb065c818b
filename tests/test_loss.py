"""Section 6: the joint CTC / label-smoothed attention loss, against plain formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import m


def test_decoder_io_adds_sos_and_eos_and_pads():
    ys_in, ys_out = m.decoder_io([[5, 6, 7], [8]], 99, "cpu")
    assert ys_in.tolist() == [[99, 5, 6, 7], [99, 8, 99, 99]]
    assert ys_out.tolist() == [[5, 6, 7, 99], [8, 99, -1, -1]]


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_attention_loss_is_kl_to_the_smoothed_target_summed_over_tokens_divided_by_batch(smoothing):
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 11)
    ys_out = torch.tensor([[1, 2, 3, 4], [5, 6, -1, -1], [7, -1, -1, -1]])
    log_probs = logits.log_softmax(-1)
    expected = 0.0
    for b in range(3):
        for t in range(4):
            if ys_out[b, t] < 0:
                continue
            target = torch.full((11,), smoothing / 10)
            target[ys_out[b, t]] = 1 - smoothing
            expected += sum(p * (math.log(p) - lp) for p, lp in zip(target.tolist(), log_probs[b, t].tolist()) if p > 0)
    assert m.attention_loss(logits, ys_out, smoothing).item() == pytest.approx(expected / 3, rel=1e-5)


def test_ctc_loss_is_summed_over_the_batch_and_divided_by_it():
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 6)
    lengths = torch.tensor([9, 7])
    targets = [[1, 2, 3], [4, 4]]
    per_clip = [F.ctc_loss(logits[b, :lengths[b]].log_softmax(-1)[:, None], torch.tensor([t]),
                           lengths[b:b + 1], torch.tensor([len(t)]), reduction="sum") for b, t in enumerate(targets)]
    assert m.ctc_loss(logits, lengths, targets, 0).item() == pytest.approx(sum(per_clip).item() / 2, rel=1e-5)


@pytest.mark.parametrize("w", [0.0, 0.1, 0.5, 1.0])
def test_joint_loss_weights_the_two_parts(w):
    torch.manual_seed(0)
    cfg = m.Config(preset="tiny", ctc_weight=w)
    vocab = m.Vocabulary.seed()
    model = m.build_model(cfg, vocab.size).eval()
    x, lengths = torch.randn(2, 12, 88, 88), torch.tensor([12, 10])
    enc, mask = model.encode(x, lengths)
    parts = m.joint_loss(model, enc, mask, model.ctc(enc), lengths, [[3, 4, 5], [6, 227, 7]], vocab, cfg)
    assert parts["loss"].item() == pytest.approx(w * parts["ctc"].item() + (1 - w) * parts["att"].item(), rel=1e-6)
    assert parts["ctc"] > 0 and parts["att"] > 0


def test_the_baseline_trains_on_ctc_alone():
    cfg = m.Config(arch="baseline")
    vocab = m.Vocabulary.seed()
    model = m.build_model(cfg, vocab.size)
    x, lengths = torch.randn(2, 10, 88, 88), torch.tensor([10, 8])
    enc, mask = model.encode(x, lengths)
    parts = m.joint_loss(model, enc, mask, model.ctc(enc), lengths, [[3, 4], [5]], vocab, cfg)
    assert parts["att"].item() == 0 and parts["loss"] is parts["ctc"]


def test_the_ctc_weight_schedule_holds_ranges_goes_linearly_and_falls_back_to_the_fixed_weight():
    cfg = m.Config(epochs=60, ctc_weight=0.3, ctc_weight_schedule="1-20:0.7, 21-40:0.5, 41-:0.4>0.2")
    assert [m.ctc_weight_at(cfg, e) for e in (1, 20, 21, 40, 41, 60)] == [0.7, 0.7, 0.5, 0.5, 0.4, 0.2]
    assert m.ctc_weight_at(cfg, 50) == pytest.approx(0.4 - 0.2 * 9 / 19)
    gaps = m.Config(epochs=10, ctc_weight=0.3, ctc_weight_schedule="2:1,5-6:0>1")
    assert [m.ctc_weight_at(gaps, e) for e in range(1, 8)] == [0.3, 1.0, 0.3, 0.3, 0.0, 1.0, 0.3]
    assert m.at_epoch(cfg, 1).ctc_weight == 0.7 and cfg.ctc_weight == 0.3


@pytest.mark.parametrize("schedule, why", [("1-20", "not EPOCHS:WEIGHT"), ("0-3:0.5", "count from 1"),
                                           ("5-3:0.5", "low to high"), ("1-3:0.5>1.5", r"in \[0, 1\]"),
                                           ("1-3:0.1,3-4:0.2", "overlaps"), ("a-b:0.1", "not EPOCHS:WEIGHT")])
def test_a_schedule_that_cannot_work_is_refused_before_the_run_says_which_part(schedule, why):
    with pytest.raises(m.UserError, match=why):
        m.parse_config(["--ctc-weight-schedule", schedule])
