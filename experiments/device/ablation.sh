# the GPU ablation (issue 27); resumable, the run dir stays in runs/ on the warm machine
# usage: bash experiments/device/ablation.sh LIMIT_S [PRESET]
. experiments/device/common.sh
LIMIT=${1:-520}; PRESET=${2:-h100x1-ablation}
cat /tmp/mps-state
start=$(date +%s)
JOBS=${JOBS:-8}; echo "preset $PRESET jobs $JOBS limit $LIMIT"
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout -s INT $LIMIT $PY -m experiments.ablation --preset $PRESET --out runs/$PRESET --jobs $JOBS 2>&1 | tail -40
echo "ablation call: $(( $(date +%s) - start )) s"
for f in runs/$PRESET/logs/*.log; do echo "$f: $(tail -n 1 $f)"; done
nvidia-smi --query-gpu=memory.used --format=csv
tar czf $OUT/$PRESET.tgz --exclude=state -C runs $PRESET
cp /tmp/mps-state $OUT/ 2>/dev/null
