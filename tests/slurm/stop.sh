#!/usr/bin/env bash
# Stops what start.sh DIR started (munged stays: other users may share it).
DIR=$(realpath -m "$1")
for f in "$DIR"/slurmd-*.pid "$DIR"/slurmctld.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
done
exit 0
