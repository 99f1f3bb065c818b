#!/bin/bash
# The language model in the beam search, on a trained run (README, "Real clips: a language model"): trains the
# run's LM (--mode lm in the run's folder: its vocabulary and split, the training labels alone), then scores the
# validation split (where the weight is chosen) and the test split by the beam search at beams 10 and 20 with
# --lm-weight 0, 0.1, 0.2, 0.3 and 0.5; each line gives the CER and the seconds test took. Test writes to RUN_DIR/lm_study (the run's own test files stay as they are).
# Usage: [SPLITS="val test"] bash bench/lm_study.sh DATASET_DIR RUN_DIR [LM_SETTINGS...]   (DATASET_DIR: the folder holding
# Preprocessed_Video and the labels; LM_SETTINGS: e.g. --lm-epochs 60 --lr 3e-3)
set -u
R=$1; W=$2; shift 2
DATA=(--data-dir "$R" --videos-dir "$R/Preprocessed_Video")
[ -f "$W/lm/lm.pt" ] || python master_all_avsr.py --mode lm "${DATA[@]}" --work-dir "$W" "$@" | tail -n 2 || exit 1
CKPT=$W/checkpoints/averaged.pt; [ -f "$CKPT" ] || CKPT=$W/checkpoints/best.pt
OUT=$W/lm_study
for split in ${SPLITS:-val test}; do
for beam in 10 20; do
    for weight in 0 0.1 0.2 0.3 0.5; do
        lm=(--lm "$W/lm/lm.pt" --lm-weight "$weight")
        [ "$weight" = 0 ] && lm=()
        line=$(python master_all_avsr.py --mode test "${DATA[@]}" --work-dir "$OUT" --checkpoint "$CKPT" \
               --split $split --beam-size $beam "${lm[@]}" | tail -n 1)
        seconds=$(python -c "import json; print(json.load(open('$OUT/test_metrics.json'))['seconds'])")
        echo "beam $beam, lm weight $weight: $line, ${seconds} s"
    done
done
done
