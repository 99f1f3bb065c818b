"""Test-time flipping, tried: does decoding a clip together with its mirror image (CTC log-probabilities
averaged, or encoder outputs averaged before the search) beat decoding it once? Usage:
python bench/flip_tta.py RUN_DIR --data-dir D --videos-dir V [--checkpoint averaged] [--no-beam]"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import master_all_avsr as m  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("run")
parser.add_argument("--data-dir", required=True)
parser.add_argument("--videos-dir", required=True)
parser.add_argument("--checkpoint", default="averaged")
parser.add_argument("--split", default="test")
parser.add_argument("--no-beam", action="store_true")
args = parser.parse_args()

cfg = m.Config(mode="test", work_dir=args.run, data_dir=args.data_dir, videos_dir=args.videos_dir, beam_size=20,
               checkpoint=f"{args.run}/checkpoints/{args.checkpoint}.pt")
device = torch.device("cpu")
model, vocab, model_cfg = m.model_from_checkpoint(m.checkpoint_path(cfg), cfg, device)
ds = m.load_dataset(model_cfg, vocab, device)
index = m.split_index(ds, args.split)
model.eval()
augment = m.Augment(model_cfg, training=False)
refs, hyps = [], {"greedy CTC": [], "greedy CTC, log-probs of both averaged": [],
                  "greedy CTC, encoder outputs averaged": [], "beam": [], "beam, encoder outputs averaged": []}


def best(nbest):
    return [clip[0][0] for clip in nbest]


with torch.no_grad():
    for batch in m.eval_batches(ds, index, model_cfg):
        chosen = [index[i] for i in batch]
        refs += [ds.samples[i].ids for i in chosen]
        x, lengths = m.batch_inputs(ds, chosen, augment, device)  # B x T x H x W
        enc, mask = model.encode(x, lengths)
        mirrored, _ = model.encode(x.flip(-1), lengths)
        both = (enc + mirrored) / 2
        logp = (model.ctc(enc).log_softmax(-1) + model.ctc(mirrored).log_softmax(-1)) / 2
        hyps["greedy CTC"] += [h for h, _ in m.greedy_ctc(model.ctc(enc), lengths, vocab.blank)]
        hyps["greedy CTC, log-probs of both averaged"] += [h for h, _ in m.greedy_ctc(logp, lengths, vocab.blank)]
        hyps["greedy CTC, encoder outputs averaged"] += [h for h, _ in m.greedy_ctc(model.ctc(both), lengths,
                                                                                   vocab.blank)]
        if not args.no_beam:
            hyps["beam"] += best(m.decode(model, enc, mask, lengths, vocab, model_cfg, None, decoder="beam"))
            hyps["beam, encoder outputs averaged"] += best(m.decode(model, both, mask, lengths, vocab, model_cfg,
                                                                    None, decoder="beam"))
print(f"{args.run} ({args.checkpoint}.pt, {args.split} split, {len(refs)} clips)")
for name, found in hyps.items():
    if found:
        print(f"  {name:42} CER {m.error_rates(refs, found, vocab)['cer']:.4f}")
