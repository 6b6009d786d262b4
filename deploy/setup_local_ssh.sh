#!/usr/bin/env bash
# An ssh server on loopback for `ray up deploy/ray-local.yaml` on one machine.
#
#   bash deploy/setup_local_ssh.sh up       # install, configure and start it (idempotent)
#   bash deploy/setup_local_ssh.sh status   # exit 0 when it runs
#   bash deploy/setup_local_ssh.sh down     # stop it (by its pidfile) and everything it started
#   bash deploy/setup_local_ssh.sh purge    # down, then delete the state directory
#
# What `up` does:
#  - installs openssh-server and rsync from Debian when missing (no service is started by
#    the package: a policy-rc.d keeps it down);
#  - makes a throwaway key pair and authorises it for root, in its own authorized_keys
#    file ($STATE/authorized_keys, named by its own sshd_config): ~root/.ssh is untouched;
#  - runs its own sshd, listening on 127.0.0.2:22 and 127.0.0.3:22 only (Ray rewrites
#    127.0.0.1 to the external address, so the nodes need other loopback addresses);
#  - runs that sshd in a private PID namespace: `ray down` runs a bare `ray stop` on the
#    head, which kills every Ray process it can see; inside the namespace it only sees
#    this cluster's, so other Ray instances on the machine survive. Stopping the sshd
#    (`down`) ends the namespace, and with it whatever the cluster left running;
#  - gives root a private home inside that namespace ($STATE/home, through a copy of
#    /etc/passwd bind-mounted over it there only) whose .bashrc puts this checkout's
#    virtualenv first on PATH and sets RAY_AUTH_MODE=disabled, PDSERVE_HOME and
#    XDG_CACHE_HOME: `ray up`'s login shells, `ray exec`, `ray submit` and `ray down` find
#    `ray`, `python` and `pdserve` there, and the files `ray up` writes
#    (~/ray_bootstrap_config.yaml, ~/ray_bootstrap_key.pem) stay out of root's real home,
#    whose dotfiles are not read.
#
# Exit status: 0 ok; 3 this machine cannot run it (not root, no apt-get and no sshd, or no
# PID namespaces); 1 anything else. Environment: PDSERVE_RAY_LOCAL_DIR (state directory,
# default ~/.cache/pdserve/ray-local; ray-local.yaml names the key inside it),
# PDSERVE_SSH_ADDRESSES (default "127.0.0.2 127.0.0.3"), PDSERVE_SSH_PORT (default 22).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${PDSERVE_RAY_LOCAL_DIR:-${HOME:-/root}/.cache/pdserve/ray-local}
ADDRESSES=${PDSERVE_SSH_ADDRESSES:-127.0.0.2 127.0.0.3}
PORT=${PDSERVE_SSH_PORT:-22}
VENV_BIN=${PDSERVE_VENV_BIN:-$REPO/.venv/bin}
SSHD=/usr/sbin/sshd
CONFIG=$STATE/sshd_config
PIDFILE=$STATE/sshd.pid
LOG=$STATE/sshd.log
KEY=$STATE/id_ed25519

say() { echo "setup_local_ssh: $*" >&2; }
cannot() { say "cannot run here: $*"; exit 3; }

# The pid in the pidfile, if that process is still our sshd (guards against pid reuse).
running_pid() {
    [[ -f $PIDFILE ]] || return 1
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "-f $CONFIG" || return 1
    echo "$pid"
}

install_packages() {
    if [[ -x $SSHD ]] && command -v rsync >/dev/null && command -v ssh-keygen >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null || cannot "sshd/rsync are missing and there is no apt-get"
    say "installing openssh-server and rsync (apt-get)"
    # Keep the package's own sshd (all interfaces, port 22) from being started.
    local made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local rc=0
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends openssh-server openssh-client rsync >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends \
                 openssh-server openssh-client rsync >/dev/null; } || rc=$?
    [[ $made_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d
    [[ $rc == 0 ]] || { say "apt-get failed ($rc)"; exit 1; }
}

write_files() {
    mkdir -p "$STATE/home"
    chmod 700 "$STATE" "$STATE/home"
    [[ -f $KEY ]] || ssh-keygen -q -t ed25519 -N '' -C pdserve-ray-local -f "$KEY"
    [[ -f $STATE/ssh_host_ed25519_key ]] \
        || ssh-keygen -q -t ed25519 -N '' -C pdserve-ray-local-host -f "$STATE/ssh_host_ed25519_key"
    install -m 600 "$KEY.pub" "$STATE/authorized_keys"

    # Login shells of the ssh sessions (Ray runs `bash --login -c -i 'source ~/.bashrc; ...'`).
    cat >"$STATE/home/.bashrc" <<EOF
# Written by deploy/setup_local_ssh.sh for the pdserve ray-local cluster's ssh sessions.
case ":\$PATH:" in *":$VENV_BIN:"*) ;; *) export PATH="$VENV_BIN:\$PATH" ;; esac
export PDSERVE_HOME="$REPO"
export XDG_CACHE_HOME="${HOME:-/root}/.cache"
export RAY_AUTH_MODE=disabled
export RAY_USAGE_STATS_ENABLED=0
EOF
    printf '. "$HOME/.bashrc"\n' >"$STATE/home/.profile"
    # root's home is $STATE/home for the namespace's processes (sshd sets HOME from it, and
    # ssh expands the `-i ~/ray_bootstrap_key.pem` of the head's autoscaler with it).
    awk -F: -v OFS=: -v h="$STATE/home" '$1 == "root" { $6 = h } 1' /etc/passwd >"$STATE/passwd"
    chmod 644 "$STATE/passwd"

    local listen=""
    for a in $ADDRESSES; do listen+="ListenAddress $a:$PORT"$'\n'; done
    cat >"$CONFIG" <<EOF
# Written by deploy/setup_local_ssh.sh: loopback only, key only, root only.
${listen}HostKey $STATE/ssh_host_ed25519_key
AuthorizedKeysFile $STATE/authorized_keys
PermitRootLogin prohibit-password
AllowUsers root
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PrintMotd no
PermitUserEnvironment no
MaxStartups 64:30:128
MaxSessions 64
ClientAliveInterval 30
Subsystem sftp internal-sftp
EOF
}

port_taken() {  # $1 address: is something already listening on it?
    ss -Hltn "sport = :$PORT" 2>/dev/null | awk '{print $4}' \
        | grep -qE "^($1|0\.0\.0\.0|\*|\[::\]):$PORT$"
}

wait_ssh() {
    local deadline=$((SECONDS + 20)) a
    for a in $ADDRESSES; do
        until ssh -i "$KEY" -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no \
                -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=3 \
                -p "$PORT" "root@$a" true 2>/dev/null; do
            if (( SECONDS > deadline )); then
                say "sshd does not answer on $a:$PORT; log $LOG:"; tail -20 "$LOG" >&2 || true
                return 1
            fi
            sleep 0.3
        done
    done
}

cmd_up() {
    [[ $(id -u) == 0 ]] || cannot "needs root (it installs packages and runs sshd on port $PORT)"
    install_packages
    write_files
    local pid
    if pid=$(running_pid); then
        wait_ssh
        say "already running (pid $pid)"
        return 0
    fi
    for a in $ADDRESSES; do
        ! port_taken "$a" || { say "$a:$PORT is already in use by another process"; exit 1; }
    done
    unshare --pid --fork --mount-proc true 2>/dev/null \
        || cannot "no PID namespaces (unshare --pid failed): without one, \`ray down\` would" \
                  "stop every Ray process on this machine"
    mkdir -p /run/sshd && chmod 755 /run/sshd
    "$SSHD" -t -f "$CONFIG" || { say "sshd rejected $CONFIG"; exit 1; }
    : >"$LOG"
    # sshd -D is PID 1 of the namespace (it reaps what the sessions leave behind); the
    # pidfile holds its pid as seen from here.
    # The bind mount stays inside the namespace (unshare makes its mounts private).
    setsid unshare --pid --fork --mount-proc --kill-child /bin/sh -c \
        'mount --bind "$1" /etc/passwd && exec "$2" -D -f "$3" -E "$4" -o PidFile=none' sh \
        "$STATE/passwd" "$SSHD" "$CONFIG" "$LOG" </dev/null >>"$LOG" 2>&1 &
    local outer=$! deadline=$((SECONDS + 10))
    pid=""
    while [[ -z $pid ]]; do
        pid=$(cat "/proc/$outer/task/$outer/children" 2>/dev/null | awk '{print $1}') || true
        if [[ -z $pid ]]; then
            if ! kill -0 "$outer" 2>/dev/null; then
                say "sshd exited; log $LOG:"; tail -20 "$LOG" >&2; exit 1
            fi
            (( SECONDS < deadline )) || { say "sshd did not start"; kill "$outer"; exit 1; }
            sleep 0.1
        fi
    done
    echo "$pid" >"$PIDFILE"
    wait_ssh || { cmd_down; exit 1; }
    say "sshd running (pid $pid) on $(echo $ADDRESSES | sed "s/ /:$PORT, /g"):$PORT; key $KEY"
}

cmd_down() {
    local pid
    if ! pid=$(running_pid); then
        rm -f "$PIDFILE"
        say "not running"
        return 0
    fi
    kill -TERM "$pid"
    local deadline=$((SECONDS + 10))
    while [[ -d /proc/$pid ]] && (( SECONDS < deadline )); do sleep 0.1; done
    [[ -d /proc/$pid ]] && kill -KILL "$pid" 2>/dev/null || true
    rm -f "$PIDFILE"
    say "stopped sshd (pid $pid) and its namespace"
}

case "${1:-up}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status)
        if pid=$(running_pid); then echo "running (pid $pid)"; else echo "not running"; exit 1; fi ;;
    purge) cmd_down; rm -rf "$STATE"; say "removed $STATE" ;;
    *) echo "usage: $0 [up|down|status|purge]" >&2; exit 2 ;;
esac
