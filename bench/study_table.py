"""The learning study's rows as a Markdown table, read from what `bench/learning_study.sh` left behind.

Each run `OUT/<row>_s<seed>/` has its metrics.csv (one line an epoch) and `OUT/<row>_s<seed>.out` (the test
lines the study script printed: best.pt, then averaged.pt, each by greedy CTC and by the beam search). A row's
mean is printed under its seeds, so "two seeds before you believe a difference" is read off the table.

    python bench/study_table.py runs/study                  # every run found
    python bench/study_table.py runs/study lr2e-3_wd0.05    # rows whose name starts so
"""
import csv
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import master_all_avsr as m  # noqa: E402

TEST_LINE = re.compile(r"^CER=([0-9.]+) .*\((\w+) split, (\w+)\.pt, (\w+)\)$")


def test_scores(out_file: Path) -> dict:
    """{(checkpoint, decoder): CER} from the study script's test lines; empty while the run still trains."""
    if not out_file.exists():
        return {}
    scores = {}
    for line in out_file.read_text(encoding="utf-8").splitlines():
        match = TEST_LINE.match(line.strip())
        if match and match.group(2) == "test":
            scores[(match.group(3), match.group(4))] = float(match.group(1))
    return scores


def number_or_text(value: str):
    try:
        return float(value)
    except ValueError:
        return value or None


def training_summary(metrics_csv: Path) -> dict:
    """best.pt's epoch by the run's own rule (`best_row` under the beam search the study tests with), and where
    the training probe ended."""
    with open(metrics_csv, encoding="utf-8-sig", newline="") as f:
        history = [{k: number_or_text(v) for k, v in row.items()} for row in csv.DictReader(f)]
    if not history:
        return {"epochs": 0}
    best = m.best_row(history, "beam")
    return {"epochs": int(history[-1]["epoch"]), "best_epoch": int(best["epoch"]),
            "best_val": m.selection_cer(best, "beam"), "probe_end": history[-1]["train_cer_ctc"]}


def run_rows(out_dir: Path, prefix: str) -> list[dict]:
    runs = []
    for run in sorted(p for p in out_dir.iterdir() if (p / "metrics.csv").exists() and p.name.startswith(prefix)):
        match = re.fullmatch(r"(.+)_s(\d+)", run.name)
        if match:
            runs.append({"row": match.group(1), "seed": int(match.group(2)), **training_summary(run / "metrics.csv"),
                         "scores": test_scores(run.parent / f"{run.name}.out")})
    return runs


def cell(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def markdown(runs: list[dict]) -> str:
    head = ("| row | seed | epochs | best epoch (val greedy) | probe CER at the end | best.pt greedy CTC | beam | "
            "averaged.pt greedy CTC | beam |")
    lines = [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    by_row: dict[str, list[dict]] = {}
    for run in runs:
        by_row.setdefault(run["row"], []).append(run)
    for row, seeds in by_row.items():
        for run in sorted(seeds, key=lambda r: r["seed"]):
            s = run["scores"]
            best = f"{run['best_epoch']} ({run['best_val']:.3f})" if "best_epoch" in run else ""
            lines.append(f"| `{row}` | {run['seed']} | {run['epochs']} | {best} | {cell(run.get('probe_end'))} | "
                         f"{cell(s.get(('best', 'ctc')))} | {cell(s.get(('best', 'beam')))} | "
                         f"{cell(s.get(('averaged', 'ctc')))} | {cell(s.get(('averaged', 'beam')))} |")
        finished = [r["scores"][("averaged", "beam")] for r in seeds if ("averaged", "beam") in r["scores"]]
        if len(finished) > 1:
            lines.append(f"| `{row}`, mean of {len(finished)} | | | | | | | | **{statistics.mean(finished):.3f}** |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or not Path(argv[0]).is_dir():
        print(__doc__.strip(), file=sys.stderr)
        return 2
    runs = run_rows(Path(argv[0]), argv[1] if len(argv) > 1 else "")
    if not runs:
        print(f"no runs of bench/learning_study.sh under {argv[0]} (folders <row>_s<seed> with a metrics.csv)",
              file=sys.stderr)
        return 1
    print(markdown(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
