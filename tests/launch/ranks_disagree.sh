#!/usr/bin/env bash
# Two ranks started with different deltas: both refuse at the start, naming both ranks' values.
#   ranks_disagree.sh <finetune_bert> <scratch folder>
set -u
program=$1 dir=$2
rm -rf "$dir" && mkdir -p "$dir"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rank() {  # rank method
  RANK=$1 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port "$program" --train-size 64 --dev-size 16 \
    --max-steps 5 --method "$2" --out "$dir/run" --dist-timeout 60 > "$dir/rank$1.out" 2> "$dir/rank$1.err"
}
rank 0 lora & first=$!
rank 1 adapter; second=$?
wait $first; first=$?
cat "$dir/rank0.err" "$dir/rank1.err"
(( first == 1 && second == 1 )) || { echo "FAIL: exit statuses $first and $second, expected 1 and 1"; exit 1; }
for r in 0 1; do
  grep "rank $r and rank $(( 1 - r )) differ in" "$dir/rank$r.err" | grep "delta 'lora'" | grep -q "delta 'adapter'" ||
    { echo "FAIL: rank $r's message does not name both ranks' deltas"; exit 1; }
done
