#!/usr/bin/env bash
# l7-ab.sh compares Portico's L7 proxy at git revision REV with the working tree, in one run:
# BenchmarkL7's roles (this package's test binary) for three greeters and the client, both
# proxies and the TCP relay, rows interleaved (direct, REV, working tree, relay) so that the
# host's drift hits all alike; it prints each path's median p50 and proxy CPU per request.
# Everything listens and connects on loopback only.
#
#   test/bench/l7-ab.sh REV [CPU] [SECONDS] [ROUNDS] [STREAMS]
#
# CPU is where the proxies and the relay run (client and greeters: CPU 0); defaults 0 2 6 1.
set -euo pipefail
rev=${1:?usage: l7-ab.sh REV [CPU] [SECONDS] [ROUNDS] [STREAMS]}
cpu=${2:-0} seconds=${3:-2} rounds=${4:-6} streams=${5:-1}
root=$(git rev-parse --show-toplevel)
tmp=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	git -C "$root" worktree remove --force "$tmp/src" 2>/dev/null || true
	rm -rf "$tmp"
}
trap cleanup EXIT

git -C "$root" worktree add --detach -q "$tmp/src" "$rev"
(cd "$tmp/src" && go test -c -o "$tmp/old.test" ./test/bench)
(cd "$root" && go test -c -o "$tmp/new.test" ./test/bench)
mkfifo "$tmp/stdin"
sleep infinity >"$tmp/stdin" & # the roles serve until their stdin closes
pids+=($!)

# start NAME BINARY CPU ROLE ARG: runs a role; its first line (its address) lands in $tmp/NAME.
start() {
	taskset -c "$3" env GOMAXPROCS=1 PORTICO_BENCH_ROLE="$4" PORTICO_BENCH_ARG="$5" "$2" <"$tmp/stdin" >"$tmp/$1" &
	pids+=($!)
	eval "pid_$1=$!"
	for _ in $(seq 200); do [ -s "$tmp/$1" ] && return; sleep 0.05; done
	echo "$1 did not start" >&2
	exit 1
}
start greeters "$tmp/new.test" 0 greeters ""
backends=$(head -1 "$tmp/greeters")
start old "$tmp/old.test" "$cpu" proxy "$backends"
start new "$tmp/new.test" "$cpu" proxy "$backends"
start relay "$tmp/new.test" "$cpu" relay "$backends"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

for _ in $(seq "$rounds"); do
	for path in direct old new relay; do
		if [ "$path" = direct ]; then addr=${backends%%,*} pid=""; else addr=$(head -1 "$tmp/$path"); eval "pid=\$pid_$path"; pid=$(pgrep -P "$pid" || echo "$pid"); fi
		before=0; [ -n "$pid" ] && before=$(ticks "$pid")
		out=$(taskset -c 0 env PORTICO_BENCH_ROLE=client PORTICO_BENCH_ARG="{\"Target\":\"$addr\",\"Streams\":$streams,\"Seconds\":$seconds}" "$tmp/new.test")
		after=$before; [ -n "$pid" ] && after=$(ticks "$pid")
		echo "$path $((after - before)) $out"
	done
done | python3 -c '
import json, statistics, sys
rows = {}
for line in sys.stdin:
    path, ticks, out = line.split(" ", 2)
    r = json.loads(out)
    rows.setdefault(path, []).append((r["P50"] / 1000, int(ticks) * 10000 / (r["Calls"] + 200), r["Calls"], r["Errors"]))
print("%-7s %10s %18s %10s %7s" % ("path", "median p50", "CPU per request", "calls", "errors"))
for path, v in rows.items():
    cpu = "-" if path == "direct" else "%.0f µs" % statistics.median(x[1] for x in v)
    print("%-7s %7.0f µs %18s %10d %7d" % (path, statistics.median(x[0] for x in v), cpu, sum(x[2] for x in v), sum(x[3] for x in v)))
'
