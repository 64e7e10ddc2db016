#!/usr/bin/env bash
# A real Slurm on this one host for tests/e2e/slurm.rs: munged, slurmctld and four
# virtual nodes n1..n4 (one slurmd -N nX each), started by hand as root without systemd.
# Four, not fewer: Slurm gives each component of a heterogeneous job nodes of its own, and a
# run has four (tokenizer, producers, shuffler, trainers); with three it stays pending. Usage: start.sh DIR (state, logs and
# slurm.conf go there; DIR/env is sourced for SLURM_CONF). Stop with stop.sh DIR.
set -euo pipefail
DIR=$(realpath -m "$1")
mkdir -p "$DIR"/{state,log,spool}
HOST=$(hostname)
# Ports of our own, away from a system Slurm's defaults.
BASE=${SAESTREAM_SLURM_PORT:-16817}
cat > "$DIR/slurm.conf" <<CONF
ClusterName=saetest
SlurmctldHost=$HOST
SlurmctldPort=$BASE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
NodeName=n[1-4] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((BASE + 1))-$((BASE + 4)) CPUs=4 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n[1-4] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
echo "export SLURM_CONF=$DIR/slurm.conf" > "$DIR/env"
export SLURM_CONF=$DIR/slurm.conf
mkdir -p /run/munge /var/log/munge /var/lib/munge
[ -f /etc/munge/munge.key ] || mungekey --create --force 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
chmod 0400 /etc/munge/munge.key
# munged: ours to stop only if we start it (stop.sh reads DIR/munged.ours).
if ! pgrep -x munged >/dev/null; then
    munged --force
    touch "$DIR/munged.ours"
fi
slurmctld -f "$SLURM_CONF"
for n in n1 n2 n3 n4; do
    mkdir -p "$DIR/spool/$n"
    slurmd -f "$SLURM_CONF" -N "$n"
done
# Ready when all three nodes are idle (bounded).
for _ in $(seq 150); do
    if [ "$(sinfo -h -o '%t %D' 2>/dev/null | awk '$1=="idle"{s+=$2} END{print s+0}')" = 4 ]; then
        exit 0
    fi
    sleep 0.2
done
echo "slurm did not come up: $(sinfo 2>&1)" >&2
tail -5 "$DIR"/log/*.log >&2
exit 1
