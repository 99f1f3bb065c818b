#!/bin/bash
# README's first real-data command as a user runs it: `--config configs/lrc_cpu_hour.json` on both cores of a
# 2-core machine, nothing else running, timed whole; then the test split scored by greedy CTC and by the beam
# search (20, CTC 0.3) for best.pt and averaged.pt, as bench/learning_study.sh does (bench/study_table.py reads both).
# Usage: bash bench/cpu_hour.sh DATASET_DIR ROW SEED [OUT_DIR]. Rows: recipe (the config as it is: up to 70 epochs,
# as many as its --time-budget holds), e50 (--epochs 50 --no-fit-budget: the recipe until 2026-12-07).
set -u
R=$1; ROW=$2; SEED=$3; OUT=${4:-runs/hour}
W=$OUT/${ROW}_s$SEED
case $ROW in
    recipe) ROW_FLAGS=() ;;
    e50) ROW_FLAGS=(--epochs 50 --no-fit-budget) ;;
    *) echo "unknown row $ROW"; exit 2 ;;
esac
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
began=$(date +%s)
python master_all_avsr.py --config configs/lrc_cpu_hour.json --data-dir "$R" --videos-dir "$R/Preprocessed_Video" \
    --seed "$SEED" "${ROW_FLAGS[@]}" --work-dir "$W" > "$W.log" 2>&1 || exit 1
echo "training and its test: $(( $(date +%s) - began )) s wall"
bash bench/score_run.sh "$R" "$W"
