#!/bin/bash
# Everything worth checking on a lent GPU, in one command (a loan is short; each step has its own time limit
# so that one slow step cannot eat the rest). Usage: bash bench/gpu_session.sh [OUT_DIR] 2>&1 | tee log
# Built-in clips only (no data to carry). SMOKE=1 shrinks every step, to try the script itself on a CPU.
# On a machine without this project's requirements, install them first (kornia, editdistance: see README).
W=${1:-/tmp/gpu_session}
M=master_all_avsr.py
export PYTHONUNBUFFERED=1
SMALL=()
[ -n "$SMOKE" ] && SMALL=(--synthetic-clips 48 --input-size 44 --max-frames 400)
step() { echo; echo "=== $1"; shift; local t0=$SECONDS; timeout "$@"; echo "=== rc=$? in $((SECONDS - t0)) s"; }
python3 -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" || exit 1
# the training runs score themselves with greedy CTC (fast); the beam search is tested on its own below
step "train tiny, --amp auto" 300 python3 $M --preset tiny --epochs 3 --decoder ctc --work-dir $W/auto "${SMALL[@]}"
step "train tiny, --amp fp16 (a T4's arithmetic)" 300 python3 $M --preset tiny --epochs 2 --amp fp16 --decoder ctc \
    --work-dir $W/fp16 "${SMALL[@]}"
step "resume fp16 to 4 epochs" 300 python3 $M --preset tiny --epochs 4 --amp fp16 --decoder ctc --work-dir $W/fp16 \
    --resume "${SMALL[@]}"
step "test on the GPU, beam 20" 200 python3 $M --mode test --work-dir $W/fp16 --decoder beam
step "the same checkpoint on the CPU" 200 python3 $M --mode test --work-dir $W/fp16 --decoder beam --device cpu
python3 $M --mode synth --output $W/clips --synthetic-clips 12 > /dev/null
step "decode a folder, 3 best" 120 python3 $M --mode decode --work-dir $W/fp16 --input $W/clips --nbest 3
step "a language model (n-gram), then the GPU's beam search with it" 200 bash -c "python3 $M --mode lm --work-dir $W/fp16 \
    ${SMALL[*]} && python3 $M --mode test --work-dir $W/fp16 --decoder beam --lm $W/fp16/lm/lm.pt"
step "fp16 with extra clips, a CTC-weight schedule, averaging, early stopping" 300 python3 $M --preset mini --epochs 3 \
    --amp fp16 --decoder ctc --extra-data-dir $W/clips --ctc-weight-schedule 1:0.7,2-:0.5>0.2 --average-last 2 \
    --stop-after 5 --work-dir $W/means "${SMALL[@]}"
step "torchrun, one process" 300 python3 -m torch.distributed.run --standalone --nproc_per_node 1 $M --preset tiny \
    --epochs 1 --decoder ctc --work-dir $W/torchrun1 "${SMALL[@]}"
step "torchrun, one process more than the GPUs (refused)" 120 python3 -m torch.distributed.run --standalone \
    --nproc_per_node $(( $(python3 -c "import torch; print(torch.cuda.device_count())") + 1 )) $M --preset tiny \
    --epochs 1 --work-dir $W/torchrun_more "${SMALL[@]}"
B=(--clips 64 --reference-clips 8)
[ -n "$SMOKE" ] && B=(--clips 8 --reference-clips 2 --input-size 44 --fit-steps 2)
step "decode speed, fp32 (answers compared)" 400 python3 bench/decode_speed.py --presets small,base --beams 10,40 --amp off "${B[@]}"
step "decode speed, mixed precision" 400 python3 bench/decode_speed.py --presets small,base --beams 10,40 "${B[@]}"
T=(--steps 30 --warmup 30)  # the warm-up meets the batch shapes first: see README, On a GPU
[ -n "$SMOKE" ] && T=(--steps 1 --warmup 1 --input-size 44 --max-frames 400)
for amp in bf16 fp16; do
    step "train speed, $amp" 400 python3 bench/train_speed.py --presets tiny,mini,small,base --amp $amp "${T[@]}"
done
step "train speed, fp16, compiled" 400 python3 bench/train_speed.py --presets small --amp fp16 --compile "${T[@]}"
