#!/bin/bash
# A teacher for --teacher (README, "A teacher"): the tiny audio-visual recipe of README's "Real clips: sound,
# sight and both" (no modality dropout), or the same recipe with --modality audio, trained on one CPU thread;
# then its test CER by greedy CTC, clean (bench/sound_robustness.py's first row).
# Usage: bash bench/teacher.sh DATASET_DIR av|audio [OUT_DIR]   -> OUT_DIR/MODALITY, the run to pass as --teacher
set -u
R=$1; MODALITY=$2; OUT=${3:-runs/teachers}
W=$OUT/$MODALITY
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
began=$(date +%s)
python master_all_avsr.py --data-dir "$R" --videos-dir "$R/Preprocessed_Video" --modality "$MODALITY" --preset tiny \
    --input-size 44 --lr 2e-3 --ctc-weight 0.3 --warmup-epochs 2 --max-frames 400 --epochs 20 --no-time-mask \
    --no-random-crop --hflip-prob 0 --decoder ctc --no-diagnostics --drop-sound 0 --work-dir "$W" > "$W.log" 2>&1 || exit 1
echo "teacher $MODALITY: $(( $(date +%s) - began )) s wall (training and its test)"
python bench/sound_robustness.py "$W" --checkpoint best --data-dir "$R" --videos-dir "$R/Preprocessed_Video" --sounds clean,mute
