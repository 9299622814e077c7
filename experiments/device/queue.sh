# every device call: the tasks not yet done on this warm machine, in order, while time is left;
# /tmp/acc comes back as one tarball each call
. experiments/device/common.sh
BUDGET=${1:-560}; T0=$(date +%s); mkdir -p /tmp/acc
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
task() {  # task NAME ESTIMATE_S COMMAND...
  local name=$1 est=$2; shift 2
  [ -f /tmp/acc/done-$name ] && return 0
  if [ $(left) -lt $est ]; then echo "== skip $name (needs ~${est}s, $(left)s left)"; return 0; fi
  echo "== $name ($(left)s left)"; local t=$(date +%s)
  timeout -s INT $(( $(left) - 20 )) "$@" > /tmp/acc/$name.log 2>&1; local rc=$?
  echo "   rc=$rc in $(( $(date +%s) - t ))s"; tail -n 8 /tmp/acc/$name.log
  [ $rc -eq 0 ] && touch /tmp/acc/done-$name
}
finished() { grep -q '"state": "finished"' runs/$1/manifest.json 2>/dev/null; }
mps_off() { [ -f /tmp/mps-stopped ] || { echo quit | nvidia-cuda-mps-control 2>/dev/null; touch /tmp/mps-stopped; sleep 2; }; }
pack() { tar czf $OUT/acc.tgz.tmp -C /tmp acc && mv $OUT/acc.tgz.tmp $OUT/acc.tgz
  for r in h100x1-ablation h100x1-ablation-capacity; do
    [ -d runs/$r ] && tar czf $OUT/$r.tgz.tmp --exclude=state -C runs $r && mv $OUT/$r.tgz.tmp $OUT/$r.tgz; done; }
# what is under $OUT comes back even when the call is cut: pack every 45 s
( while sleep 45; do pack 2>/dev/null; done ) & PACKER=$!
if [ -z "$SKIP_ABLATION" ] && ! finished h100x1-ablation; then
  if [ ! -f /tmp/mps-tried ]; then
    touch /tmp/mps-tried
    if nvidia-cuda-mps-control -d 2>&1; then
      if $PY -c "import torch; torch.zeros(1, device='cuda'); print('mps client ok')"; then echo MPS on > /tmp/mps-state
      else echo quit | nvidia-cuda-mps-control; echo MPS off: client failed > /tmp/mps-state; fi
    else echo MPS off: no daemon > /tmp/mps-state; fi
  fi
  # the ablation's tiny cells leave the GPU mostly idle: the correctness-only property run shares it
  bash experiments/device/ablation.sh $(( $(left) - 30 )) h100x1-ablation > /tmp/acc/ablation-$T0.log 2>&1 &
  task hypothesis 120 $PY -m experiments.property_run --out /tmp/acc/kernel-properties -- -n 4
  wait; tail -n 25 /tmp/acc/ablation-$T0.log
  finished h100x1-ablation || { kill $PACKER; pack; ls -la $OUT; exit 0; }
fi
mps_off
task lora-qwen3 130 $PY -m experiments.sweep --preset h100x1-lora --only qwen3-30b-a3b-L8 --out /tmp/acc/runs/h100x1-lora-3
task block-qwen3 120 $PY -m experiments.block_bench --model qwen3-30b-a3b --systems v5-grouped_mm,v5-liger,triton,auto --routing real --out /tmp/acc/runs/h100x1-block-3-qwen3/block.json
task peers-step 200 $PY -m experiments.sweep --config experiments/device/peers-step.yaml --out /tmp/acc/runs/h100x1-peers-step-1
task trainer-mixtral 150 $PY -m experiments.sweep --preset h100x1-trainer --only mixtral-8x7b-L2 --out /tmp/acc/runs/h100x1-trainer-4
task jax 90 $PY -m experiments.jax_overhead --out /tmp/acc/jax-h100x1.json
task hypothesis 200 $PY -m experiments.property_run --out /tmp/acc/kernel-properties -- -n 8
if [ -z "$SKIP_ABLATION" ] && ! finished h100x1-ablation-capacity && [ $(left) -gt 90 ]; then
  JOBS=4 bash experiments/device/ablation.sh $(( $(left) - 30 )) h100x1-ablation-capacity > /tmp/acc/ablation-cap-$T0.log 2>&1; tail -n 15 /tmp/acc/ablation-cap-$T0.log
fi
kill $PACKER; pack; ls -la $OUT
