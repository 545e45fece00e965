#!/usr/bin/env bash
# The HTTP server on the GPU, load-tested: `leapfrog serve` on $GGUF (flags: $SERVE_ARGS) in
# the background, then `leapfrog bench serve` (streamed chat requests, the built-in prompt
# set) at each concurrency of $CONCURRENCIES, results as $OUT/serve_c<N>.json, the server's
# log as $OUT/server.log. Run by gpu_session.sh's `serve` step (which sources gpu_env.sh: the
# device image has no fastapi, uvicorn or pydantic, whose wheels travel in .whl/serve/).
# Usage (repo root, on the CUDA machine): OUT=dir GGUF=model.gguf [SERVE_ARGS=...]
#   [CONCURRENCIES="1 16 64"] [PROMPTS_PER_SLOT=4] [BENCH_ARGS=...] scripts/gpu_serve.sh
set -uo pipefail
: "${OUT:?}" "${GGUF:?}"
port=8013
base="http://127.0.0.1:$port"
get() {  # get PATH: the body of a GET, or a failure (no curl in every image)
  python3 -c "import sys, urllib.request as u; sys.stdout.write(u.urlopen(sys.argv[1], timeout=5).read().decode())" "$base$1" 2>/dev/null
}
python3 -m server.cli serve "$GGUF" --port "$port" ${SERVE_ARGS:-} >"$OUT/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 240); do
  get /ready >/dev/null && break
  kill -0 $server 2>/dev/null || { echo "server exited:"; tail -30 "$OUT/server.log"; exit 1; }
  sleep 1
done
get /ready >/dev/null || { echo "server not ready in 240 s"; tail -30 "$OUT/server.log"; exit 1; }
echo "server ready; $(grep -m1 -i 'kv cache' "$OUT/server.log" || true)"
rc=0
for c in ${CONCURRENCIES:-1 16 64}; do
  n=$(( c * ${PROMPTS_PER_SLOT:-4} ))
  [ "$n" -lt 16 ] && n=16
  echo "--- concurrency $c, $n requests"
  python3 -m bench.serve --base-url "$base" --num-prompts "$n" --max-concurrency "$c" \
    --no-progress --result-json "$OUT/serve_c$c.json" ${BENCH_ARGS:-} || rc=1
done
get /metrics | grep -E '^leapfrog:(num_preemptions|prompt_tokens|generation_tokens|spec_decode)' \
  | grep -v '_created' || true
exit $rc
