"""The batched joint CTC/attention beam search of section 7 (m.decode, --decoder beam) against ESPnet's own,
the one Auto-AVSR runs (espnet.nets.batch_beam_search.BatchBeamSearch with CTCPrefixScorer, set up as
auto_avsr's get_beam_search_decoder does), on the same encoder outputs, with this model's decoder and CTC head
loaded into ESPnet's Transformer Decoder and CTC modules (every key matched, strict), both in fp32 under
no_grad on one device. Per preset (tiny, small, base), weights (untrained; "trained": fitted to 4 of the clips
for --fit-steps steps, as bench/decode_speed.py does), beam (10, 40) and CTC weight (0.1, 0.3), one markdown
row: clips/s of ours (all clips in one m.decode call, after a 2-clip warm-up), clips/s of ESPnet (clip by
clip, as Auto-AVSR decodes, after a warm-up on 8 frames), their ratio, the share of clips whose best
hypotheses have the same tokens, and the largest |score difference| among those. With --espnet-clips N,
ESPnet runs on N clips picked evenly over the lengths (its cost grows with a clip's length), its rate
extrapolated, and the comparison covers those N. Clips that differ are listed (tokens and scores of both, and
each side's score for the other's hypothesis where it ended it, and the model's own score of each) on
stderr as they come and on stdout after the table.

What is set alike: ESPnet's weights {decoder: 1 - w, ctc: w, length_bonus: --length-bonus} (LengthBonus, as
auto_avsr adds it; a weight-0 scorer is dropped), pre_beam_score_key "full" (None at w = 1), pre-beam
int(1.5 * beam) = ours (both skip it when it would hold the whole vocabulary), sos = eos = <sos/eos>,
token_list = the vocabulary's units (ESPnet builds its debug strings from it every step, as in Auto-AVSR);
maxlenratio = --max-length-ratio and minlenratio = --min-length-ratio (Config's max_length_ratio and
min_length_ratio; default 0: at most one unit a frame, maxlen = the clip's encoder frames, with end
detection (M = 3, D = -10) on in both, and eos appended to every running hypothesis at the last step). Like
with like: our tokens come without sos/eos, so ESPnet's yseq is compared without its sos and trailing eos
(one, or two when eos was chosen at the last step); our returned score is ESPnet's Hypothesis.score (the
weighted sum, summed in ESPnet's order: decoder, length bonus, CTC (psi - parent psi), parent score; no final
score, no length normalisation). A difference to know: with --min-length-ratio > 0 ESPnet lets a hypothesis
end early and then drops it (its beam slot is lost for that step), ours forbids eos before min_len, so the
two can differ there by design (seen at --min-length-ratio 0.6: 2 of 8 tiny clips, ours finding the better
hypothesis, ESPnet having lost beam slots); the default 0 is unaffected.

Reading a differing clip: "X scores it" is the score X's search gave the other's best (among X's ended
hypotheses: both searches return them all), "rescored" the hypothesis' joint score straight from the model
(teacher-forced decoder + torch's CTC loss in float64). Both searches scoring both hypotheses alike, a
hair apart, is a near tie broken by float32 rounding; one search's score differing from "rescored" is that
search's error; a hypothesis missing from one side's list was pruned there (its path left the beam earlier).
Measured (2 CPU cores, OMP_NUM_THREADS=1, synthetic clips of 29-38 frames): the same best hypothesis on every
clip compared, tiny 32 clips x all 8 cases, small 8 clips (beam 10 and 40, w 0.1), base 2 clips (beam 10, w
0.3), also with --length-bonus 0.5 --max-length-ratio 0.5 and at w = 1; scores apart by at most 3.1e-5, one
or two float32 steps at scores of -100 to -150 (the decoder's attention runs through other kernels, ours
from cached keys, ESPnet's over the whole prefix again; the CTC recursion sums by logaddexp, ESPnet's by
logsumexp of stacked pairs); the modules' log-probs differ by at most 3e-6 (decoder) and 0 (CTC). No tie
was close enough to flip. (A half-edited master_all_avsr.py, imported mid-change once, did differ: ours scored
the same tokens lower than ESPnet and "rescored", and never ended ESPnet's best; the listing is made for that.)

Setup, beside the project (ESPnet without its ~25 dependencies: these modules need only torch, numpy and
packaging; flash_attn is optional, ESPnet prints a line when it is missing, silenced here; its loggers are
set to ERROR):
    python3 -m venv .espnet-venv && . .espnet-venv/bin/activate && pip install -r requirements.txt \
        && pip install --no-deps espnet==202511 && pip install packaging
(typeguard is not imported on this path; add it if another ESPnet module asks for it.)
Run (from the project root; on 2 CPU cores the whole table takes hours with ESPnet on all 64 clips, mostly
at base, beam 40, some 20 s a clip there; --espnet-clips 8 cuts that to minutes):
    OMP_NUM_THREADS=1 python bench/espnet_search.py --presets tiny --weights untrained,trained --beams 10 \
        --ctc-weights 0.3 --clips 8
    python bench/espnet_search.py --espnet-clips 8 > espnet_search.md     # the whole table
    python bench/espnet_search.py --device cuda ...                       # both searches on the GPU
"""
import argparse
import contextlib
import dataclasses
import io
import logging
import sys

import torch
import torch.nn.functional as F

from timing import m, quick_fit, timed

try:
    with contextlib.redirect_stdout(io.StringIO()):  # attention.py prints when flash_attn cannot be imported
        import espnet
        from espnet.nets.batch_beam_search import BatchBeamSearch
        from espnet.nets.pytorch_backend.ctc import CTC
        from espnet.nets.pytorch_backend.transformer.decoder import Decoder
        from espnet.nets.scorers.ctc import CTCPrefixScorer
        from espnet.nets.scorers.length_bonus import LengthBonus
except ImportError as e:
    sys.exit(f"bench/espnet_search.py needs ESPnet ({e}); set up a venv as its docstring says.")
logging.getLogger("espnet").setLevel(logging.ERROR)  # BeamSearch logs every step and warns at maxlen

defaults = m.Config()
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--presets", default="tiny,small,base")
parser.add_argument("--weights", default="untrained,trained")
parser.add_argument("--beams", default="10,40")
parser.add_argument("--ctc-weights", default="0.1,0.3")
parser.add_argument("--clips", type=int, default=64)
parser.add_argument("--espnet-clips", type=int, default=0, help="time ESPnet on N clips picked over the lengths "
                                                                "and extrapolate (0: all)")
parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
parser.add_argument("--fit-steps", type=int, default=30, help="steps that make the 'trained' weights")
parser.add_argument("--input-size", type=int, default=88)
parser.add_argument("--max-length-ratio", type=float, default=defaults.max_length_ratio)
parser.add_argument("--min-length-ratio", type=float, default=defaults.min_length_ratio)
parser.add_argument("--length-bonus", type=float, default=defaults.length_bonus)
args = parser.parse_args()

device = m.pick_device(args.device)
vocab = m.Vocabulary.seed()
V, EOS = vocab.size, vocab.sos_eos
base_cfg = m.Config(input_size=args.input_size, synthetic_clips=args.clips, lr=3e-3, warmup_epochs=0,
                    work_dir="runs/bench_espnet", amp="off", device=args.device, decoder="beam",
                    max_length_ratio=args.max_length_ratio, min_length_ratio=args.min_length_ratio,
                    length_bonus=args.length_bonus, nbest=10 ** 9)  # every ended hypothesis (explains differences)




def load_strict(module: torch.nn.Module, state: dict) -> torch.nn.Module:
    own = set(module.state_dict())
    assert own == set(state), f"only ESPnet's: {sorted(own - set(state))}, only ours: {sorted(set(state) - own)}"
    module.load_state_dict(state, strict=True)
    return module.to(device).eval()


def espnet_modules(model):
    """ESPnet's Decoder and CTC with our weights (Auto-AVSR's state_dict names are ours)."""
    ours = model.decoder
    dec = Decoder(odim=V, attention_dim=ours.after_norm.normalized_shape[0],
                  attention_heads=ours.decoders[0].self_attn.n_heads,
                  linear_units=ours.decoders[0].feed_forward.w_1.out_features, num_blocks=len(ours.decoders),
                  dropout_rate=0.0, positional_dropout_rate=0.0, self_attention_dropout_rate=0.0,
                  src_attention_dropout_rate=0.0)
    ctc = CTC(V, model.ctc.ctc_lo.in_features, 0.0)
    return load_strict(dec, ours.state_dict()), load_strict(ctc, model.ctc.state_dict())


@torch.no_grad()
def module_gaps(model, dec, ctc, enc, lengths, targets) -> tuple[float, float]:
    """Largest |log-prob difference| of ESPnet's modules from ours on clip 0: the decoder after sos + its
    label, the CTC head over its frames."""
    n = int(lengths[0])
    ys = torch.tensor([EOS] + targets[0], device=device)
    own = model.decoder(ys[None], enc[:1, :n]).float().log_softmax(-1)[0]
    causal = torch.ones(1, len(ys), len(ys), dtype=torch.bool, device=device).tril()
    theirs, _ = dec.forward_one_step(ys[None], causal, enc[:1, :n])
    own_ctc = model.ctc(enc[:1, :n]).float().log_softmax(-1)
    return float((own[-1] - theirs[0]).abs().max()), float((own_ctc - ctc.log_softmax(enc[:1, :n])).abs().max())


def espnet_beam_search(dec, ctc, beam: int, w: float) -> BatchBeamSearch:
    """auto_avsr's get_beam_search_decoder (no language model)."""
    scorers = {"decoder": dec, "ctc": CTCPrefixScorer(ctc, EOS), "length_bonus": LengthBonus(V)}
    weights = {"decoder": 1.0 - w, "ctc": w, "length_bonus": args.length_bonus}
    return BatchBeamSearch(scorers=scorers, weights=weights, beam_size=beam, vocab_size=V, sos=EOS, eos=EOS,
                           token_list=vocab.itos, pre_beam_score_key=None if w == 1.0 else "full").to(device).eval()


def espnet_nbest(search: BatchBeamSearch, enc_one) -> list[tuple[list[int], float]]:
    hyps = search(x=enc_one, maxlenratio=args.max_length_ratio, minlenratio=args.min_length_ratio)
    return [([t for t in h.yseq[1:].tolist() if t != EOS], float(h.score)) for h in hyps]


@torch.no_grad()
def rescored(model, enc_one, tokens, w) -> str:
    """The joint score of a hypothesis that ended by choosing eos, straight from the model, no search: (1 - w) x
    the decoder's log-prob of tokens + eos (teacher forcing) + w x the CTC log-likelihood of tokens (the CTC
    prefix scores of the search add up to it) + bonus x (len + 1). A search that scores its own best otherwise
    is wrong there."""
    T = enc_one.size(0)
    if len(tokens) >= (T if args.max_length_ratio == 0 else max(1, int(args.max_length_ratio * T))):
        return "n/a (ended at the length limit)"
    ys = torch.tensor([EOS] + tokens, device=device)
    att = model.decoder(ys[None], enc_one[None]).float().log_softmax(-1)[0]
    att = att[torch.arange(len(ys), device=device), torch.tensor(tokens + [EOS], device=device)].sum()
    ctc_lp = model.ctc(enc_one[None]).double().log_softmax(-1).transpose(0, 1)
    ctc = -F.ctc_loss(ctc_lp, torch.tensor(tokens, dtype=torch.long, device=device), [T], [len(tokens)],
                      blank=vocab.blank, reduction="sum")
    return f"{float((1 - w) * att + w * ctc + args.length_bonus * (len(tokens) + 1)):.4f}"


def text(ids) -> str:
    return f"{vocab.decode(ids)!r} ({len(ids)} units)"


def score_of(tokens, nbest) -> str:
    found = [s for t, s in nbest if t == tokens]
    return f"{found[0]:.4f}" if found else "not among its ended"


def differences(b, n_frames, ours, theirs, rescore) -> list[str]:
    none = ([], float("nan"))
    (o_tok, o_sc), (e_tok, e_sc) = ours[0] if ours else none, theirs[0] if theirs else none
    first = next((i for i, (a, c) in enumerate(zip(o_tok, e_tok)) if a != c), min(len(o_tok), len(e_tok)))
    return [f"  clip {b} ({n_frames} frames), first differing unit at {first}:",
            f"    ours   {o_sc:.4f} {text(o_tok)}; ESPnet scores it {score_of(o_tok, theirs)}; "
            f"rescored {rescore(o_tok)}",
            f"    ESPnet {e_sc:.4f} {text(e_tok)}; ours scores it {score_of(e_tok, ours)}; "
            f"rescored {rescore(e_tok)}"]


where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
print(f"device {device} ({where}), torch {torch.__version__}, ESPnet {espnet.__version__}; {args.clips} synthetic "
      f"clips, input {args.input_size}, max/min length ratio {args.max_length_ratio:g}/{args.min_length_ratio:g}, "
      f"length bonus {args.length_bonus:g}, fp32", flush=True)
ds = m.load_dataset(base_cfg, vocab, device)
index = list(range(min(args.clips, len(ds.samples))))
x, lengths, targets = m.training_batch(ds, index, m.Augment(base_cfg, training=False), device)
frames = lengths.tolist()
by_length = sorted(index, key=lambda b: (frames[b], b))
n_esp = min(args.espnet_clips or len(index), len(index))
sample = sorted(by_length[round((i + 0.5) * len(index) / n_esp - 0.5)] for i in range(n_esp))
print(f"clips of {int(lengths.min())}-{int(lengths.max())} frames; ESPnet on {n_esp} of them"
      f"{' (rate extrapolated)' if n_esp < len(index) else ''}\n", flush=True)
print("| preset | weights | beam | CTC w | ours clips/s | ESPnet clips/s | ours / ESPnet | same best "
      "| max abs score diff (same) | modules' max abs log-prob diff (decoder / CTC) |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
listed = []
for preset in args.presets.split(","):
    for weights in args.weights.split(","):
        cfg = dataclasses.replace(base_cfg, preset=preset)
        torch.manual_seed(0)
        model = m.build_model(cfg, V).to(device)
        if weights == "trained":
            quick_fit(model, cfg, vocab, x[:4], lengths[:4], targets[:4], args.fit_steps, device)
        model.eval()
        dec, ctc = espnet_modules(model)
        with torch.no_grad():
            enc, mask = model.encode(x, lengths)
        gaps = module_gaps(model, dec, ctc, enc, lengths, targets)
        for beam in map(int, args.beams.split(",")):
            for w in map(float, args.ctc_weights.split(",")):
                run = dataclasses.replace(cfg, beam_size=beam, beam_ctc_weight=w)
                search = espnet_beam_search(dec, ctc, beam, w)
                with torch.no_grad():
                    m.decode(model, enc[:2], mask[:2], lengths[:2], vocab, run)  # first-use costs out of the timing
                    ours, t_ours = timed(lambda: m.decode(model, enc, mask, lengths, vocab, run), device)
                    espnet_nbest(search, enc[by_length[0], :min(8, frames[by_length[0]])])
                    theirs, t_esp = timed(lambda: [espnet_nbest(search, enc[b, :frames[b]]) for b in sample], device)
                same, gap, lines = 0, 0.0, []
                for b, e in zip(sample, theirs):
                    o = ours[b]
                    if o and e and o[0][0] == e[0][0]:
                        same, gap = same + 1, max(gap, abs(o[0][1] - e[0][1]))
                    else:
                        lines += differences(b, frames[b], o, e, lambda t: rescored(model, enc[b, :frames[b]], t, w))
                rate, rate_esp = len(index) / t_ours, n_esp / t_esp
                print(f"| {preset} | {weights} | {beam} | {w:g} | {rate:.2f} | {rate_esp:.3f} | {rate / rate_esp:.1f} "
                      f"| {same}/{n_esp} | {gap:.1e} | {gaps[0]:.0e} / {gaps[1]:.0e} |", flush=True)
                if lines:
                    head = f"{preset} {weights} beam {beam} CTC w {w:g}: {n_esp - same} clip(s) differ"
                    print("\n".join([head] + lines), file=sys.stderr, flush=True)
                    listed += [head] + lines
if listed:
    print("\nDiffering clips (score: ESPnet's Hypothesis.score = ours; 'X scores it': that side's score for the "
          "other's best, where it ended that hypothesis; 'rescored': the model's own joint score of it):")
    print("\n".join(listed), flush=True)
