#!/bin/bash
# Modality dropout for --modality av (README, "Real clips: sound, sight and both"): the audio-visual recipe of
# that section trained with --drop-sound P (one CPU thread; run two values side by side on a 2-core machine),
# then bench/sound_robustness.py's rows for its best.pt, last.pt and averaged.pt: test CER clean, in babble noise
# and muted.
# Usage: bash bench/modality_dropout.sh DATASET_DIR P [OUT_DIR [NAME FLAG...]]   (P = 0: the plain av model)
# NAME and the flags after it: a variant, e.g. `late --augment-from 11` (dropout, and noise, from epoch 11 on)
set -u
R=$1; P=$2; OUT=${3:-runs/modality_dropout}; NAME=${4:-}
W=$OUT/av_drop$P${NAME:+_$NAME}
shift $(( $# < 4 ? $# : 4 ))
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python master_all_avsr.py --data-dir "$R" --videos-dir "$R/Preprocessed_Video" --modality av --preset tiny \
    --input-size 44 --lr 2e-3 --ctc-weight 0.3 --warmup-epochs 2 --max-frames 400 --epochs 20 --no-time-mask \
    --no-random-crop --hflip-prob 0 --decoder ctc --no-diagnostics --drop-sound "$P" "$@" --work-dir "$W" \
    > "$W.log" 2>&1 || exit 1
rows=3  # the table's heading once, then a row a checkpoint
for ckpt in best last averaged; do  # averaged.pt where the flags ask for it (--average-last N)
    [ -f "$W/checkpoints/$ckpt.pt" ] || continue
    python bench/sound_robustness.py "$W" --checkpoint $ckpt --data-dir "$R" --videos-dir "$R/Preprocessed_Video" | tail -n $rows
    rows=1
done
