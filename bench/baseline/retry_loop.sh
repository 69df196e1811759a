#!/usr/bin/env bash
# The usual supervisor: run the command again whenever it exits non-zero, at once
# (Kubernetes restartPolicy: OnFailure, or systemd Restart=on-failure with a short
# RestartSec). No GPU health monitoring. When RETRY_LOG is set, each start and
# exit is appended to it with a Unix timestamp so the benchmark can time them.
#   retry_loop.sh CMD [ARG...]
log=${RETRY_LOG:-/dev/null}
while true; do
  echo "start $(date +%s.%N)" >>"$log"
  "$@"
  rc=$?
  echo "exit $rc $(date +%s.%N)" >>"$log"
  [ "$rc" -eq 0 ] && exit 0
done
