#!/usr/bin/env bash
# A two-node Slurm cluster on this one machine for the Slurm tests: `start` or `stop`. Run as root.
# Nodes n1 and n2 are two slurmd (`slurmd -N`) on their own loopback addresses (127.0.0.2:6818,
# 127.0.0.3:6819); slurmctld listens for clients on 127.0.0.1. The node names resolve only inside a
# private mount namespace (`unshare -m`, a hosts file bind-mounted over /etc/hosts) in which the
# daemons, and so the jobs' tasks, run: the machine's own files are not edited, and every connection
# (Slurm's, and the jobs' gloo / TCPStore traffic) stays on loopback. The config is
# $SLURM_TEST_DIR/slurm.conf: clients need SLURM_CONF pointing there (the tests set it).
# `stop` ends the daemons this script started (pid files under $SLURM_TEST_DIR), munged included
# when this script had to start it.
# Seen working on the project's machine kind (Debian 12, slurm 22.05, gVisor): sinfo shows both
# nodes idle and Submitit's AutoExecutor runs 1- and 2-node jobs on them.
# Facts seen with it: `scontrol requeue JOB` puts the job back PENDING with reason BeginTime (Slurm
# delays a requeued job); `scontrol update JobId=JOB StartTime=now` releases it at once, and the
# restarted job sees SLURM_RESTART_COUNT=1. sacct warns that accounting is off: harmless.
set -euo pipefail
STATE=${SLURM_TEST_DIR:-/tmp/colearn-slurm}
cmd=${1:-start}
export SLURM_CONF=$STATE/slurm.conf

stop_slurm() {
  for pidf in "$STATE"/slurmd.*.pid "$STATE/slurmctld.pid"; do
    [ -f "$pidf" ] || continue
    kill "$(cat "$pidf")" 2>/dev/null || true
    rm -f "$pidf"
  done
}

stop() {
  # Jobs still running (a failed test) first: their tasks are processes this script's daemons started.
  if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    scancel --quiet --full --signal=KILL --user="$(id -un)" 2>/dev/null || true
    sleep 1
  fi
  stop_slurm
  if [ -f "$STATE/munged.pid" ]; then
    kill "$(cat "$STATE/munged.pid")" 2>/dev/null || true
    rm -f "$STATE/munged.pid"
  fi
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
# Both nodes describe the same cores: a 2-node job on a 2-core machine is oversubscribed, not wrong.
cat > "$SLURM_CONF" <<CONF
ClusterName=colearn-test
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.%n.log
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.%n.pid
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
NodeName=n1 NodeAddr=127.0.0.2 NodeHostname=$host Port=6818 CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.3 NodeHostname=$host Port=6819 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=n1,n2 MaxTime=INFINITE State=UP PriorityTier=2
CONF
{ grep -v -w -e n1 -e n2 /etc/hosts; echo "127.0.0.2 n1"; echo "127.0.0.3 n2"; } > "$STATE/hosts"

stop_slurm  # a cluster left by an earlier run; munged (started above) stays
sleep 1
# slurmctld -c: a clean start, jobs left by an earlier run of the tests must not hold the nodes.
unshare -m --propagation private sh -c "mount --bind '$STATE/hosts' /etc/hosts && slurmctld -c && slurmd -N n1 && slurmd -N n2"
for _ in $(seq 30); do
  [ "$(sinfo -h -N -p debug -o %T 2>/dev/null | grep -c idle)" -eq 2 ] && { sinfo -N; exit 0; }
  sleep 1
done
echo "slurm did not come up: $(sinfo -N 2>&1 | tail -3); logs in $STATE/log" >&2
exit 1
