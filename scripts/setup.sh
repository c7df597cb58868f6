#!/usr/bin/env bash
# Prepares this machine for `make run` / `make test`: system packages, a Docker engine,
# a local etcd and the project's virtualenv. Idempotent, and fast when all is in place.
# It exports nothing; other targets use .venv/bin/... directly.
# It never stops a daemon: those it starts keep running after it exits (logs in .run/).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
RUN_DIR=$ROOT/.run
VENV=$ROOT/.venv

# Debian packages the project needs, and what must exist once they are installed.
# Later additions (haproxy, prometheus) go in both lists.
APT_PACKAGES=(docker.io etcd-server etcd-client busybox-static debootstrap systemd prometheus haproxy iproute2 nftables podman chromium)
REQUIRED=(dockerd etcd etcdctl /bin/busybox debootstrap systemd-analyze prometheus promtool haproxy ip nft podman chromium)

ETCD_URL=${REGISTRAR_ETCD:-http://127.0.0.1:2379}
ETCD_URL=${ETCD_URL%%,*}   # first endpoint only
ETCD_URL=${ETCD_URL%/}

log() { echo "setup: $*"; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

# wait_started NAME PID SECONDS LOG CHECK: until CHECK succeeds; fails with the log's tail when
# the daemon exits first or does not answer in time.
wait_started() {
    local name=$1 pid=$2 limit=$3 logfile=$4 check=$5
    local deadline=$((SECONDS + limit))
    until "$check"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$logfile" >&2 || true
            die "$name exited before answering (log: $logfile)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 30 "$logfile" >&2 || true
            die "$name did not answer within $limit s (log: $logfile)"
        fi
        sleep 0.2
    done
    log "$name is up"
}

mkdir -p "$RUN_DIR"

# --- system packages ---------------------------------------------------------------------
missing=()
for item in "${REQUIRED[@]}"; do
    if [[ $item == /* ]]; then
        [[ -e $item ]] || missing+=("$item")
    else
        command -v "$item" >/dev/null 2>&1 || missing+=("$item")
    fi
done
if ((${#missing[@]})); then
    log "installing ${APT_PACKAGES[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$RUN_DIR/apt.log" 2>&1 || { tail -n 20 "$RUN_DIR/apt.log" >&2; die "apt-get update failed"; }
    apt-get install -y -qq "${APT_PACKAGES[@]}" >>"$RUN_DIR/apt.log" 2>&1 \
        || { tail -n 20 "$RUN_DIR/apt.log" >&2; die "apt-get install failed (log: $RUN_DIR/apt.log)"; }
    for item in "${missing[@]}"; do
        if [[ $item == /* ]]; then [[ -e $item ]]; else command -v "$item" >/dev/null 2>&1; fi \
            || die "$item still missing after installing ${APT_PACKAGES[*]}"
    done
fi

# --- Docker engine -----------------------------------------------------------------------
docker_ok() { timeout 10 docker info >/dev/null 2>&1; }
if ! docker_ok; then
    log "starting dockerd (log: .run/dockerd.log)"
    setsid dockerd --host=unix:///var/run/docker.sock >"$RUN_DIR/dockerd.log" 2>&1 </dev/null &
    wait_started dockerd $! 60 "$RUN_DIR/dockerd.log" docker_ok
fi

# --- etcd --------------------------------------------------------------------------------
etcd_ok() {
    ETCDCTL_API=3 etcdctl --endpoints="$ETCD_URL" --dial-timeout=2s --command-timeout=3s \
        endpoint health >/dev/null 2>&1
}
if ! etcd_ok; then
    if [[ $ETCD_URL =~ ^http://(127\.[0-9]+\.[0-9]+\.[0-9]+|localhost):([0-9]+)$ ]]; then
        host=${BASH_REMATCH[1]}
        port=${BASH_REMATCH[2]}
        peer_url=http://$host:$((port + 1))
        log "starting etcd on $ETCD_URL (log: .run/etcd.log)"
        setsid etcd --name registrar-dev --data-dir "$RUN_DIR/etcd" \
            --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
            --listen-peer-urls "$peer_url" --initial-advertise-peer-urls "$peer_url" \
            --initial-cluster "registrar-dev=$peer_url" --initial-cluster-state new \
            --logger zap --log-outputs stderr --log-level warn \
            >"$RUN_DIR/etcd.log" 2>&1 </dev/null &
        wait_started etcd $! 30 "$RUN_DIR/etcd.log" etcd_ok
    else
        die "etcd at $ETCD_URL is not reachable, and it is not a loopback http:// URL this script may start"
    fi
fi

# --- virtualenv --------------------------------------------------------------------------
if [[ ! -x $VENV/bin/python ]]; then
    log "creating .venv"
    python3 -m venv "$VENV"
    rm -f "$VENV/.installed"
fi
if [[ ! $VENV/.installed -nt $ROOT/pyproject.toml ]]; then
    log "installing the project into .venv (pip install -e '.[dev]')"
    # pip warns once per package about this machine's missing file:// index folders: drop those.
    # editable_mode=compat: a plain path in a .pth file, not setuptools' import finder, which
    # costs every start of a registrar process ~10 ms (the installed package has neither).
    "$VENV/bin/pip" install -q -e "$ROOT[dev]" --config-settings editable_mode=compat 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    touch "$VENV/.installed"
fi
