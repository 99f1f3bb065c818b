"""Which language model for the beam search: validation perplexity of smoothed n-grams against the script's
LSTM (`--mode lm`) at a few sizes, on the same sentences (the labels of the training clips; measured on the
validation labels, per unit, word spaces and the end included).

    python bench/lm_choice.py --data-dir D --videos-dir V

The n-grams are the script's (`--lm-kind ngram`: interpolated Kneser-Ney, one discount of 0.75).
"""
import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import master_all_avsr as m  # noqa: E402

LSTMS = ((128, 1, 0.3, 1e-3, 40), (256, 2, 0.3, 1e-3, 40), (256, 2, 0.5, 1e-3, 40), (256, 2, 0.3, 3e-3, 80))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--videos-dir", default="")
    args = parser.parse_args()
    cfg = m.Config(mode="lm", data_dir=args.data_dir, videos_dir=args.videos_dir, lm_kind="lstm")
    vocab = m.load_vocabulary(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(io.StringIO()):
            sentences = m.lm_sentences(m.dataclasses.replace(cfg, work_dir=tmp), vocab)
        print(f"{len(sentences['train'])} training sentences, {len(sentences['val'])} validation sentences\n")
        print("| model | validation perplexity | seconds |\n| --- | --- | --- |")
        for order in range(2, 9):
            t0 = time.perf_counter()
            lm = m.NgramLM(m.ngram_tables(sentences["train"], order, vocab.size, vocab.sos_eos), order, vocab.size,
                           vocab.sos_eos)
            perplexity = m.lm_perplexity(lm, sentences["val"], vocab.sos_eos, "cpu")
            print(f"| {order}-gram, Kneser-Ney | {perplexity:.2f} | {time.perf_counter() - t0:.1f} |", flush=True)
        for dim, layers, dropout, lr, epochs in LSTMS:
            run = m.dataclasses.replace(cfg, work_dir=f"{tmp}/lstm_{dim}_{layers}_{dropout}_{lr}", lm_dim=dim,
                                        lm_layers=layers, lm_dropout=dropout, lr=lr, lm_epochs=epochs)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                report = m.train_lm(run)
            print(f"| LSTM {layers} x {dim}, dropout {dropout}, lr {lr:g}, {epochs} epochs (best: {report['epoch']}) "
                  f"| {report['val_perplexity']:.2f} | {time.perf_counter() - t0:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
