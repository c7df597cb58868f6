#!/usr/bin/env bash
# Builds a local Debian base image with Python 3 for the project's Dockerfile, for machines
# that cannot reach an image registry (so `FROM python:3.12-slim` cannot be pulled):
#
#   scripts/build-base-image.sh [IMAGE]        # default IMAGE: registrar-base:bookworm
#   docker build --build-arg BASE_IMAGE=registrar-base:bookworm \
#                --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt -t registrar .
#
# debootstrap (--variant=minbase) of Debian bookworm with python3, python3-venv and
# ca-certificates, from the Debian mirror this machine's apt uses; this machine's CA bundle is
# copied in (pip inside the build container needs it to reach the package index here); docs,
# man pages, locales and apt lists are dropped; the tree is imported with `docker import`.
#
# Cached: does nothing when IMAGE exists with this recipe's revision label (REBUILD=1 forces a
# build). Needs root (debootstrap) and a running Docker engine; installs debootstrap with
# apt-get when it is missing. About a minute the first time. Environment:
#   DEBIAN_MIRROR  the mirror to use (default: the first Debian one in /etc/apt/sources.list{,.d})
#   SUITE          the Debian release (default: bookworm)
#   CA_BUNDLE      the CA bundle copied in (default: /etc/ssl/certs/ca-certificates.crt)
#   REBUILD=1      build even when the image exists
set -euo pipefail

IMAGE=${1:-registrar-base:bookworm}
SUITE=${SUITE:-bookworm}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PACKAGES=python3,python3-venv,ca-certificates
# Bump when the recipe changes: an existing image with another revision is rebuilt.
REVISION=1
LABEL=org.registrar.base-revision

log() { echo "build-base-image: $*" >&2; }
die() { echo "build-base-image: ERROR: $*" >&2; exit 1; }

command -v docker >/dev/null 2>&1 || die "docker CLI not found (run scripts/setup.sh first)"
timeout 20 docker info >/dev/null 2>&1 || die "the Docker engine does not answer 'docker info'"

current=$(docker image inspect --format "{{index .Config.Labels \"$LABEL\"}}" "$IMAGE" 2>/dev/null || true)
if [[ $current == "$REVISION" && ${REBUILD:-0} != 1 ]]; then
    log "$IMAGE exists (revision $REVISION): nothing to do"
    exit 0
fi

[[ $(id -u) == 0 ]] || die "debootstrap needs root"
[[ -r $CA_BUNDLE ]] || die "CA bundle $CA_BUNDLE not readable"

if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    # wait for another apt/dpkg run to finish rather than fail at once
    apt_opts=(-o DPkg::Lock::Timeout=300 -qq)
    apt-get "${apt_opts[@]}" update >/dev/null || die "apt-get update failed"
    apt-get "${apt_opts[@]}" install -y debootstrap >/dev/null \
        || die "apt-get install debootstrap failed"
fi

# The Debian mirror apt uses here: deb822 *.sources ("URIs:" with "Suites:" naming a release,
# not -security) or one-line "deb URI SUITE ..." entries. First match wins.
find_mirror() {
    local file uri line
    shopt -s nullglob
    for file in /etc/apt/sources.list.d/*.sources; do
        # paragraphs: print the URIs of those whose Suites contain a plain release name
        uri=$(awk -v suite="$SUITE" '
            BEGIN { RS = ""; FS = "\n" }
            /(^|\n)Types:[^\n]*deb([ \t\n]|$)/ {
                uris = ""; ok = 0
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris) }
                    if ($i ~ /^Suites:/ && (" " $i " ") ~ ("[ \t]" suite "[ \t]")) ok = 1
                }
                if (ok && uris != "") { split(uris, u, /[ \t]+/); print u[1]; exit }
            }' "$file")
        if [[ -n $uri ]]; then echo "$uri"; return; fi
    done
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $file ]] || continue
        while read -r line; do
            # deb [options] URI SUITE COMPONENTS...
            line=${line%%#*}
            line=$(sed -E 's/\[[^]]*\]//' <<<"$line")
            read -r -a words <<<"$line"
            if [[ ${words[0]:-} == deb && ${words[2]:-} == "$SUITE" ]]; then
                echo "${words[1]}"
                return
            fi
        done <"$file"
    done
}
MIRROR=${DEBIAN_MIRROR:-$(find_mirror)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

WORK=$(mktemp -d /var/tmp/registrar-base.XXXXXX)
cleanup() {
    # debootstrap may leave /proc or /sys of the chroot mounted when it fails half way
    local m
    for m in proc sys dev/pts dev; do
        mountpoint -q "$WORK/rootfs/$m" 2>/dev/null && umount -l "$WORK/rootfs/$m" || true
    done
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
ROOTFS=$WORK/rootfs

log "debootstrap $SUITE from $MIRROR into $ROOTFS (about a minute)"
started=$SECONDS
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1; then
    tail -n 30 "$WORK/debootstrap.log" >&2 || true
    tail -n 30 "$ROOTFS/debootstrap/debootstrap.log" >&2 2>/dev/null || true
    die "debootstrap failed"
fi

# this machine's CA bundle (the package index is reached through it here)
install -m 0644 "$CA_BUNDLE" "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
# smaller: no docs, man pages, locales, apt lists or caches
rm -rf "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
    "$ROOTFS"/usr/share/locale/* "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
    "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/log/*.log "$ROOTFS"/tmp/*
# the chroot's own apt sources point at the mirror used here
echo "deb $MIRROR $SUITE main" >"$ROOTFS/etc/apt/sources.list"
chroot "$ROOTFS" python3 -c 'import venv, ensurepip, ssl' \
    || die "python3 in the new root cannot import venv/ensurepip/ssl"

log "importing as $IMAGE"
tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change "LABEL $LABEL=$REVISION" \
    --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase with python3, python3-venv and ca-certificates\"" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$IMAGE" >/dev/null
log "built $IMAGE in $((SECONDS - started)) s ($(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}'))"
