"""Which language model for the beam search: validation perplexity of smoothed n-grams against the script's
LSTM (`--mode lm`) at a few sizes, on the same sentences (the labels of the training clips; measured on the
validation labels, per unit, word spaces and the end included).

    python bench/lm_choice.py --data-dir D --videos-dir V [--epochs 40]

The n-grams are interpolated Kneser-Ney (one discount, 0.75), written here for the comparison alone.
"""
import argparse
import contextlib
import io
import math
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import master_all_avsr as m  # noqa: E402

DISCOUNT = 0.75


class KneserNey:
    def __init__(self, sentences, order: int, vocab_size: int, sos: int):
        self.order, self.V, self.sos = order, vocab_size, sos
        self.counts = [Counter() for _ in range(order + 1)]  # counts[n][(h..., w)]: continuation counts below N
        full = Counter()
        for ids in sentences:
            seq = [sos] * (order - 1) + ids + [sos]
            for i in range(order - 1, len(seq)):
                full[tuple(seq[i - order + 1:i + 1])] += 1
        self.counts[order] = full
        for n in range(order - 1, 0, -1):  # how many distinct tokens precede each shorter n-gram
            self.counts[n] = Counter(gram[1:] for gram in self.counts[n + 1])
        self.context = [defaultdict(lambda: [0, 0]) for _ in range(order + 1)]  # total, distinct followers
        for n in range(1, order + 1):
            for gram, c in self.counts[n].items():
                entry = self.context[n][gram[:-1]]
                entry[0] += c
                entry[1] += 1

    def prob(self, history: tuple, w: int) -> float:
        p = 1.0 / self.V
        for n in range(1, self.order + 1):
            h = history[len(history) - n + 1:] if n > 1 else ()
            total, distinct = self.context[n].get(h, (0, 0))
            if total:
                p = (max(self.counts[n].get(h + (w,), 0) - DISCOUNT, 0) + DISCOUNT * distinct * p) / total
        return p

    def perplexity(self, sentences) -> float:
        nll, n = 0.0, 0
        for ids in sentences:
            seq = [self.sos] * (self.order - 1) + ids + [self.sos]
            for i in range(self.order - 1, len(seq)):
                nll -= math.log(self.prob(tuple(seq[max(0, i - self.order + 1):i]), seq[i]))
                n += 1
        return math.exp(nll / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--videos-dir", default="")
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    cfg = m.Config(mode="lm", data_dir=args.data_dir, videos_dir=args.videos_dir, lm_epochs=args.epochs)
    vocab = m.load_vocabulary(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(io.StringIO()):
            sentences = m.lm_sentences(m.dataclasses.replace(cfg, work_dir=tmp), vocab)
        print(f"{len(sentences['train'])} training sentences, {len(sentences['val'])} validation sentences\n")
        print("| model | validation perplexity | seconds |\n| --- | --- | --- |")
        for order in range(1, 8):
            t0 = time.perf_counter()
            lm = KneserNey(sentences["train"], order, vocab.size, vocab.sos_eos)
            print(f"| {order}-gram, Kneser-Ney | {lm.perplexity(sentences['val']):.2f} | "
                  f"{time.perf_counter() - t0:.1f} |", flush=True)
        for dim, layers, dropout in ((128, 1, 0.3), (256, 2, 0.3), (256, 2, 0.5), (512, 2, 0.5)):
            run = m.dataclasses.replace(cfg, work_dir=f"{tmp}/lstm_{dim}_{layers}_{dropout}", lm_dim=dim,
                                        lm_layers=layers, lm_dropout=dropout)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                report = m.train_lm(run)
            print(f"| LSTM {layers} x {dim}, dropout {dropout} (best of {args.epochs} epochs: "
                  f"{report['epoch']}) | {report['val_perplexity']:.2f} | {time.perf_counter() - t0:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
