#!/usr/bin/env bash
# Instructions per request of a server process, counted by callgrind: repeatable where CPU
# time on a shared box is not (bench/README.md, "counted in instructions").
#
#   bench/instructions.sh [proxy|passthrough] [REQUESTS] [IN_FLIGHT]    (default: proxy 1500 32)
#
# Starts bench/fake_openai.py and the server under `valgrind --tool=callgrind
# --instr-atstart=no`, sends 300 warm-up requests, switches instrumentation on, sends exactly
# REQUESTS non-stream chat requests (IN_FLIGHT at once, an aiohttp client), switches it off
# and prints user-space instructions per request, and the cyclic collector's share apart.
# The proxy's config is the benchmark's (bench/run.py): with an `auth.admin_key`, so the
# dashboard and the admin API are set up as there.
# The proxy's log writer is a child process callgrind does not follow: not counted.
# Needs valgrind; takes about a minute (the server runs ~50x slower under callgrind).
set -euo pipefail
TARGET=${1:-proxy}; N=${2:-1500}; C=${3:-32}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
port() { "$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
ready() { for _ in $(seq 1 600); do curl -s -o /dev/null "$1" && return 0; sleep 0.2; done; echo "not ready: $1" >&2; exit 1; }

FAKE_PORT=$(port)
"$PY" "$REPO/bench/fake_openai.py" --port "$FAKE_PORT" 2>/dev/null &
PIDS+=($!)
ready "http://127.0.0.1:$FAKE_PORT/v1/models"
PORT=$(port)
if [ "$TARGET" = passthrough ]; then
  ARGV=("$PY" "$REPO/bench/passthrough.py" --port "$PORT" --upstream "http://127.0.0.1:$FAKE_PORT")
else
  cat > "$TMP/config.yaml" <<EOF
server: {host: 127.0.0.1, port: $PORT}
database: {path: "$TMP/bench.db"}
auth: {admin_key: bench-admin-key}
providers:
  - {name: fake, type: openai, base_url: "http://127.0.0.1:$FAKE_PORT/v1", api_key: "bench-key"}
models:
  - {name: "*", provider: fake}
EOF
  ARGV=("$PY" -m provider_router serve --config "$TMP/config.yaml")
fi
(cd "$REPO" && exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$TMP/cg.out" "${ARGV[@]}" > "$TMP/server.log" 2>&1) &
VPID=$!
PIDS+=($VPID)
ready "http://127.0.0.1:$PORT/v1/models"

send() {
  "$PY" - "http://127.0.0.1:$PORT/v1/chat/completions" "$1" "$C" <<'EOF'
import asyncio, sys, aiohttp
url, n, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
body = b'{"model": "bench-model", "messages": [{"role": "user", "content": "Say hello in five words."}], "stream": false}'
headers = {"Content-Type": "application/json", "Authorization": "Bearer bench-key"}
async def main() -> None:
    left = [n]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=c)) as s:
        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                async with s.post(url, data=body, headers=headers) as r:
                    await r.read()
                    assert r.status == 200, r.status
        await asyncio.gather(*(worker() for _ in range(c)))
asyncio.run(main())
EOF
}
send 300
callgrind_control -i on "$VPID" > /dev/null 2>&1
send "$N"
callgrind_control -i off "$VPID" > /dev/null 2>&1
callgrind_control -d "$VPID" > /dev/null 2>&1
kill "$VPID"; wait "$VPID" 2>/dev/null || true
total=0; gc=0
for f in "$TMP"/cg.out*; do
  t=$(callgrind_annotate "$f" 2>/dev/null | awk '!n && /PROGRAM TOTALS/ {gsub(",", "", $1); print $1; n=1}')
  g=$(callgrind_annotate --inclusive=yes "$f" 2>/dev/null | awk '!n && /gc_collect_main/ {gsub(",", "", $1); print $1; n=1}')
  [[ "$t" =~ ^[0-9]+$ ]] || t=0  # a part with nothing recorded shows "."
  [[ "$g" =~ ^[0-9]+$ ]] || g=0
  total=$((total + t)); gc=$((gc + g))
done
echo "$TARGET, $N requests, $C in flight: $((total / N)) instructions per request ($(((total - gc) / N)) without the cyclic collector's $((gc / N)))"
