#!/usr/bin/env bash
# compare.sh — Sluice side by side with nginx and HAProxy, on loopback (issue 9).
#
# For each scenario and worker count, starts every target with an equivalent config, runs the
# load against each in interleaved rounds (each round visits every target once, the start
# rotated per round: the machine is noisy), stops them, and prints one markdown table per
# scenario, worker count and load level. Everything listens on 127.0.0.1 only. Every server is
# started by this script, in its own session, from configs written into a fresh temp dir; only
# those process groups are ever stopped. System nginx/HAProxy services are never touched.
#
# Backends: two nginx, 1 worker each, 127.0.0.1:9101 and :9102, `return 200 "ok\n"`
#           (/whoami -> b1|b2 for the round-robin check, /status = stub_status), for the whole run.
# Targets, all round-robin over both backends with upstream keep-alive, N workers/threads each:
#   nginx-kaK    nginx, `keepalive K` in the upstream, for each K in NGINX_KEEPALIVES (32: the
#                setting peers.sh started from; 256: nginx at its best here)     :9201, :9202 ...
#   haproxy      HAProxy, nbthread N, http-reuse always                          :9301
#   (with FORWARD_HEADERS=1, the default, nginx and HAProxy add the request headers Sluice adds
#   to every forwarded request, so that all do the same work; the plain scenario then adds
#   ref-nginx-bare: nginx-ka256 without them, a reference left out of the × columns  :9290)
#   sluice-*     target/release/sluice run -c bench/compare-sluice-*.toml --workers N
# Scenarios (SCENARIOS):
#   plain  the proxies above; Sluice twice: sluice-rr (builtin Wasm round-robin balancer,
#          compare-sluice-rr.toml :9501) and sluice-native (core balancer, compare-sluice-native.toml :9502)
#   limit  rate limiting that never refuses: nginx limit_req (rate=1000000r/s burst=1000 nodelay,
#          key $server_name), HAProxy stick-table http_req_rate(1s) + deny over 1,000,000 (constant
#          key), Sluice builtin:rate-limit 1000000r/s keyed by route (compare-sluice-limit.toml :9503)
#   chain  Sluice's full edge chain: rate-limit + circuit-breaker + geo + Wasm round-robin
#          (compare-sluice-chain.toml :9504) against the peers running plain; every client sends
#          X-Forwarded-For: 193.99.144.80 (geo trusts loopback, looks it up: DE); sluice-floor
#          (compare-sluice-floor.toml :9505) makes the same five plugin calls with no policy work
#   hooks  four request hooks per request in each proxy's own scripting, each touching one header
#          the request lacks: nginx-njs (njs js_set, four variables sent as headers), haproxy-lua
#          (lua-load-per-thread, four http-request Lua actions deleting the header), sluice-hooks
#          (four builtin:headers policies removing it, compare-sluice-hooks.toml :9506;
#          sluice-hooks-one: one policy removing all four, compare-sluice-hooks-one.toml :9507); ref-* rows
#          are the same proxies plain (nginx-ka256, haproxy, sluice-native), so each row's cost
#          of programmability shows. Needs the njs module (apt-get install -y libnginx-mod-http-js)
#   tls    TLS 1.3 termination with an ECDSA P-256 certificate made by openssl at start
#          (nginx ssl_protocols TLSv1.3, HAProxy ssl-min-ver TLSv1.3; Sluice compare-sluice-tls.toml :9543)
#   c10k   C10K_CONNS (10,000) concurrent keep-alive connections, wrk -t$C10K_THREADS; nginx
#          worker_connections, HAProxy maxconn and Sluice max_connections set high enough, ulimit -n
#          raised as far as allowed (the report notes a limit below 2 × C10K_CONNS + 1000); the
#          table adds the proxy's open fds and established client connections sampled mid-run
#   h2     h2load -c$H2_CLIENTS -m$H2_STREAMS (if h2load is installed): h2c by prior knowledge
#          (nginx `listen ... http2`, HAProxy's plain bind, Sluice :9502) and TLS with ALPN h2
#          (nginx `ssl http2`, HAProxy `alpn h2,http/1.1`, Sluice :9543)
#
# Columns: req/s = median over clean runs; p50/p99 = medians of each run's wrk --latency
# percentiles (h2load: from its per-request log); CPU s/100k req = CPU time of the proxy's
# process group during the run (utime+stime, /proc/<pid>/stat) ÷ requests × 100,000;
# peak RSS = VmHWM summed over the proxy's process group (/proc/<pid>/status) after each run,
# the largest; errors = socket errors + non-2xx answers over all runs (h2load: its "failed",
# requests done without a 2xx, which includes stream errors); × best peer / × best nginx =
# req/s ÷ the best nginx-or-HAProxy (nginx) row's req/s in the same table. A run is "clean" when unrelated processes used < OTHER_MAX % of a
# core during it (machine busy − wrk − proxy − backends, from /proc/stat); medians use only
# clean runs, unless there are none (then all runs, marked).
#
# Knobs (env):
#   SCENARIOS="plain limit chain hooks tls c10k h2"  WORKERS="1 2"  ROUNDS=3
#   CONNS="64 256" (wrk -c levels for plain/limit/chain/hooks/tls)  DUR=6 (s per wrk run)  WRK_THREADS=1
#   C10K_CONNS=10000 C10K_THREADS=2 C10K_DUR=10   H2_CLIENTS=64 H2_STREAMS=10 H2_DUR=$DUR
#   NJS_MODULE=/usr/lib/nginx/modules/ngx_http_js_module.so (hooks: nginx's njs module)
#   ONLY="nginx-ka256 sluice-native ..." (only these targets, by the names in the tables)
#   FORWARD_HEADERS=1 (the peers add the request headers Sluice's core adds: the client's Host,
#   X-Forwarded-For/-Proto/-Host, Via, x-request-id when absent, a W3C traceparent joined or
#   started (from 2026-12-04's eighth session); 0: they add none, as before
#   2026-12-03's fifth session)  NGINX_KEEPALIVES="32 256"  WARMUP=1 (s per target before the rounds)  OTHER_MAX=15
#   MAX_TOTAL=3900 (hard wall-clock cap in s: the whole script runs under timeout(1); runs that
#   would pass it are skipped and counted)  SLUICE=target/release/sluice  SLUICE_LOG=warn (RUST_LOG)
#   RESULTS_MD=path (also write the report there)  KEEP=1 (keep the work dir: configs, logs,
#   raw outputs, runs.tsv)  NICE= (e.g. -5: servers and load generators at higher priority)
#   REPORT_ONLY="dir/runs.tsv [...]": re-print the tables from saved runs, start nothing.
#
# Example (from the repository root, after `cargo build --release -p sluice`):
#   SCENARIOS=plain WORKERS=1 ROUNDS=3 bench/compare.sh
set -uo pipefail
set +m   # no job control: background children stay non-leaders, so `setsid cmd &` does not fork

MAX_TOTAL=${MAX_TOTAL:-3900}
# Hard cap on the whole run. timeout TERMs us (trap -> cleanup) and our process group (the load
# generators); the servers live in their own sessions and are stopped by cleanup.
if [[ -z "${COMPARE_INNER:-}" && -z "${REPORT_ONLY:-}" ]]; then
  export COMPARE_INNER=1
  exec timeout -k 10 "$MAX_TOTAL" bash "$(readlink -f "$0")" "$@"
fi

ROOT=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
SCENARIOS=${SCENARIOS:-"plain limit chain hooks tls c10k h2"}
WORKERS=${WORKERS:-"1 2"}
ROUNDS=${ROUNDS:-3}
DUR=${DUR:-6}
CONNS=${CONNS:-"64 256"}
WRK_THREADS=${WRK_THREADS:-1}
C10K_CONNS=${C10K_CONNS:-10000}
C10K_THREADS=${C10K_THREADS:-2}
C10K_DUR=${C10K_DUR:-10}
H2_CLIENTS=${H2_CLIENTS:-64}
H2_STREAMS=${H2_STREAMS:-10}
H2_DUR=${H2_DUR:-$DUR}
NGINX_KEEPALIVES=${NGINX_KEEPALIVES:-"32 256"}
FORWARD_HEADERS=${FORWARD_HEADERS:-1}
WARMUP=${WARMUP:-1}
OTHER_MAX=${OTHER_MAX:-15}
SLUICE=${SLUICE:-$ROOT/target/release/sluice}
SLUICE_LOG=${SLUICE_LOG:-warn}
RESULTS_MD=${RESULTS_MD:-}
KEEP=${KEEP:-1}
NICE=${NICE:-}
ONLY=${ONLY:-}
WRK_TIMEOUT=5s
HZ=$(getconf CLK_TCK)
NCPU=$(nproc)

log() { printf '[%4ds] %s\n' "$SECONDS" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

TSV_HEADER='scenario	workers	load	loaddesc	target	kind	round	rps	p50ms	p99ms	requests	errors	proxy_cpu_s	elapsed	proxy_pct	wrk_pct	backend_pct	sys_pct	other_pct	hwm_kib	fds	estab	b1_req	b2_req	proxy_sys_s'

# ---------------------------------------------------------------- report (from runs.tsv files)
tables() { # runs.tsv... -> markdown tables, one per (scenario, workers, load)
  awk -F'\t' -v omax="$OTHER_MAX" '
    function sortn(a, n,   i, j, x) { for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x } }
    function med(list,   a, n) { n = split(list, a, " "); if (n == 0) return "nan"; sortn(a, n); return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
    function add(t, k, v) { if (v != "nan" && v != "") L[t, k] = L[t, k] " " v }
    function keep(t, s) {
      add(t, s "rps", $H["rps"]); add(t, s "p50", $H["p50ms"]); add(t, s "p99", $H["p99ms"]); add(t, s "pct", $H["proxy_pct"])
      if ($H["requests"] + 0 > 0) add(t, s "cpu", 100000 * $H["proxy_cpu_s"] / $H["requests"])
      # runs.tsv files from before 2026-12-05 have no proxy_sys_s
      if (("proxy_sys_s" in H) && $H["proxy_cpu_s"] + 0 > 0) add(t, s "ker", 100 * $H["proxy_sys_s"] / $H["proxy_cpu_s"])
    }
    function num(v, f) { return (v == "nan" || v == "") ? "–" : sprintf(f, v) }
    FNR == 1 { delete H; for (i = 1; i <= NF; i++) H[$i] = i; next }
    {
      key = $H["scenario"] SUBSEP $H["workers"] SUBSEP $H["load"]
      if (!(key in nt)) { keys[++nk] = key; nt[key] = 0; desc[key] = $H["loaddesc"] }
      t = key SUBSEP $H["target"]
      if (!(t in kind)) { kind[t] = $H["kind"]; name[key, ++nt[key]] = $H["target"] }
      all[t]++
      errs[t] += $H["errors"]
      if ($H["hwm_kib"] + 0 > hwm[t]) hwm[t] = $H["hwm_kib"] + 0
      if ($H["fds"] + 0 > fds[t]) fds[t] = $H["fds"] + 0
      if ($H["estab"] + 0 > estab[t]) estab[t] = $H["estab"] + 0
      b1[t] += $H["b1_req"]; b2[t] += $H["b2_req"]
      keep(t, "a")                                   # every run
      if ($H["other_pct"] + 0 < omax) { clean[t]++; keep(t, "c") }   # clean runs
    }
    END {
      for (k = 1; k <= nk; k++) {
        key = keys[k]; split(key, KP, SUBSEP)
        isc10k = 0; best = 0; bestn = 0
        for (i = 1; i <= nt[key]; i++) {
          t = key SUBSEP name[key, i]
          s = (clean[t] > 0) ? "c" : "a"; sel[t] = s
          r[t] = med(L[t, s "rps"])
          if (kind[t] == "peer" && r[t] != "nan" && r[t] + 0 > best) best = r[t] + 0
          if (name[key, i] ~ /^nginx/ && r[t] != "nan" && r[t] + 0 > bestn) bestn = r[t] + 0
          if (estab[t] > 0 || fds[t] > 0) isc10k = 1
        }
        printf "\n### %s — %s worker%s — %s\n\n", KP[1], KP[2], (KP[2] == 1 ? "" : "s"), desc[key]
        printf "| target | clean/all runs | req/s | p50 ms | p99 ms | CPU s /100k req | kernel %% of CPU | proxy CPU %% | peak RSS MiB | errors | × best peer | × best nginx | b1:b2 |%s\n", isc10k ? " open fds (mid-run) | client conns (mid-run) |" : ""
        printf "|---|---|---|---|---|---|---|---|---|---|---|---|---|%s\n", isc10k ? "---|---|" : ""
        for (i = 1; i <= nt[key]; i++) {
          t = key SUBSEP name[key, i]; s = sel[t]
          split1 = (b1[t] + b2[t] > 0) ? sprintf("%.0f:%.0f", 100 * b1[t] / (b1[t] + b2[t]), 100 * b2[t] / (b1[t] + b2[t])) : "–"
          rb = (best > 0 && r[t] != "nan") ? sprintf("%.2f", r[t] / best) : "–"
          rn = (bestn > 0 && r[t] != "nan") ? sprintf("%.2f", r[t] / bestn) : "–"
          printf "| %s | %d/%d%s | %s | %s | %s | %s | %s | %s | %s | %d | %s | %s | %s |", name[key, i], clean[t], all[t], (s == "a" ? " (all noisy)" : ""), \
            num(r[t], "%.0f"), num(med(L[t, s "p50"]), "%.2f"), num(med(L[t, s "p99"]), "%.2f"), \
            num(med(L[t, s "cpu"]), "%.2f"), num(med(L[t, s "ker"]), "%.0f"), num(med(L[t, s "pct"]), "%.0f"), \
            (hwm[t] > 0 ? sprintf("%.1f", hwm[t] / 1024) : "–"), errs[t], rb, rn, split1
          if (isc10k) printf " %s | %s |", (fds[t] > 0 ? fds[t] : "–"), (estab[t] > 0 ? estab[t] : "–")
          printf "\n"
        }
      }
    }' "$@"
  echo
  echo "Columns: req/s, p50, p99, CPU and proxy CPU % are medians over clean runs (unrelated CPU < ${OTHER_MAX}% of a core; \"(all noisy)\": no clean run, all runs used)."
  echo "CPU s /100k req = the proxy's process-group CPU time (/proc/<pid>/stat) during the run ÷ requests × 100,000; kernel % of CPU = its system time ÷ that CPU time; proxy CPU % is of one core."
  echo "peak RSS = largest VmHWM summed over the proxy's processes (nginx: master + workers, so shared pages count more than once). errors = socket errors + non-2xx, summed over all runs."
  echo "× best peer / × best nginx: req/s ÷ the best nginx-or-HAProxy / best nginx row of the same table. b1:b2 = share of requests each backend served (stub_status)."
}

if [[ -n "${REPORT_ONLY:-}" ]]; then
  read -r -a files <<<"$REPORT_ONLY"
  echo "## compare.sh tables from: $REPORT_ONLY"
  tables "${files[@]}"
  exit 0
fi

# ---------------------------------------------------------------- checks
for c in nginx haproxy wrk openssl curl ss pgrep setsid timeout awk sort /usr/bin/time; do
  command -v "$c" >/dev/null 2>&1 || die "missing $c (apt-get install -y nginx haproxy wrk curl iproute2 procps time)"
done
HAVE_H2LOAD=0; command -v h2load >/dev/null 2>&1 && HAVE_H2LOAD=1
NJS_MODULE=${NJS_MODULE:-/usr/lib/nginx/modules/ngx_http_js_module.so}
[[ -x "$SLUICE" ]] || die "no Sluice binary at $SLUICE (cargo build --release -p sluice, or set SLUICE=)"
SC=()
NOTES=()
for s in $SCENARIOS; do
  case $s in
    plain|limit|chain|tls|c10k) SC+=("$s") ;;
    h2) if (( HAVE_H2LOAD )); then SC+=(h2); else NOTES+=("h2 skipped: h2load not installed (apt-get install -y nghttp2-client)"); log "h2 skipped: no h2load"; fi ;;
    hooks) if [[ -f $NJS_MODULE ]]; then SC+=(hooks); else NOTES+=("hooks skipped: no njs module at $NJS_MODULE (apt-get install -y libnginx-mod-http-js, or set NJS_MODULE)"); log "hooks skipped: no njs module"; fi ;;
    *) die "unknown scenario '$s' (plain limit chain hooks tls c10k h2)" ;;
  esac
done
(( ${#SC[@]} )) || die "no scenario to run"

# c10k: a proxy holds C10K_CONNS client connections plus up to as many upstream ones. Raise the
# open-file limit (past the hard limit only where that is allowed: root with CAP_SYS_RESOURCE).
WANT_NOFILE=$(( 2 * C10K_CONNS + 1000 ))
if [[ "$(ulimit -Hn)" != unlimited ]] && (( $(ulimit -Hn) < WANT_NOFILE )); then ulimit -n "$WANT_NOFILE" 2>/dev/null; fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null
NOFILE=$(ulimit -n)
[[ $NOFILE == unlimited ]] && NOFILE=1048576
if [[ " ${SC[*]} " == *" c10k "* ]] && (( NOFILE < WANT_NOFILE )); then
  NOTES+=("open-file limit is $NOFILE (the hard limit, which this shell may not raise): at c10k a proxy holding ${C10K_CONNS} client connections has $((NOFILE - C10K_CONNS)) fds left for upstream connections, listeners and files")
  log "WARNING: ulimit -n is $NOFILE, below $WANT_NOFILE (2 x C10K_CONNS + 1000)"
fi
if [[ -n "$NICE" ]]; then renice -n "$NICE" -p $$ >/dev/null || die "renice $NICE failed"; fi

W=$(mktemp -d -t compare.XXXXXX)
chmod 755 "$W"               # nginx workers run as nobody
mkdir -p "$W/raw" "$W/tls"
declare -A LIVE              # pgid -> name: process groups we started and have not stopped
declare -A PG                # name -> pgid
LOAD_PID=

stop_pgs() { # pgid...: TERM, wait up to 5 s, KILL; forget them
  local pg i alive
  (( $# )) || return 0
  for pg in "$@"; do kill -TERM -- "-$pg" 2>/dev/null; done
  for i in $(seq 50); do
    alive=0
    for pg in "$@"; do kill -0 -- "-$pg" 2>/dev/null && alive=1; done
    (( alive )) || break
    sleep 0.1
  done
  for pg in "$@"; do kill -KILL -- "-$pg" 2>/dev/null; unset "LIVE[$pg]"; done
  return 0
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [[ -n "$LOAD_PID" ]] && kill "$LOAD_PID" 2>/dev/null
  stop_pgs "${!LIVE[@]}"
  if [[ "$KEEP" == 1 ]]; then log "work dir kept: $W"; else rm -rf "$W"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_bg() { # name logfile cmd... ; runs cmd in a new session, records its pgid
  local name=$1 logf=$2 pid pg; shift 2
  setsid "$@" >"$logf" 2>&1 </dev/null &
  pid=$!
  LIVE[$pid]=$name; PG[$name]=$pid
  sleep 0.05
  pg=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')
  [[ -z "$pg" || "$pg" == "$pid" ]] || die "$name: unexpected pgid $pg for pid $pid"
}

port_free() { [[ -z "$(ss -Hltn "( sport = :$1 )")" ]]; }

wait_ok() { # name url timeout_s [curl options...]
  local name=$1 url=$2 end=$((SECONDS + $3)); shift 3
  while (( SECONDS < end )); do
    [[ "$(curl -sk --max-time 1 "$@" "$url" 2>/dev/null)" == ok ]] && return 0
    kill -0 -- "-${PG[$name]}" 2>/dev/null || die "$name exited during startup: $(tail -n 5 "$W/$name.log" 2>/dev/null)"
    sleep 0.1
  done
  die "$name not answering 'ok' on $url after $3 s (see $W/$name.log)"
}

# ---------------------------------------------------------------- TLS material (ECDSA P-256)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -keyout "$W/tls/key.pem" -out "$W/tls/cert.pem" -subj "/CN=localhost" \
  -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" >/dev/null 2>&1 || die "openssl req failed"
cat "$W/tls/cert.pem" "$W/tls/key.pem" >"$W/tls/combined.pem"
chmod 644 "$W/tls/cert.pem" "$W/tls/key.pem"   # nginx reads them as root (master); fine on loopback
cp "$ROOT/bench/compare-sluice-tls.toml" "$W/compare-sluice-tls.toml"   # its cert paths are relative

# ---------------------------------------------------------------- configs
# nginx worker_connections counts client + upstream connections and is allocated up front (so
# it shows in RSS): 8192 as in peers.sh, c10k (and the backends) as many as the fd limit allows.
NGX_CONNS_MAX=$(( NOFILE - 500 ))
(( NGX_CONNS_MAX > WANT_NOFILE )) && NGX_CONNS_MAX=$WANT_NOFILE
nginx_head() { # dir workers worker_connections
  cat <<EOF
worker_processes $2;
pid $1/nginx.pid;
error_log $1/error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections $3; }
EOF
}
nginx_temp() { # dir
  cat <<EOF
  client_body_temp_path $1/tmp/body;
  proxy_temp_path $1/tmp/proxy;
  fastcgi_temp_path $1/tmp/fastcgi;
  uwsgi_temp_path $1/tmp/uwsgi;
  scgi_temp_path $1/tmp/scgi;
EOF
}

write_backend() { # name port tag
  local d="$W/$1"; mkdir -p "$d/tmp"
  cat >"$d/nginx.conf" <<EOF
$(nginx_head "$d" 1 "$NGX_CONNS_MAX")
http {
  access_log off;
  default_type text/plain;
$(nginx_temp "$d")
  keepalive_timeout 65s;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$2 backlog=4096;
    location = /whoami { return 200 "$3\n"; }
    location = /status { stub_status; }
    location / { return 200 "ok\n"; }
  }
}
EOF
}

write_nginx() { # name port workers keepalive mode(plain|limit|tls|c10k|h2c|h2tls|hooks) [forward(1|0)]
  local d="$W/$1" listen="listen 127.0.0.1:$2" tls="" zone="" limit="" conns=8192 idmap="" fwd="" module="" hooks="" \
    hooked=""
  mkdir -p "$d/tmp"
  if [[ ${6:-$FORWARD_HEADERS} == 1 ]]; then
    # What Sluice's core adds to every forwarded request (README, "What forwarding does"):
    # the client's Host, X-Forwarded-For/-Proto/-Host, Via, and an x-request-id when absent.
    idmap="map \$http_x_request_id \$req_id { \"\" \$request_id; default \$http_x_request_id; }
  # W3C traceparent: join a valid one with a new span id, else start a trace (and drop tracestate).
  map \$request_id \$trace_span { \"~^(?<span>[0-9a-f]{16})\" \$span; }
  map \$http_traceparent \$trace_parent {
    \"~^00-(?<tid>[0-9a-f]{32})-[0-9a-f]{16}-(?<tflags>[0-9a-f]{2})\$\" \"00-\$tid-\$trace_span-\$tflags\";
    default \"00-\$request_id-\$trace_span-01\";
  }
  map \$http_traceparent \$trace_state { \"~^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\$\" \$http_tracestate; default \"\"; }"
    fwd="proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
      proxy_set_header Via \"1.1 nginx\";
      proxy_set_header X-Request-Id \$req_id;
      proxy_set_header traceparent \$trace_parent;
      proxy_set_header tracestate \$trace_state;"
  fi
  case $5 in
    c10k) conns=$NGX_CONNS_MAX ;;
    tls) listen+=" ssl" ;;
    h2c) listen+=" http2" ;;
    h2tls) listen+=" ssl http2" ;;
    limit) zone="limit_req_zone \$server_name zone=all:1m rate=1000000r/s;"
           limit="limit_req zone=all burst=1000 nodelay;" ;;
    hooks) # four njs calls per request: each variable is evaluated once, when its header is sent
           module="load_module $NJS_MODULE;"
           hooks="js_import hooks from $d/hooks.js;"
           : >"$d/hooks.js"
           for i in 1 2 3 4; do
             echo "function h$i(r) { return r.headersIn[\"x-absent-$i\"] || \"\"; }" >>"$d/hooks.js"
             hooks+=" js_set \$hook$i hooks.h$i;"
             hooked+=" proxy_set_header X-Absent-$i \$hook$i;"
           done
           echo 'export default { h1, h2, h3, h4 };' >>"$d/hooks.js" ;;
  esac
  [[ $5 == tls || $5 == h2tls ]] && tls="ssl_certificate $W/tls/cert.pem; ssl_certificate_key $W/tls/key.pem; ssl_protocols TLSv1.3; ssl_session_cache shared:SSL:1m;"
  cat >"$d/nginx.conf" <<EOF
$module
$(nginx_head "$d" "$3" "$conns")
http {
  access_log off;
$(nginx_temp "$d")
  keepalive_timeout 65s;
  keepalive_requests 1000000;
  $zone
  $idmap
  $hooks
  upstream backends {
    server 127.0.0.1:9101;
    server 127.0.0.1:9102;
    keepalive $4;
    keepalive_requests 1000000;
  }
  server {
    $listen backlog=4096;
    $tls
    location / {
      $limit
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      $fwd
      $hooked
    }
  }
}
EOF
}

write_haproxy() { # name port threads mode(plain|limit|tls|c10k|h2tls|hooks)
  local d="$W/$1" bind="bind 127.0.0.1:$2" maxconn=8000 limit="" strict="" fwd="" lua="" actions=""
  mkdir -p "$d"
  if [[ $FORWARD_HEADERS == 1 ]]; then
    # The same request headers as Sluice's core and the nginx targets add.
    fwd="option forwardfor
  http-request set-header X-Forwarded-Proto https if { ssl_fc }
  http-request set-header X-Forwarded-Proto http unless { ssl_fc }
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-request add-header Via \"1.1 haproxy\"
  http-request set-header X-Request-Id %[uuid] unless { req.hdr(x-request-id) -m found }
  acl traced req.hdr(traceparent) -m reg ^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\$
  http-request set-var(txn.span) uuid,regsub(-,,g),bytes(0,16)
  http-request set-header traceparent 00-%[req.hdr(traceparent),field(2,-)]-%[var(txn.span)]-%[req.hdr(traceparent),field(4,-)] if traced
  http-request del-header tracestate unless traced
  http-request set-header traceparent 00-%[uuid,regsub(-,,g)]-%[var(txn.span)]-01 unless traced"
  fi
  case $4 in
    tls) bind+=" ssl crt $W/tls/combined.pem alpn http/1.1 ssl-min-ver TLSv1.3" ;;
    h2tls) bind+=" ssl crt $W/tls/combined.pem alpn h2,http/1.1 ssl-min-ver TLSv1.3" ;;
    c10k) maxconn=$(( C10K_CONNS + 100 ))
          # HAProxy wants 2 fds per connection (client + server) up front and by default refuses
          # to start when it cannot raise the fd limit that far; http-reuse keeps its server side
          # small, so let it run within the limit it gets (it warns).
          (( 2 * maxconn + 100 > NOFILE )) && strict="no strict-limits" ;;
    limit) limit="stick-table type integer size 1k expire 10s store http_req_rate(1s)
  http-request track-sc0 int(1)
  http-request deny deny_status 429 if { sc_http_req_rate(0) gt 1000000 }" ;;
    hooks) # four Lua actions per request; a Lua state per thread (no lock shared between threads)
           cat >"$d/hooks.lua" <<'LUA'
core.register_action("absent", { "http-req" }, function(txn, name)
  txn.http:req_del_header(name)
end, 1)
LUA
           lua="lua-load-per-thread $d/hooks.lua"
           actions="http-request lua.absent x-absent-1
  http-request lua.absent x-absent-2
  http-request lua.absent x-absent-3
  http-request lua.absent x-absent-4" ;;
  esac
  cat >"$d/haproxy.cfg" <<EOF
global
  nbthread $3
  maxconn $maxconn
  $strict
  $lua
  # no 'log' lines: logging off

defaults
  mode http
  option http-keep-alive
  maxconn $maxconn
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  timeout http-keep-alive 65s

frontend fe
  $bind
  $limit
  $fwd
  $actions
  default_backend be

backend be
  balance roundrobin
  http-reuse always
  server b1 127.0.0.1:9101
  server b2 127.0.0.1:9102
EOF
}

# ---------------------------------------------------------------- targets of one block
TARGETS=()
declare -A URL KIND PORT TOOL CURLOPT
add_target() { # name kind(peer|sluice) url tool(wrk|h2load) [curl option]
  if [[ -n "$ONLY" && " $ONLY " != *" $1 "* ]]; then return; fi
  TARGETS+=("$1"); KIND[$1]=$2; URL[$1]=$3; TOOL[$1]=$4; CURLOPT[$1]=${5:-}
  local p=${3##*:}; PORT[$1]=${p%%/*}
}

start_nginx() { # name
  nginx -t -q -p "$W/$1/" -e "$W/$1/error.log" -c "$W/$1/nginx.conf" >"$W/$1.conftest" 2>&1 \
    || die "nginx config $1 invalid: $(cat "$W/$1.conftest")"
  start_bg "$1" "$W/$1.log" nginx -p "$W/$1/" -e "$W/$1/error.log" -c "$W/$1/nginx.conf" -g 'daemon off;'
}
start_haproxy() { # name
  haproxy -c -q -f "$W/$1/haproxy.cfg" >"$W/$1.conftest" 2>&1 \
    || die "haproxy config $1 invalid: $(cat "$W/$1.conftest")"
  start_bg "$1" "$W/$1.log" haproxy -db -f "$W/$1/haproxy.cfg"
}
start_sluice() { # name manifest workers
  start_bg "$1" "$W/$1.log" env RUST_LOG="$SLUICE_LOG" "$SLUICE" run -c "$2" --workers "$3"
}

setup_block() { # scenario workers: writes configs, registers and starts the targets
  local s=$1 w=$2 k i=0 mode
  TARGETS=(); URL=(); KIND=(); PORT=(); TOOL=(); CURLOPT=()
  case $s in
    plain|chain|limit|c10k) mode=$s; [[ $s == chain ]] && mode=plain
      for k in $NGINX_KEEPALIVES; do
        write_nginx "nginx-ka$k" $((9201 + i)) "$w" "$k" "$mode"; i=$((i + 1))
        add_target "nginx-ka$k" peer "http://127.0.0.1:$((9200 + i))/" wrk
      done
      write_haproxy haproxy 9301 "$w" "$mode"
      add_target haproxy peer http://127.0.0.1:9301/ wrk
      case $s in
        plain) if [[ $FORWARD_HEADERS == 1 ]]; then
                 write_nginx ref-nginx-bare 9290 "$w" 256 plain 0
                 add_target ref-nginx-bare ref http://127.0.0.1:9290/ wrk
               fi
               add_target sluice-rr sluice http://127.0.0.1:9501/ wrk
               add_target sluice-native sluice http://127.0.0.1:9502/ wrk ;;
        limit) add_target sluice-limit sluice http://127.0.0.1:9503/ wrk ;;
        chain) add_target sluice-chain sluice http://127.0.0.1:9504/ wrk
               add_target sluice-floor sluice http://127.0.0.1:9505/ wrk ;;
        c10k)  add_target sluice-native sluice http://127.0.0.1:9502/ wrk ;;
      esac ;;
    hooks)
      write_nginx nginx-njs 9201 "$w" 256 hooks
      add_target nginx-njs peer http://127.0.0.1:9201/ wrk
      write_haproxy haproxy-lua 9301 "$w" hooks
      add_target haproxy-lua peer http://127.0.0.1:9301/ wrk
      add_target sluice-hooks sluice http://127.0.0.1:9506/ wrk
      add_target sluice-hooks-one sluice http://127.0.0.1:9507/ wrk
      write_nginx ref-nginx-plain 9202 "$w" 256 plain
      add_target ref-nginx-plain ref http://127.0.0.1:9202/ wrk
      write_haproxy ref-haproxy-plain 9302 "$w" plain
      add_target ref-haproxy-plain ref http://127.0.0.1:9302/ wrk
      add_target ref-sluice-plain ref http://127.0.0.1:9502/ wrk ;;
    tls)
      for k in $NGINX_KEEPALIVES; do
        write_nginx "nginx-ka$k-tls" $((9201 + i)) "$w" "$k" tls; i=$((i + 1))
        add_target "nginx-ka$k-tls" peer "https://127.0.0.1:$((9200 + i))/" wrk
      done
      write_haproxy haproxy-tls 9301 "$w" tls
      add_target haproxy-tls peer https://127.0.0.1:9301/ wrk
      add_target sluice-tls sluice https://127.0.0.1:9543/ wrk ;;
    h2)
      for k in $NGINX_KEEPALIVES; do
        write_nginx "nginx-ka$k-h2c" $((9201 + i)) "$w" "$k" h2c
        add_target "nginx-ka$k-h2c" peer "http://127.0.0.1:$((9201 + i))/" h2load --http2-prior-knowledge
        write_nginx "nginx-ka$k-h2tls" $((9221 + i)) "$w" "$k" h2tls
        add_target "nginx-ka$k-h2tls" peer "https://127.0.0.1:$((9221 + i))/" h2load --http2
        i=$((i + 1))
      done
      write_haproxy haproxy-h2c 9301 "$w" plain
      add_target haproxy-h2c peer http://127.0.0.1:9301/ h2load --http2-prior-knowledge
      write_haproxy haproxy-h2tls 9321 "$w" h2tls
      add_target haproxy-h2tls peer https://127.0.0.1:9321/ h2load --http2
      add_target sluice-h2c sluice http://127.0.0.1:9502/ h2load --http2-prior-knowledge
      add_target sluice-h2tls sluice https://127.0.0.1:9543/ h2load --http2 ;;
  esac
  for t in "${TARGETS[@]}"; do port_free "${PORT[$t]}" || die "port ${PORT[$t]} ($t) already in use (not ours; refusing to touch it)"; done
  local manifest
  for t in "${TARGETS[@]}"; do
    case $t in
      nginx*|ref-nginx*) start_nginx "$t" ;;
      haproxy*|ref-haproxy*) start_haproxy "$t" ;;
      sluice-rr) start_sluice "$t" "$ROOT/bench/compare-sluice-rr.toml" "$w" ;;
      sluice-native|sluice-h2c|ref-sluice-plain) start_sluice "$t" "$ROOT/bench/compare-sluice-native.toml" "$w" ;;
      sluice-limit) start_sluice "$t" "$ROOT/bench/compare-sluice-limit.toml" "$w" ;;
      sluice-chain) start_sluice "$t" "$ROOT/bench/compare-sluice-chain.toml" "$w" ;;
      sluice-floor) start_sluice "$t" "$ROOT/bench/compare-sluice-floor.toml" "$w" ;;
      sluice-hooks) start_sluice "$t" "$ROOT/bench/compare-sluice-hooks.toml" "$w" ;;
      sluice-hooks-one) start_sluice "$t" "$ROOT/bench/compare-sluice-hooks-one.toml" "$w" ;;
      sluice-tls|sluice-h2tls) manifest=$W/compare-sluice-tls.toml; start_sluice "$t" "$manifest" "$w" ;;
      *) die "no start rule for $t" ;;
    esac
  done
  for t in "${TARGETS[@]}"; do
    # shellcheck disable=SC2086  # CURLOPT is one option or none
    wait_ok "$t" "${URL[$t]}" 30 ${CURLOPT[$t]}
  done
}

# ---------------------------------------------------------------- measurement helpers
ticks_pg() { # sum utime+stime (ticks) of all live processes in process group $1; "sys" as $2: stime only
  local pg=$1 t=0 p s
  local -a fields
  for p in $(pgrep -g "$pg"); do
    read -r s <"/proc/$p/stat" 2>/dev/null || continue
    s=${s##*) }
    read -r -a fields <<<"$s"
    if [[ ${2:-} == sys ]]; then t=$(( t + fields[12] )); else t=$(( t + fields[11] + fields[12] )); fi
  done
  echo "$t"
}
hwm_pg() { # sum of VmHWM (kB) over process group $1
  local p kb=0 v
  for p in $(pgrep -g "$1"); do
    v=$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null)
    kb=$(( kb + ${v:-0} ))
  done
  echo "$kb"
}
fds_pg() { # open fds over process group $1
  local p n=0 c
  for p in $(pgrep -g "$1"); do
    c=$(find "/proc/$p/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    n=$(( n + c ))
  done
  echo "$n"
}
sys_ticks() { local _c u n s i w q sq st _r; read -r _c u n s i w q sq st _r </proc/stat; echo "$((u+n+s+q+sq+st)) $((u+n+s+i+w+q+sq+st))"; }
stub() { curl -s --max-time 2 "http://127.0.0.1:$1/status" | awk 'NR==3 {print $1, $3}'; }
to_ms() { awk -v v="$1" 'BEGIN{ if (v=="") {print "nan"; exit}
  n=v; sub(/[a-z]+$/,"",n); u=v; sub(/^[0-9.]+/,"",u);
  f = (u=="us")?0.001:(u=="ms")?1:(u=="s")?1000:(u=="m")?60000:(u=="h")?3600000:1;
  printf "%.3f", n*f }'; }

EXTRA_HEADERS=()   # chain: the client's address for geo

start_load() { # target load(cN|h2) dur outfile ; starts wrk/h2load in the background (LOAD_PID)
  local t=$1 l=$2 d=$3 f=$4 c th
  if [[ ${TOOL[$t]} == h2load ]]; then
    /usr/bin/time -f '%e %U %S' -o "$f.time" timeout --foreground -k 2 $(( d + 15 )) \
      h2load -t1 -c"$H2_CLIENTS" -m"$H2_STREAMS" -D "$d" --log-file="$f.log" "${EXTRA_HEADERS[@]}" "${URL[$t]}" >"$f" 2>&1 &
  else
    c=${l#c}; th=$WRK_THREADS
    [[ $l == c10k ]] && { c=$C10K_CONNS; th=$C10K_THREADS; }
    /usr/bin/time -f '%e %U %S' -o "$f.time" timeout --foreground -k 2 $(( d + 15 )) \
      wrk -t"$th" -c"$c" -d"${d}s" --timeout "$WRK_TIMEOUT" --latency "${EXTRA_HEADERS[@]}" "${URL[$t]}" >"$f" 2>&1 &
  fi
  LOAD_PID=$!
}

load_desc() { # scenario load dur
  case $2 in
    h2) echo "h2load -t1 -c$H2_CLIENTS -m$H2_STREAMS -D $3 (h2c by prior knowledge / TLS ALPN h2)" ;;
    c10k) echo "wrk -t$C10K_THREADS -c$C10K_CONNS -d${3}s --timeout $WRK_TIMEOUT" ;;
    *) echo "wrk -t$WRK_THREADS -${2} -d${3}s --timeout $WRK_TIMEOUT${EXTRA_HEADERS[*]:+ ${EXTRA_HEADERS[*]}}" ;;
  esac
}

TSV="$W/runs.tsv"
printf '%s\n' "$TSV_HEADER" >"$TSV"

run_one() { # scenario workers load target round dur
  local s=$1 w=$2 l=$3 t=$4 r=$5 d=$6
  local f="$W/raw/${s}_w${w}_${l}_${t}_r${r}.txt" pg=${PG[$t]}
  local s10 s20 s1 s2 p0 p1 k0 k1 b0 b1 y0 y1 t0 t1 fds=0 estab=0 hwm lat=""
  s10=$(stub 9101); s20=$(stub 9102)
  p0=$(ticks_pg "$pg"); k0=$(ticks_pg "$pg" sys); b0=$(( $(ticks_pg "${PG[b1]}") + $(ticks_pg "${PG[b2]}") )); y0=$(sys_ticks)
  t0=$(date +%s.%N)
  start_load "$t" "$l" "$d" "$f"
  if [[ $l == c10k ]]; then
    sleep $(( d / 2 ))
    fds=$(fds_pg "$pg")
    estab=$(ss -Htn state established "( sport = :${PORT[$t]} )" | wc -l)
  fi
  wait "$LOAD_PID"; LOAD_PID=
  t1=$(date +%s.%N)
  p1=$(ticks_pg "$pg"); k1=$(ticks_pg "$pg" sys); b1=$(( $(ticks_pg "${PG[b1]}") + $(ticks_pg "${PG[b2]}") )); y1=$(sys_ticks)
  s1=$(stub 9101); s2=$(stub 9102)
  hwm=$(hwm_pg "$pg")
  if [[ ${TOOL[$t]} == h2load ]]; then   # p50/p99 from the per-request log (µs), then drop it
    lat=$(awk -F'\t' '{print $3}' "$f.log" 2>/dev/null | sort -n | awk '{a[NR]=$1} END{ if (NR == 0) { print "nan nan"; exit }
      i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++; i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++
      printf "%.3f %.3f\n", a[i50] / 1000, a[i99] / 1000 }')
    rm -f "$f.log"
  else
    lat="$(to_ms "$(awk '$1=="50%"{print $2}' "$f")") $(to_ms "$(awk '$1=="99%"{print $2}' "$f")")"
  fi
  awk -v s="$s" -v w="$w" -v l="$l" -v ld="$(load_desc "$s" "$l" "$d")" -v t="$t" -v kind="${KIND[$t]}" -v r="$r" \
      -v hz="$HZ" -v ncpu="$NCPU" -v el="$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')" \
      -v p0="$p0" -v p1="$p1" -v k0="$k0" -v k1="$k1" -v b0="$b0" -v b1="$b1" -v y0="$y0" -v y1="$y1" -v lat="$lat" \
      -v s10="$s10" -v s20="$s20" -v s1="$s1" -v s2="$s2" -v tm="$(tail -n1 "$f.time" 2>/dev/null)" \
      -v hwm="$hwm" -v fds="$fds" -v estab="$estab" '
    # wrk
    /^Requests\/sec:/ { rps = $2 }
    / requests in / { reqs = $1 }
    /Socket errors:/ { gsub(/,/, ""); err += $4 + $6 + $8 + $10 }
    /Non-2xx or 3xx/ { err += $NF }
    # h2load
    /^finished in / { gsub(/,/, ""); rps = $4 }
    # "requests: T total, S started, D done, OK succeeded, F failed, E errored, X timeout":
    # failed = done without a 2xx (non-2xx answers and stream errors)
    /^requests: / { gsub(/,/, ""); reqs = $6; err = $10 }
    END {
      if (rps == "") rps = "nan"
      if (reqs == "") reqs = 0
      split(lat, LT, " ")
      split(y0, Y0, " "); split(y1, Y1, " ")
      split(s10, A, " "); split(s20, B, " "); split(s1, C, " "); split(s2, D, " ")
      split(tm, T, " ")
      pcpu = (p1 - p0) / hz
      proxy = 100 * pcpu / el
      back  = 100 * (b1 - b0) / hz / el
      wrkc  = 100 * (T[2] + T[3]) / el
      sysc  = (Y1[2] > Y0[2]) ? 100 * ncpu * (Y1[1] - Y0[1]) / (Y1[2] - Y0[2]) : 0
      other = sysc - back - wrkc - proxy
      # -1: the stub_status request itself
      printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%.3f\t%.2f\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t%d\t%d\t%d\t%d\t%d\t%.3f\n",
        s, w, l, ld, t, kind, r, rps, LT[1], LT[2], reqs, err, pcpu, el, proxy, wrkc, back, sysc, other, hwm, fds, estab, C[2]-A[2]-1, D[2]-B[2]-1, (k1 - k0) / hz
    }' "$f" >>"$TSV"
  tail -n1 "$TSV" | awk -F'\t' '{printf "  %-18s %-5s r%s %9.0f req/s  p50 %8.2f ms  p99 %8.2f ms  err %d  CPU %5.1f%%  RSS %6.1f MiB  other %5.1f%%%s\n",
    $5, $3, $7, $8, $9, $10, $12, $15, $20 / 1024, $19, ($21 > 0 ? sprintf("  fds %d conns %d", $21, $22) : "")}' >&2
}

# ---------------------------------------------------------------- time budget
block_loads() { # scenario -> load labels
  case $1 in c10k) echo c10k ;; h2) echo h2 ;; *) local c; for c in $CONNS; do printf 'c%s ' "$c"; done ;; esac
}
load_dur() { case $1 in c10k) echo "$C10K_DUR" ;; h2) echo "$H2_DUR" ;; *) echo "$DUR" ;; esac; }
nk=$(wc -w <<<"$NGINX_KEEPALIVES")
ntargets() { case $1 in plain|chain) echo $((nk + 3)) ;; hooks) echo 7 ;; h2) echo $((2 * nk + 4)) ;; *) echo $((nk + 2)) ;; esac; }
EST=8
for s in "${SC[@]}"; do
  for w in $WORKERS; do
    n=$(ntargets "$s"); EST=$(( EST + 12 + n * (WARMUP + 1) ))
    for l in $(block_loads "$s"); do EST=$(( EST + ROUNDS * n * ($(load_dur "$l") + 2) )); done
  done
done
log "scenarios: ${SC[*]}; workers: $WORKERS; rounds: $ROUNDS; wrk -c: $CONNS; estimated ${EST}s, cap ${MAX_TOTAL}s; work dir $W"
(( EST > MAX_TOTAL )) && log "WARNING: the estimate exceeds MAX_TOTAL: the last runs will be skipped (raise MAX_TOTAL or lower ROUNDS/DUR)"

# ---------------------------------------------------------------- backends
write_backend b1 9101 b1
write_backend b2 9102 b2
for p in 9101 9102; do port_free $p || die "port $p already in use (not ours; refusing to touch it)"; done
start_nginx b1
start_nginx b2
wait_ok b1 http://127.0.0.1:9101/ 10
wait_ok b2 http://127.0.0.1:9102/ 10

# ---------------------------------------------------------------- run
SKIPPED=0
SANITY=()
TLSINFO=()
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for s in "${SC[@]}"; do
  EXTRA_HEADERS=()
  [[ $s == chain ]] && EXTRA_HEADERS=(-H "X-Forwarded-For: 193.99.144.80")
  for w in $WORKERS; do
    if (( SECONDS + 30 > MAX_TOTAL )); then log "skip block $s w$w (time cap)"; SKIPPED=$((SKIPPED + 1)); continue; fi
    log "== $s, $w worker(s): starting targets"
    setup_block "$s" "$w"
    (( ${#TARGETS[@]} )) || { log "  no target left by ONLY"; continue; }
    # sanity: every target round-robins over both backends
    line="$s w$w:"
    for t in "${TARGETS[@]}"; do
      # shellcheck disable=SC2086
      seen=$(for _ in 1 2 3 4 5 6; do curl -sk --max-time 2 ${CURLOPT[$t]} "${URL[$t]}whoami"; done | sort -u | tr '\n' ' ')
      [[ "$seen" == "b1 b2 " ]] || log "WARNING: $t /whoami saw '$seen' (expected both b1 and b2)"
      line+=" ${t}[${seen% }]"
      if [[ ${URL[$t]} == https* ]]; then
        alpn=(); [[ ${TOOL[$t]} == h2load ]] && alpn=(-alpn h2)
        info=$(openssl s_client -connect "127.0.0.1:${PORT[$t]}" -servername localhost "${alpn[@]}" </dev/null 2>/dev/null \
          | awk '/^(New|Reused),/ { sub(/, Cipher is /, " "); sub(/^(New|Reused), /, ""); v = $0 } /^ALPN protocol:/ { a = " ALPN " $3 } END { print v a }')
        TLSINFO+=("$t: ${info:-handshake failed}")
      fi
    done
    SANITY+=("$line")
    for t in "${TARGETS[@]}"; do
      start_load "$t" "$(block_loads "$s" | awk '{print $1}')" "$WARMUP" "$W/raw/warmup_${s}_w${w}_$t.txt"; wait "$LOAD_PID"; LOAD_PID=
    done
    nt=${#TARGETS[@]}
    for l in $(block_loads "$s"); do
      d=$(load_dur "$l")
      for r in $(seq 1 "$ROUNDS"); do
        log "$s w$w $l round $r/$ROUNDS (load $(cut -d' ' -f1-3 /proc/loadavg))"
        for i in $(seq 0 $((nt - 1))); do
          t=${TARGETS[$(( (i + r - 1) % nt ))]}
          if (( SECONDS + d + 8 > MAX_TOTAL - 10 )); then SKIPPED=$((SKIPPED + 1)); log "  skip $t $l r$r (time cap)"; continue; fi
          run_one "$s" "$w" "$l" "$t" "$r" "$d"
          sleep 0.3
        done
      done
    done
    pgs=(); for t in "${TARGETS[@]}"; do pgs+=("${PG[$t]}"); done
    stop_pgs "${pgs[@]}"
  done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- report
report() {
  local x
  echo "## compare.sh results — $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "- host: $(uname -r), ${NCPU} CPUs, load(1/5/15) start: $LOAD_START, end: $LOAD_END; ulimit -n $NOFILE; somaxconn $(cat /proc/sys/net/core/somaxconn)"
  echo "- sluice $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?') ($SLUICE); $(nginx -v 2>&1); $(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f1-3); $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)$( (( HAVE_H2LOAD )) && echo "; $(h2load --version 2>/dev/null | head -1)")"
  echo "- ${ROUNDS} interleaved rounds per table, ${WARMUP} s warmup per target; nginx upstream keepalive: ${NGINX_KEEPALIVES}; backends: 2 × nginx (1 worker); nice ${NICE:-0}"
  echo "- round-robin check (/whoami ×6 per target):"
  for x in "${SANITY[@]}"; do echo "  - $x"; done
  if (( ${#TLSINFO[@]} )); then
    echo "- TLS (openssl s_client): $(printf '%s; ' "${TLSINFO[@]}")"
  fi
  for x in "${NOTES[@]}"; do echo "- NOTE: $x"; done
  (( SKIPPED > 0 )) && echo "- WARNING: $SKIPPED runs or blocks skipped by the time cap (MAX_TOTAL=$MAX_TOTAL)"
  # Sluice must answer every request: name each table where it did not
  awk -F'\t' 'NR > 1 && $6 == "sluice" { e[$1 " w" $2 " " $3 " " $5] += $12 }
    END { for (k in e) if (e[k] > 0) printf "- WARNING: %s: %d errors (see its log in the work dir)\n", k, e[k] }' "$TSV" | sort
  tables "$TSV"
  echo
  echo "Raw outputs, configs, logs and per-run TSV: $W (re-print: REPORT_ONLY=$W/runs.tsv $0)"
}
REPORT=$(report)
echo "$REPORT"
[[ -n "$RESULTS_MD" ]] && printf '%s\n' "$REPORT" >"$RESULTS_MD"
log "done in ${SECONDS}s"
