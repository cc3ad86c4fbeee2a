#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for hpcckpt's tests.
#
#   cluster.sh install            apt-get Slurm + munge (only what is missing)
#   cluster.sh start  [STATE_DIR] write the config, start munged, slurmctld, two slurmd
#   cluster.sh stop   [STATE_DIR] kill every daemon this script started (pid files)
#   cluster.sh status [STATE_DIR] exit 0 when all daemons are alive, print sinfo
#
# STATE_DIR defaults to $HPCCKPT_SLURM_STATE, else /tmp/hpcckpt-slurm. Everything lives
# there (config, munge key and socket, spool, logs, pid files), so nothing in /etc is
# needed and the system's own Slurm/munge (if any) is untouched. Clients must export
# SLURM_CONF=STATE_DIR/slurm.conf (start prints it).
#
# Optional environment:
#   HPCCKPT_SLURM_PORT_BASE  slurmctld port; the nodes use the next ones (default 17817)
#   HPCCKPT_SLURM_CGROUP     1 = proctrack/cgroup, 0 = proctrack/linuxproc
#                            (default: cgroup when the v1 freezer is writable)
#   HPCCKPT_SLURM_GRACE      GraceTime of the preemptable partition, seconds (default 20)
#   HPCCKPT_SLURM_EXTRA_CONF a file whose lines are appended to slurm.conf
#                            (Prolog=, PlugStackConfig=, ... for the integration tests)
#
# The settings (why each: docs/slurm.md) are the measured ones that make
# requeue, preemption and node failure take seconds instead of minutes.
set -euo pipefail

NODES=(node1 node2)
PACKAGES=(slurmctld slurmd slurm-client munge libslurm-dev)

cmd=${1:-}
state=${2:-${HPCCKPT_SLURM_STATE:-/tmp/hpcckpt-slurm}}
port_base=${HPCCKPT_SLURM_PORT_BASE:-17817}
grace=${HPCCKPT_SLURM_GRACE:-20}

log() { echo "cluster.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

conf="$state/slurm.conf"
run="$state/run"
logs="$state/log"
munge_dir="$state/munge"
munge_socket="$munge_dir/munge.socket.2"

# --- install -------------------------------------------------------------------------

do_install() {
  local missing=()
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    return 0
  fi
  [ "$(id -u)" -eq 0 ] || die "need root to apt-get install ${missing[*]}"
  log "apt-get install ${missing[*]}"
  apt-get update -qq || die "apt-get update failed (no network or mirror?)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >"${TMPDIR:-/tmp}/hpcckpt-slurm-apt.log" 2>&1 \
    || { tail -20 "${TMPDIR:-/tmp}/hpcckpt-slurm-apt.log" >&2; die "apt-get install ${missing[*]} failed"; }
}

# --- helpers -------------------------------------------------------------------------

proc_alive() {  # proc_alive PID: a live process, not a zombie
  local pid=$1 stat
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # A dead daemon stays a zombie until init reaps it (here up to ~2 s), and kill -0
  # still succeeds on a zombie.
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

pid_alive() {  # pid_alive FILE: the pid in FILE names a live process
  [ -s "$1" ] && proc_alive "$(cat "$1")"
}

all_alive() {
  pid_alive "$munge_dir/munged.pid" || return 1
  pid_alive "$run/slurmctld.pid" || return 1
  for n in "${NODES[@]}"; do pid_alive "$run/slurmd-$n.pid" || return 1; done
}

use_cgroup() {
  case "${HPCCKPT_SLURM_CGROUP:-auto}" in
    1) return 0 ;;
    0) return 1 ;;
  esac
  # Slurm 22.05's cgroup/v1 plugin needs the v1 freezer hierarchy and the right to
  # create directories in it (not the case in most unprivileged containers).
  local probe=/sys/fs/cgroup/freezer/hpcckpt_probe_$$
  [ -d /sys/fs/cgroup/freezer ] || return 1
  mkdir "$probe" 2>/dev/null || return 1
  rmdir "$probe"
}

write_config() {
  local host ctld_port proctrack task n i
  host=$(hostname -s)
  ctld_port=$port_base
  if use_cgroup; then
    proctrack=proctrack/cgroup
    task=task/cgroup,task/affinity
    cat >"$state/cgroup.conf" <<EOF
# Written by hpcckpt tests/slurm_cluster/cluster.sh
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
  else
    proctrack=proctrack/linuxproc
    task=task/none
    rm -f "$state/cgroup.conf"
  fi
  {
    cat <<EOF
# Written by hpcckpt tests/slurm_cluster/cluster.sh; regenerated on every fresh start.
ClusterName=hpcckpt
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again after 10 s instead of 120 s.
AuthInfo=socket=$munge_socket,cred_expire=10
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool/%n
SlurmctldPidFile=$run/slurmctld.pid
SlurmdPidFile=$run/slurmd-%n.pid
SlurmctldLogFile=$logs/slurmctld.log
SlurmdLogFile=$logs/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=$proctrack
TaskPlugin=$task
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$logs/jobcomp.txt
# Fast failure detection: a killed slurmd is DOWN and its job requeued in ~12 s.
SlurmdTimeout=5
MessageTimeout=3
ReturnToService=2
JobRequeue=1
KillWait=5
InactiveLimit=0
MinJobAge=600
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
# Preemption: a job in "high" requeues a job in "low" after GraceTime; with
# preempt_send_user_signal the job's --signal reaches it when preemption starts.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
EOF
    i=1
    for n in "${NODES[@]}"; do
      echo "NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$((ctld_port + i)) CPUs=1 RealMemory=256 State=UNKNOWN"
      i=$((i + 1))
    done
    local nodelist
    nodelist=$(IFS=,; echo "${NODES[*]}")
    echo "PartitionName=low Nodes=$nodelist Default=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime=$grace MaxTime=INFINITE State=UP"
    echo "PartitionName=high Nodes=$nodelist Default=NO PriorityTier=10 PreemptMode=OFF MaxTime=INFINITE State=UP"
    if [ -n "${HPCCKPT_SLURM_EXTRA_CONF:-}" ]; then
      echo "# from $HPCCKPT_SLURM_EXTRA_CONF"
      cat "$HPCCKPT_SLURM_EXTRA_CONF"
    fi
  } >"$conf"
}

start_munge() {
  pid_alive "$munge_dir/munged.pid" && return 0
  id munge >/dev/null 2>&1 || die "user munge missing (run: $0 install)"
  mkdir -p "$munge_dir"
  chown munge:munge "$munge_dir"
  chmod 0700 "$munge_dir"
  if [ ! -s "$munge_dir/munge.key" ]; then
    dd if=/dev/urandom of="$munge_dir/munge.key" bs=1024 count=1 status=none
  fi
  chown munge:munge "$munge_dir/munge.key"
  chmod 0400 "$munge_dir/munge.key"
  rm -f "$munge_socket" "$munge_socket.lock"
  runuser -u munge -- munged --force \
    --socket="$munge_socket" --key-file="$munge_dir/munge.key" \
    --pid-file="$munge_dir/munged.pid" --log-file="$munge_dir/munged.log" \
    --seed-file="$munge_dir/munged.seed" \
    || die "munged failed to start; see $munge_dir/munged.log"
  # The socket directory is munge's own 0700 directory: let root (slurm) in.
  chmod 0711 "$munge_dir"
}

wait_idle() {
  local deadline=$((SECONDS + 60)) out
  while [ $SECONDS -lt $deadline ]; do
    out=$(SLURM_CONF="$conf" sinfo -h -N -o '%N %t' 2>/dev/null || true)
    if [ -n "$out" ] && [ "$(echo "$out" | awk '$2=="idle"' | sort -u | wc -l)" -eq ${#NODES[@]} ]; then
      return 0
    fi
    sleep 0.3
  done
  log "nodes not idle after 60 s:"
  SLURM_CONF="$conf" sinfo -N >&2 || true
  tail -n 5 "$logs"/slurm*.log >&2 || true
  die "cluster did not become ready"
}

# --- start / stop / status -------------------------------------------------------------

do_start() {
  command -v slurmctld >/dev/null || die "slurmctld not installed (run: $0 install)"
  mkdir -p "$state"
  chmod 0755 "$state"   # munged runs as user munge and must reach its own directory
  mkdir -p "$run" "$logs"
  if all_alive; then
    wait_idle
    echo "SLURM_CONF=$conf"
    return 0
  fi
  export SLURM_CONF="$conf"
  if pid_alive "$munge_dir/munged.pid" && pid_alive "$run/slurmctld.pid"; then
    # Only nodes are missing (a test killed one): bring back just those; with
    # ReturnToService=2 they are idle again within about a second.
    for n in "${NODES[@]}"; do
      pid_alive "$run/slurmd-$n.pid" && continue
      log "restarting slurmd $n"
      slurmd -N "$n" || die "slurmd -N $n failed; see $logs/slurmd-$n.log"
    done
    wait_idle
    echo "SLURM_CONF=$conf"
    return 0
  fi
  # Controller or munge gone: restart everything from a clean slate.
  do_stop
  mkdir -p "$run" "$logs"
  rm -rf "$state/ctld" "$state/spool"
  mkdir -p "$state/ctld"
  for n in "${NODES[@]}"; do mkdir -p "$state/spool/$n"; done
  write_config
  start_munge
  slurmctld -i || { tail -n 20 "$logs/slurmctld.log" >&2; die "slurmctld failed; see $logs/slurmctld.log"; }
  for n in "${NODES[@]}"; do
    slurmd -N "$n" || die "slurmd -N $n failed; see $logs/slurmd-$n.log"
  done
  wait_idle
  echo "SLURM_CONF=$conf"
}

kill_pidfiles() {  # kill_pidfiles FILE...: TERM all, wait up to 10 s, KILL what is left
  local f pid pids=() i
  for f in "$@"; do
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for i in $(seq 100); do
    local alive=0
    for pid in "${pids[@]}"; do proc_alive "$pid" && alive=1; done
    [ $alive -eq 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if proc_alive "$pid"; then
      log "pid $pid ignored SIGTERM for 10 s; SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  rm -f "$@"
}

our_stepds() {  # slurmstepd processes of this cluster (they inherit our SLURM_CONF)
  local p
  for p in $(pgrep -x slurmstepd 2>/dev/null || true); do
    if tr "\\0" "\\n" 2>/dev/null <"/proc/$p/environ" | grep -qx "SLURM_CONF=$conf"; then
      echo "$p"
    fi
  done
}

our_job_procs() {  # processes of jobs run by this cluster (SLURM_CONF + SLURM_JOB_ID)
  local p envs
  for p in $(ls /proc | grep -E '^[0-9]+$'); do
    [ "$p" = "$$" ] && continue
    envs=$(tr "\\0" "\\n" 2>/dev/null <"/proc/$p/environ") || continue
    if grep -qx "SLURM_CONF=$conf" <<<"$envs" && grep -q '^SLURM_JOB_ID=' <<<"$envs"; then
      echo "$p"
    fi
  done
}

do_stop() {
  local n p i
  # Cancel jobs first so slurmd and slurmstepd clean up after them normally.
  if pid_alive "$run/slurmctld.pid"; then
    local jobs
    jobs=$(SLURM_CONF="$conf" timeout 10 squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      SLURM_CONF="$conf" timeout 10 scancel $jobs 2>/dev/null || true
      for i in $(seq 50); do [ -z "$(our_stepds)" ] && break; sleep 0.1; done
    fi
  fi
  local files=("$run/slurmctld.pid")
  for n in "${NODES[@]}"; do files+=("$run/slurmd-$n.pid"); done
  kill_pidfiles "${files[@]}"
  # Job steps (and their jobs) outlive a dead slurmd: kill what is left.
  for p in $(our_stepds) $(our_job_procs); do kill -KILL "$p" 2>/dev/null || true; done
  kill_pidfiles "$munge_dir/munged.pid"
  return 0
}

do_status() {
  local ok=0
  pid_alive "$munge_dir/munged.pid" && echo "munged: running" || { echo "munged: stopped"; ok=1; }
  pid_alive "$run/slurmctld.pid" && echo "slurmctld: running" || { echo "slurmctld: stopped"; ok=1; }
  for n in "${NODES[@]}"; do
    pid_alive "$run/slurmd-$n.pid" && echo "slurmd $n: running" || { echo "slurmd $n: stopped"; ok=1; }
  done
  if [ $ok -eq 0 ]; then
    echo "SLURM_CONF=$conf"
    SLURM_CONF="$conf" sinfo -N 2>&1 || ok=1
  fi
  return $ok
}

case "$cmd" in
  install) do_install ;;
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  *) echo "usage: $0 {install|start|stop|status} [STATE_DIR]" >&2; exit 2 ;;
esac
