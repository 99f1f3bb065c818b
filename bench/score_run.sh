#!/bin/bash
# A finished run's test split scored by greedy CTC and by the beam search (20, CTC 0.3), for best.pt and, where
# kept, averaged.pt: the four lines bench/study_table.py reads. Usage: bash bench/score_run.sh DATASET_DIR WORK_DIR
set -u
R=$1; W=$2
for ckpt in best averaged; do
    [ -f "$W/checkpoints/$ckpt.pt" ] || continue
    for decoder in ctc beam; do
        python master_all_avsr.py --mode test --data-dir "$R" --videos-dir "$R/Preprocessed_Video" --work-dir "$W" \
            --checkpoint "$W/checkpoints/$ckpt.pt" --decoder $decoder --beam-size 20 | tail -n 1
    done
done
