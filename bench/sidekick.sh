#!/usr/bin/env bash
# The classic CoreOS "discovery sidekick", in shell: the baseline `make bench` compares
# `registrar` with.
#
#   sidekick.sh CONTAINER SERVICE [PRIVATE_PORT]
#
# What the fleet documentation's sidekick unit did (`etcdctl set --ttl` in a loop, `BindsTo=` the
# app unit, `ExecStop=etcdctl rm`), with etcd v3's etcdctl: wait until `docker port` answers, then
# every TTL/3 put the key again on a fresh lease of TTL seconds (the previous lease just expires);
# once the container has exited, delete the key, as `BindsTo=` + `ExecStop=` did. The key layout is
# registrar's:  {prefix}/{service}/{node}:{container}:{private_port}
#
# Environment: ETCDCTL_ENDPOINTS (etcdctl's own), SIDEKICK_PREFIX (/services), SIDEKICK_TTL (15),
# SIDEKICK_NODE (the host name), COREOS_PRIVATE_IPV4 (else the address `docker port` reports),
# SIDEKICK_POLL (0.2: seconds between `docker port` attempts), SIDEKICK_WAIT (60: give up after).
set -uo pipefail

usage="usage: sidekick.sh CONTAINER SERVICE [PRIVATE_PORT]"
container=${1:?$usage}
service=${2:?$usage}
private_port=${3:-8080}
prefix=${SIDEKICK_PREFIX:-/services}
ttl=${SIDEKICK_TTL:-15}
node=${SIDEKICK_NODE:-$(hostname)}
poll=${SIDEKICK_POLL:-0.2}
give_up=$((SECONDS + ${SIDEKICK_WAIT:-60}))
export ETCDCTL_API=3

key="$prefix/$service/$node:$container:$private_port"
interval=$(awk -v ttl="$ttl" 'BEGIN { print ttl / 3 }')
waiter=

deregister() {
    etcdctl del "$key" >/dev/null
}

# ExecStop=: on SIGTERM delete the key and go.
on_term() {
    [[ -n $waiter ]] && kill "$waiter" 2>/dev/null
    deregister
    exit 0
}
trap on_term TERM INT

# Wait until Docker has published the port ("127.0.0.1:32768"; one line per address family).
until mapping=$(docker port "$container" "$private_port/tcp" 2>/dev/null) && [[ -n $mapping ]]; do
    if ((SECONDS >= give_up)); then
        echo "sidekick: $container never published $private_port/tcp" >&2
        exit 1
    fi
    sleep "$poll"
done
mapping=${mapping%%$'\n'*}
host_port=${mapping##*:}
host=${COREOS_PRIVATE_IPV4:-${mapping%:*}}
value=$(printf '{"service":"%s","host":"%s","port":%s,"node":"%s","container_name":"%s","private_port":%s,"protocol":"tcp"}' \
    "$service" "$host" "$host_port" "$node" "$container" "$private_port")

while :; do
    if lease=$(etcdctl lease grant "$ttl"); then  # "lease 694d7a1b2c3d4e5f granted with TTL(15s)"
        lease=${lease#lease }
        etcdctl put --lease="${lease%% *}" "$key" "$value" >/dev/null \
            || echo "sidekick: put $key failed" >&2
    else
        echo "sidekick: lease grant failed" >&2
    fi
    # Sleep TTL/3, but wake up as soon as the container exits (what BindsTo= does).
    timeout "$interval" docker wait "$container" >/dev/null 2>&1 &
    waiter=$!
    wait "$waiter"
    status=$?
    waiter=
    ((status == 124)) || break  # not the timeout: the container exited or is gone
done
deregister
