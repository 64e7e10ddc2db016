#!/usr/bin/env bash
# The streaming stages, each alone (cached input -> a null sink or shards) and as a chain
# of four processes on loopback: a random GPT-2-small-shaped model to layer 6 feeding one
# 768 x 24576 TopK SAE (k 32, batches of 4096 tokens). Prints one JSON line per
# measurement; tokens/s counts activation rows (tokens).
#
#   cargo build --release -p activation-producer -p shuffler -p sae-trainer -p pipeline
#   bash benches/chain.sh [WORKDIR] [TRAIN_TOKENS]
#
# The tokenizer is taken from release if built there, else from the debug build (its
# dependencies are optimised in both; a release build of it also builds DataFusion).
#
# Threads: the producer and the trainer get one core each (--threads 1), as the README's
# rule gives them on a 2-core machine; the tokenizer and the shuffler take one thread.
set -euo pipefail
B=${CARGO_TARGET_DIR:-$HOME/.cache/saestream-target}/release
TOK=$B/tokenizer
[ -x "$TOK" ] || TOK=${CARGO_TARGET_DIR:-$HOME/.cache/saestream-target}/debug/tokenizer
W=${1:-/tmp/saestream-chain-bench}
TOKENS=${2:-49152}                  # trained tokens: 12 batches of 4096
FX=$(cd "$(dirname "$0")/.." && pwd)/tests/fixtures
HOOK=blocks.6.hook_resid_pre
LM_BATCHES=$((TOKENS / 4096))       # 32 prompts x 128 tokens = one training batch
rm -rf "$W" && mkdir -p "$W"
now() { date +%s.%N; }
url() { # first stdout line of a server: its stream URL
  for _ in $(seq 1 600); do
    l=$(head -1 "$1" 2>/dev/null || true)
    [ -n "$l" ] && { python3 -c 'import json,sys; print(json.loads(sys.argv[1])["stream"])' "$l"; return; }
    sleep 0.1
  done
  echo "no URL in $1" >&2; exit 1
}
rate() { python3 -c "import sys; print(round(float(sys.argv[1]) / (float(sys.argv[3]) - float(sys.argv[2])), 1))" "$@"; }
emit() { echo "{\"bench\":\"chain\",\"what\":\"$1\",\"tokens\":$2,\"seconds\":$(python3 -c "print(round($4-$3,3))"),\"tokens_per_second\":$(rate "$2" "$3" "$4")}"; }

# a random GPT-2 small (its forward bench printed too, for reference)
"$B/activation-producer" bench --model-out "$W/model" --iters 1 --warmup 0 --batch 8 --threads 1 >&2
cat > "$W/topk.yaml" <<EOF
architecture: topk
k: 32
d_sae: 24576
hook_name: $HOOK
use_sparse_activations: true
train_batch_size_tokens: 4096
training_tokens: $TOKENS
n_batches_in_buffer: 2
seed: 1
log_frequency: 1000000
feature_sampling_window: 1000000
EOF

# 1. tokenizer alone: corpus -> tokens shards
t0=$(now)
"$TOK" stream --dataset "$FX/pretok/corpus.jsonl" --tokenizer "$FX/tiny-gpt2" \
  --context-size 128 --batch-sequences 32 --output "$W/tokens" --threads 1 > "$W/tok.json"
t1=$(now)
emit tokenizer "$(python3 -c "import json; print(json.load(open('$W/tok.json'))['sequences_written'] * 128)")" "$t0" "$t1"

# 2. producer alone: token shards -> activation shards
t0=$(now)
"$B/activation-producer" run --tokens "$W/tokens" --model "$W/model" --hooks $HOOK \
  --store-batch-size-prompts 32 --max-batches $LM_BATCHES --output "$W/acts" --threads 1 > "$W/prod.json"
t1=$(now)
emit producer $TOKENS "$t0" "$t1"

# 3. shuffler alone: activation shards -> Flight -> a reader that sums every value
"$B/shuffler" run --upstream "$W/acts" --train-batch-size-tokens 4096 --n-batches-in-buffer 2 \
  --seed 1 --listen 127.0.0.1:0 > "$W/sh.out" &
S=$(url "$W/sh.out")
t0=$(now)
"$B/pipeline" copy "$S" - > "$W/sink.json"
t1=$(now)
wait
emit shuffler "$(python3 -c "import json; print(json.load(open('$W/sink.json'))['rows'])")" "$t0" "$t1"
"$B/shuffler" run --upstream "$W/acts" --train-batch-size-tokens 4096 --n-batches-in-buffer 2 \
  --seed 1 --output "$W/batches" > /dev/null

# 4. trainer alone: batch shards -> one TopK SAE
t0=$(now)
"$B/sae-trainer" train --upstream "$W/batches" --config "$W/topk.yaml" --output "$W/alone" --threads 1 > "$W/tr.json"
t1=$(now)
emit trainer $TOKENS "$t0" "$t1"

# 5. the chain: four processes at once
t0=$(now)
"$TOK" stream --dataset "$FX/pretok/corpus.jsonl" --tokenizer "$FX/tiny-gpt2" \
  --context-size 128 --batch-sequences 32 --listen 127.0.0.1:0 > "$W/c-tok.out" &
T=$(url "$W/c-tok.out")
"$B/activation-producer" run --tokens "$T" --model "$W/model" --hooks $HOOK --store-batch-size-prompts 32 \
  --max-batches $LM_BATCHES --listen 127.0.0.1:0 --threads 1 > "$W/c-prod.out" &
P=$(url "$W/c-prod.out")
"$B/shuffler" run --upstream "$P" --train-batch-size-tokens 4096 --n-batches-in-buffer 2 --seed 1 \
  --listen 127.0.0.1:0 > "$W/c-sh.out" &
S=$(url "$W/c-sh.out")
"$B/sae-trainer" train --upstream "$S" --config "$W/topk.yaml" --output "$W/chain" --threads 1 > "$W/c-tr.json"
t1=$(now)
wait
emit chain $TOKENS "$t0" "$t1"
cmp "$W/alone/sae_weights.safetensors" "$W/chain/sae_weights.safetensors" \
  && echo '{"bench":"chain","what":"the chain trained the same SAE as the trainer alone on the cached batches"}'
