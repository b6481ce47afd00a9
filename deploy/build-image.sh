#!/usr/bin/env bash
# Build the nla-serve image without a Docker daemon or a registry of base images, run it, and
# check /health and one explained chat completion. This is exactly how the image was built and run
# on the project's machines (Debian 12, root, no Docker Hub; Debian's and PyPI's package
# registries reachable); see docs/deploy.md for what it showed.
#
#   deploy/build-image.sh            # base (once) + build + run + check
#   STEP=run deploy/build-image.sh   # only run + check an image built before
#
# Why each odd flag is here (each one is the fix for an error this machine gave):
#   - the base is made from Debian packages (debootstrap from the machine's own Debian mirror,
#     read from its apt sources) and imported with `podman import`: python:3.11-slim cannot be pulled.
#   - --storage-driver vfs: no overlay mounts needed.
#   - --runtime runc: crun 1.8 (Debian 12's default) refuses this machine's cgroup layout
#     ("crun: cgroups in hybrid mode not supported, drop all controllers from cgroupv2").
#   - --ulimit nofile/nproc below the current limits: podman asks for higher ones by default and the
#     container runtime may not raise them here (CAP_SYS_RESOURCE is not in the bounding set):
#     "crun: setrlimit `RLIMIT_NOFILE`: Operation not permitted".
#   - --shm-size 2g at run time: vLLM's engine needs more than the 64 MiB default /dev/shm
#     ("Insufficient space in /dev/shm for shared-memory allocation: 160 MiB required, 62 MiB
#     free"); in Kubernetes the pod mounts a memory emptyDir there (deploy/k8s/base/server.yaml).
#   - --network host: no CNI bridge needed; the build reaches PyPI and Debian directly.
#   - --format docker: OCI images drop HEALTHCHECK. (podman logs "unable to get systemd connection
#     to add healthchecks" here: no systemd, so the check is kept in the image but not run.)
#   - the base carries this machine's CA bundle (see make_base).
#   - WHEELS / EXTRA_INDEX: where this machine keeps the CPU build of torch==2.13.0 (PyPI's
#     torch 2.13.0 for Linux is the CUDA one); mounted into the build with -v, read-only.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMAGE:-localhost/nla-serve:cpu}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-base:bookworm}
WORK=${WORK:-/tmp/nla-serve-image}
PORT=${PORT:-18000}
STEP=${STEP:-all}
PODMAN=(podman --storage-driver vfs --cgroup-manager cgroupfs --runtime runc)
LIMITS=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)

mkdir -p "$WORK"

need() { command -v "$1" >/dev/null || { echo "needs $1 (apt-get install $2)"; exit 1; }; }
need podman podman; need runc runc; need debootstrap debootstrap

make_base() {
    if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then return; fi
    # the machine's own Debian mirror, as apt knows it
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
             || awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror"
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    # This machine's CAs: its TLS to the registries presents a chain only its own bundle trusts
    # (without them pip fails: "SSLCertVerificationError ... self-signed certificate in certificate chain").
    # The Dockerfile's ca-certificates adds them to the image's bundle, so an image built by this
    # script trusts what this machine trusts: a local test image, not one to publish. (Mounting the
    # bundle over the image's own during the build breaks ca-certificates' install: "mv: cannot move
    # ... ca-certificates.crt: Device or resource busy".)
    install -D -m 644 /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/usr/local/share/ca-certificates/build-host.crt"
    tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE"
}

build() {
    # the committed tree, not the working one (others may be mid-edit)
    rm -rf "$WORK/context" && mkdir -p "$WORK/context"
    git -C "$ROOT" archive HEAD | tar -x -C "$WORK/context"
    args=(--build-arg "BASE=$BASE_IMAGE")
    if [ -d /opt/wheels ]; then args+=(-v /opt/wheels:/opt/wheels:ro --build-arg WHEELS=/opt/wheels); fi
    if [ -d /opt/pypi/simple ]; then
        args+=(-v /opt/pypi:/opt/pypi:ro --build-arg EXTRA_INDEX=file:///opt/pypi/simple)
    fi
    # docker format: OCI images drop HEALTHCHECK ("HEALTHCHECK is not supported for OCI image format")
    "${PODMAN[@]}" build --format docker --network host "${LIMITS[@]}" "${args[@]}" -t "$IMAGE" "$WORK/context"
    "${PODMAN[@]}" images "$IMAGE"
}

run_and_check() {
    "${PODMAN[@]}" rm -f nla-serve-check >/dev/null 2>&1 || true
    mkdir -p "$WORK/cache"
    "${PODMAN[@]}" run -d --name nla-serve-check --network host --shm-size 2g "${LIMITS[@]}" \
        -e NLA_SERVE_PORT="$PORT" -v "$WORK/cache:/root/.cache/nla-serve" "$IMAGE"
    trap '"${PODMAN[@]}" logs nla-serve-check > "$WORK/container.log" 2>&1; "${PODMAN[@]}" rm -f nla-serve-check >/dev/null' EXIT
    for _ in $(seq 1 120); do   # the first start converts the default model: a few minutes on 2 CPUs
        if curl -fs "http://127.0.0.1:$PORT/health" > "$WORK/health.json"; then break; fi
        sleep 5
    done
    cat "$WORK/health.json"; echo
    curl -fs "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' -d '{
      "model": "SmolLM2-135M-Instruct",
      "messages": [{"role": "user", "content": "What is the capital of France?"}],
      "max_tokens": 12, "temperature": 0, "explain": {"positions": "last", "max_explanations": 1}}' \
      | tee "$WORK/completion.json"
    echo
    python3 - "$WORK/completion.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
e = r["explanations"][0]
print("answer:", r["choices"][0]["message"]["content"])
print("explanation:", e["status"], "fve", e.get("fve"), (e.get("text") or "")[:120])
assert e["status"] == "ok", e
EOF
}

case "$STEP" in
    all) make_base; build; run_and_check ;;
    base) make_base ;;
    build) build ;;
    run) run_and_check ;;
    *) echo "STEP is all | base | build | run"; exit 2 ;;
esac
