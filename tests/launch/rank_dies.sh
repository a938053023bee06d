#!/usr/bin/env bash
# A rank killed mid-run: the other exits non-zero well within --dist-timeout, saying what failed,
# and the last checkpoint resumes in one process with the same global batch.
#   rank_dies.sh <finetune_bert> <scratch folder>
set -u
program=$1 out=$2/run
rm -rf "$2" && mkdir -p "$2"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
flags=(--train-size 320 --dev-size 32 --max-steps 1000000 --method lora --dist-timeout 60 --out "$out")
rank() { RANK=$1 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port exec "$program" "${flags[@]}" --batch-size 8; }
rank 0 > "$2/rank0.out" 2> "$2/rank0.err" & survivor=$!
rank 1 > /dev/null 2>&1 & victim=$!
for (( i = 0; i < 600; ++i )); do  # until a checkpoint is written (an evaluation every 20 updates)
  [ -f "$out/last/train_state.safetensors" ] && break
  sleep 0.1
done
[ -f "$out/last/train_state.safetensors" ] || { echo "FAIL: no checkpoint after 60 s"; kill $survivor $victim; exit 1; }
kill -9 $victim
start=$(date +%s)
wait $survivor; status=$?
elapsed=$(( $(date +%s) - start ))
cat "$2/rank0.err"
(( status != 0 )) || { echo "FAIL: rank 0 exited 0 after rank 1 was killed"; exit 1; }
(( elapsed < 30 )) || { echo "FAIL: rank 0 took $elapsed s to notice"; exit 1; }
grep -q "rank 0 of 2: .* failed: .*Another rank exited" "$2/rank0.err" || { echo "FAIL: rank 0 did not say why"; exit 1; }
echo "rank 0 exited with status $status $elapsed s after rank 1 was killed"
# One process, global batch 16 as before: it must take up the checkpoint.
timeout 10 "$program" "${flags[@]}" --batch-size 16 --resume > "$2/resumed.out" 2>&1
grep -q '"event":"resume"' "$out/log.jsonl" || { echo "FAIL: the one-process run did not resume"; cat "$2/resumed.out"; exit 1; }
echo "the checkpoint resumed in one process"
