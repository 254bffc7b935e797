#!/usr/bin/env bash
# A single-node Slurm cluster on this machine for the Slurm tests: `start` or `stop`. Run as root.
# Seen working on the project's machine kind (Debian 12, slurm 22.05): sinfo shows the node idle
# and Submitit's AutoExecutor runs jobs on it.
# Facts seen with it: `scontrol requeue JOB` puts the job back PENDING with reason BeginTime (Slurm
# delays a requeued job); `scontrol update JobId=JOB StartTime=now` releases it at once, and the
# restarted job sees SLURM_RESTART_COUNT=1. sacct warns that accounting is off: harmless.
set -euo pipefail
STATE=${SLURM_TEST_DIR:-/tmp/colearn-slurm}
cmd=${1:-start}

stop_slurm() {
  for pidf in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
    [ -f "$pidf" ] && kill "$(cat "$pidf")" 2>/dev/null || true
  done
}

stop() {
  stop_slurm
  [ -f "$STATE/munged.pid" ] && kill "$(cat "$STATE/munged.pid")" 2>/dev/null || true
}

if [ "$cmd" = stop ]; then stop; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
mkdir -p "$STATE"/{state,spool,log} /etc/munge /run/munge /var/log/munge /var/lib/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 400 /etc/munge/munge.key
# munged may be left stopped by the package install, or die on its first start: retry until it answers.
for _ in $(seq 10); do
  munge -n >/dev/null 2>&1 && break
  munged --force --pid-file="$STATE/munged.pid" 2>>"$STATE/log/munged.err" || true
  sleep 1
done
munge -n >/dev/null 2>&1 || { echo "munged did not start: $(tail -3 "$STATE/log/munged.err")" >&2; exit 1; }

host=$(hostname -s)
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS, which a test process may have set
mem=$(( $(free -m | awk '/Mem:/{print $2}') - 1024 ))
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=colearn-test
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

stop_slurm  # a cluster left by an earlier run; munged (started above) stays
sleep 1
slurmctld -c  # clean start: jobs left by an earlier run of the tests must not hold the node
slurmd
for _ in $(seq 30); do
  sinfo -h -o %T 2>/dev/null | grep -q idle && { sinfo; exit 0; }
  sleep 1
done
echo "slurm did not come up; logs in $STATE/log" >&2
exit 1
