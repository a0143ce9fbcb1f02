#!/usr/bin/env bash
# Issue 13's GPU measurements in one run, sized for a short device loan: each step has a timeout, ~10 minutes in
# all at most (about 8 expected on one H200 with 16 cores, not yet measured); run from the repository root.
# Results go to $OUT (default: gpu-results/), one JSON per check, and log.txt with everything printed.
#
#   bash benchmarks/gpu_checks.sh                      # the GPU run (benchmarks/README.md, "GPU checks")
#   DEVICE=cpu VISION=tiny QUICK=1 bash benchmarks/gpu_checks.sh   # a dry run of the script on a CPU
#
# 1. extract_embeddings against the bare forward (ViT-B/16, 224 px, bf16 autocast): H&E PNG, H&E raw, SRH;
#    default workers (extract-auto) beside 0 and 4. Goal: extract-auto >= 0.7x the forward's images/s.
# 2. Training end to end with the shipped configs (opensrh_hlss.yaml, tcga_hlss.yaml; their workers: the cores
#    but one), loader + step against the step on a ready batch, bf16, 32 patients per step. Goal: >= 0.9x.
#    Each case again with pinning off, with one loader iteration per epoch, and with that and the workers
#    restarted every epoch: those levers measured.
set -uo pipefail
OUT=${OUT:-gpu-results}
DEVICE=${DEVICE:-cuda}
VISION=${VISION:-vit-b16}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
if [ -n "${QUICK:-}" ]; then
    extract=(--num-patients 3 --rounds 1)
    train=(--batch-size 2 --patients 8 --patches 4 --steps 2 --rounds 1 --num-workers 1)
else
    extract=(--num-patients 48 --rounds 2)
    train=(--batch-size 32 --patients 128 --patches 8 --steps 8 --rounds 2 --mixed-precision bf16)
fi
log() { tee -a "$OUT/log.txt"; }

{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null; nproc; python -c "import torch; print(torch.__version__)"; } | log

for case in "he-png --image-format png" "he-raw --image-format raw" "srh --modality srh"; do
    set -- $case
    name=$1
    shift
    echo "== extract $name" | log
    timeout 95 python benchmarks/extraction_bench.py --part extract --device "$DEVICE" --vision-config "$VISION" \
        --num-workers 4 "${extract[@]}" "$@" --json "$OUT/extract_$name.json" 2>&1 | grep -v "^\s*$" | tail -14 | log
done

echo "== train input (default, then each lever off)" | log
timeout 300 python benchmarks/train_input_bench.py --device "$DEVICE" --vision-config "$VISION" --compare-levers \
    "${train[@]}" --json "$OUT/train_input.json" 2>&1 | grep -v "^  \|^wrote" | tail -14 | log
