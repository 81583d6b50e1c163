#!/usr/bin/env bash
# CI: a Docker-compatible engine (podman serving the Docker API, with locally built stand-ins for
# the two images the project names, since no image registry is reachable here), then the
# project's own compose.yaml run for real.
#
#   .ci/compose.sh setup   set up the engine (idempotent; about 4 min on a fresh machine, seconds after)
#   .ci/compose.sh demo    docker-compose up --build: both workers must exit 0 and both result lines
#                          say "checksum verified"; then down -v. A broken Dockerfile or compose file
#                          fails it. The default profile; CLUSTER=1 runs the `cluster` profile instead,
#                          REGIONS=1 the `regions` profile (three brokers joined by federation),
#                          ROUNDS=1 the `rounds` profile (federated learning: rounds 2.. must be deltas).
#   .ci/compose.sh stop    stop the engine's background processes (API socket, healthcheck ticker)
#
# Clients then need DOCKER_HOST=unix:///run/podman/podman.sock (testcontainers also
# TESTCONTAINERS_RYUK_DISABLED=true TESTCONTAINERS_CONNECTION_MODE=docker_host).
# The engine comes from the shared tools of these machines: $OBJSTREAM_CONTAINER_ENGINE, else
# ../shared/tools/container-engine.sh beside this repository, else /work/shared/tools/.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
export WORK=${WORK:-/tmp/podman-setup}   # the engine script's work dir, with its pid files
export DOCKER_HOST=unix:///run/podman/podman.sock
DEMO_TIMEOUT=${DEMO_TIMEOUT:-600}        # seconds for build + both workers
t() { echo "ci: [$(date +%T)] $*"; }

engine_script() {
  local c
  for c in "${OBJSTREAM_CONTAINER_ENGINE:-}" "$REPO/../shared/tools/container-engine.sh" \
    /work/shared/tools/container-engine.sh; do
    if [ -n "$c" ] && [ -f "$c" ]; then echo "$c"; return; fi
  done
  echo "ci: no container engine setup script: set OBJSTREAM_CONTAINER_ENGINE, or provide" \
    "$REPO/../shared/tools/container-engine.sh or /work/shared/tools/container-engine.sh" >&2
  exit 1
}

setup() {
  local script
  script=$(engine_script)
  t "container engine: $script"
  bash "$script"
  t "engine ready"
}

demo() {
  local compose=(docker-compose -p objstream-ci --ansi never)
  local workers=(producer consumer)
  if [ "${CLUSTER:-0}" = 1 ]; then
    compose+=(--profile cluster); workers=(cluster-producer cluster-consumer)
  elif [ "${REGIONS:-0}" = 1 ]; then
    compose+=(--profile regions); workers=(regions-server regions-site-1 regions-site-2)
  elif [ "${ROUNDS:-0}" = 1 ]; then
    compose+=(--profile rounds); workers=(rounds-server rounds-clients)
  fi
  # shellcheck disable=SC2064
  trap "${compose[*]} down -v >/dev/null 2>&1 || true" EXIT
  "${compose[@]}" down -v >/dev/null 2>&1 || true   # leftovers of an interrupted run
  t "compose up --build"
  timeout "$DEMO_TIMEOUT" "${compose[@]}" up -d --build "${workers[@]}"
  local ids codes logs want
  ids=$("${compose[@]}" ps -q "${workers[@]}")
  [ "$(echo "$ids" | wc -w)" = "${#workers[@]}" ] || { echo "ci: compose did not create every worker" >&2; exit 1; }
  # shellcheck disable=SC2086
  codes=$(timeout "$DEMO_TIMEOUT" podman wait $ids | tr '\n' ' ')
  logs=$("${compose[@]}" logs --no-color "${workers[@]}")
  echo "$logs" | grep -E 'checksum|rror|objstream:' || true
  t "worker exit codes: $codes"
  want=$(printf '0 %.0s' "${workers[@]}")
  if [ "$codes" != "$want" ]; then
    echo "$logs" | tail -n 40 >&2
    echo "ci: compose demo failed: worker exit codes $codes" >&2
    exit 1
  fi
  local verified
  verified=$(echo "$logs" | grep -c 'checksum verified' || true)
  [ "$verified" -ge 2 ] || { echo "ci: compose demo: $verified 'checksum verified' lines (want 2+)" >&2; exit 1; }
  if [ "${CLUSTER:-0}" = 1 ]; then   # really one cluster of three, on quorum queues
    local status
    status=$("${compose[@]}" exec -T rabbit-1 rabbitmqctl -q cluster_status --formatter json)
    echo "$status" | python3 -c 'import json, sys; s = json.load(sys.stdin); print("ci: running nodes:", s["running_nodes"]); sys.exit(len(s["running_nodes"]) != 3)' \
      || { echo "ci: the cluster does not run three nodes" >&2; exit 1; }
    local queues
    queues=$("${compose[@]}" exec -T rabbit-1 rabbitmqctl -q list_queues name type | grep -E 'site|dead' || true)
    echo "$queues"
    if [ -z "$queues" ] || echo "$queues" | grep -qv quorum; then
      echo "ci: the cluster's objstream queues are not all quorum queues" >&2; exit 1
    fi
  fi
  if [ "${REGIONS:-0}" = 1 ]; then   # really federated: the central broker's two links run
    local links
    links=$("${compose[@]}" exec -T rabbit-central rabbitmqctl -q federation_status --formatter json | grep -o '"running"' | wc -l)
    echo "ci: federation links running on the central broker: $links"
    [ "$links" -ge 2 ] || { echo "ci: the central broker's federation links do not run" >&2; exit 1; }
    # and the sites' inboxes are on their regions' brokers only (OBJSTREAM_DECLARE_PEERS=false)
    if "${compose[@]}" exec -T rabbit-central rabbitmqctl -q list_queues name | grep -E '\.site\.site-'; then
      echo "ci: a site's inbox was declared on the central broker" >&2; exit 1
    fi
  fi
  if [ "${ROUNDS:-0}" = 1 ]; then   # the later rounds moved a fraction of round 1's bytes
    local share
    share=$(echo "$logs" | grep -o 'a round after ([0-9.]* %)' | head -n 1 | tr -dc '0-9.\n')
    echo "ci: later rounds moved ${share:-?} % of round 1's bytes"
    python3 -c 'import sys; sys.exit(not 0 < float(sys.argv[1] or "100") < 30)' "$share" \
      || { echo "ci: the rounds after the first were not deltas" >&2; exit 1; }
  fi
  t "compose demo passed; down -v"
}

stop() {
  local f
  for f in "$WORK/ticker.pid" "$WORK/service.pid"; do
    if [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then
      kill "$(cat "$f")" && t "stopped $(basename "$f" .pid) ($(cat "$f"))"
    fi
    rm -f "$f"
  done
}

case "${1:-}" in
  setup) setup ;;
  demo) demo ;;
  stop) stop ;;
  *) echo "usage: $0 setup|demo|stop" >&2; exit 2 ;;
esac
