#!/usr/bin/env bash
# Stops what start.sh DIR started (munged only if start.sh started it).
DIR=$(realpath -m "$1")
for f in "$DIR"/slurmd-*.pid "$DIR"/slurmctld.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
done
if [ -f "$DIR/munged.ours" ]; then
    pkill -x munged 2>/dev/null
fi
exit 0
