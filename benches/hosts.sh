#!/usr/bin/env bash
# The example sweep (examples/sweep.yaml: 4 TopK SAEs, 245,760 tokens) across hosts made
# of network namespaces on this machine, with 1 and then 2 producer hosts: tokenizer on
# h1, producers on h2 (and h3), shuffler and trainers with the orchestrator on h4, every
# connection over TLS with the run's token. For comparison, the same sweep with the local
# launcher on loopback. One JSON line per run; tokens/s = trained tokens / training wall
# time (summary.json), and each producer's own rate from its summary. Needs root.
#
#   cargo build --release -p pipeline -p activation-producer -p shuffler -p sae-trainer
#   bash benches/hosts.sh [WORKDIR]
#
# The tokenizer comes from the release build if there, else the debug one (on PATH).
set -euo pipefail
T=${CARGO_TARGET_DIR:-$HOME/.cache/saestream-target}
B=$T/release
export PATH=$B:$T/debug:$PATH
W=${1:-/tmp/saestream-hosts-bench}
EX=$(cd "$(dirname "$0")/.." && pwd)/examples
rm -rf "$W" && mkdir -p "$W"
tag=hb$$
BR=${tag}br
cleanup() {
    for i in 1 2 3 4; do
        ip netns pids "${tag}h$i" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "${tag}h$i" 2>/dev/null || true
    done
    ip netns del "$BR" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$BR"
ip -n "$BR" link add br0 type bridge
ip -n "$BR" link set br0 up
for i in 1 2 3 4; do
    ns=${tag}h$i
    ip netns add "$ns"
    ip link add "${tag}v$i" type veth peer name "${tag}b$i"
    ip link set "${tag}v$i" netns "$ns"
    ip link set "${tag}b$i" netns "$BR"
    ip -n "$BR" link set "${tag}b$i" master br0
    ip -n "$BR" link set "${tag}b$i" up
    ip -n "$ns" addr add "10.78.0.$i/24" dev "${tag}v$i"
    ip -n "$ns" link set "${tag}v$i" up
    ip -n "$ns" link set lo up
done
on() { local h=$1; shift; ip netns exec "${tag}h$h" "$@"; }

sweep() { # sweep file with P producers
    sed -e "s|^model_name: model|model_name: $EX/model|" \
        -e "s|^dataset_path: corpus.jsonl|dataset_path: $EX/corpus.jsonl|" \
        -e "s|^  producers: 1|  producers: $1|" "$EX/sweep.yaml" > "$W/sweep-$1.yaml"
    echo "$W/sweep-$1.yaml"
}

report() { # run dir, label, producers
    python3 - "$1" "$2" "$3" <<'PY'
import glob, json, sys
run, label, p = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = json.load(open(f"{run}/summary.json"))
tokens = 245760
prod = []
for f in sorted(glob.glob(f"{run}/../stage-{label}-producer-*.log")) + sorted(glob.glob(f"{run}/logs/producer-*.log")):
    for l in open(f):
        try:
            v = json.loads(l)
        except ValueError:
            continue
        if "tokens_per_second" in v:
            prod.append(round(v["tokens_per_second"]))
print(json.dumps({"bench": "hosts", "launcher": label, "producers": p, "train_tokens": tokens,
                  "train_wall_s": round(s["train_wall_seconds"], 2),
                  "tokens_per_second": round(tokens / s["train_wall_seconds"]),
                  "producer_tokens_per_second": prod,
                  "sae_tokens_per_second": [round(x["tokens_per_second"]) for x in s["points"]]}))
PY
}

for P in 1 2; do
    f=$(sweep $P)
    rd=$W/run-netns-$P
    on 4 pipeline run "$f" --output "$rd" --launcher manual --advertise 10.78.0.4 \
        --progress-every 1000 > "$W/orch-$P.out" 2> "$W/orch-$P.err" &
    orch=$!
    for _ in $(seq 600); do [ -f "$rd/rendezvous.json" ] && break; sleep 0.1; done
    on 1 pipeline stage tokenizer --run-dir "$rd" > "$W/stage-netns-$P-tokenizer.log" 2>&1 &
    for i in $(seq 0 $((P - 1))); do
        on $((2 + i)) pipeline stage producer --index $i --run-dir "$rd" > "$W/stage-netns-$P-producer-$i.log" 2>&1 &
    done
    on 4 pipeline stage shuffler --run-dir "$rd" > "$W/stage-netns-$P-shuffler.log" 2>&1 &
    n=$(python3 -c 'import json,sys; print(sum(s["role"]=="trainer" for s in json.load(open(sys.argv[1]))))' "$rd/stages.json")
    for k in $(seq 0 $((n - 1))); do
        on 4 pipeline stage trainer --index $k --run-dir "$rd" > "$W/stage-netns-$P-trainer-$k.log" 2>&1 &
    done
    wait $orch || { tail -5 "$W/orch-$P.err" >&2; exit 1; }
    wait
    report "$rd" "netns-$P" $P
    f=$(sweep $P)
    pipeline run "$f" --output "$W/run-local-$P" --progress-every 1000 > /dev/null 2>&1
    report "$W/run-local-$P" local $P
done
