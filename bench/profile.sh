#!/usr/bin/env bash
# Where a portside echo server spends its CPU under the benchmark's load: perf samples of the
# server process (kernel and user space), by shared object and by symbol.
#
#   bench/profile.sh persistent|short [ENGINE] > bench/results/profile-ENGINE-MODE.txt
#
# Needs Linux perf (Debian's linux-perf) and the load generator python -m bench builds (run
# python -m bench --quick once first). The server runs on CPU 1, the load generator on CPU 0,
# as in the benchmark; 50 connections, 64-byte messages, 4 s sampled after 1 s of warm-up.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: bench/profile.sh persistent|short [ENGINE]}
engine=${2:-compiled}
loadgen=$(ls -t bench/build/loadgen-* | head -n 1)
work=$(mktemp -d)
taskset -c 1 python3 -m bench.servers.portside_echo --engine "$engine" --port 0 \
    --max-seconds 30 > "$work/announce" 2> "$work/server.log" &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do [ -s "$work/announce" ] && break; sleep 0.1; done
port=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['port'])" \
       "$work/announce")
sources=(--src-base 2 --src-count 200)
taskset -c 0 "$loadgen" "$mode" --port "$port" --conns 50 --size 64 --seconds 1 \
    "${sources[@]}" > /dev/null
perf record -q -F 2000 -g -p "$server" -o "$work/perf.data" -- sleep 4 2> /dev/null &
recorder=$!
echo "# bench/profile.sh $mode $engine (commit $(git rev-parse --short HEAD))"
echo "# load: $(taskset -c 0 "$loadgen" "$mode" --port "$port" --conns 50 --size 64 \
    --seconds 4 --server-pid "$server" "${sources[@]}")"
wait "$recorder"
echo "## by shared object"
perf report -i "$work/perf.data" --no-children --sort dso --stdio 2> /dev/null \
    | grep -E '^ +[0-9.]+%' | head -n 8
echo "## by symbol, user space"
perf report -i "$work/perf.data" --no-children --sort symbol --stdio 2> /dev/null \
    | grep -E '^ +[0-9.]+%.*\[\.\]' | head -n 30
echo "## by symbol, kernel"
perf report -i "$work/perf.data" --no-children --sort symbol --stdio 2> /dev/null \
    | grep -E '^ +[0-9.]+%.*\[k\]' | head -n 15
