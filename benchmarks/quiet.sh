#!/usr/bin/env bash
# Runs a command while every other Python process and compiler of this user is paused (SIGSTOP, checked every
# half second so that processes started meanwhile are paused too; SIGCONT at the end, also on
# failure or Ctrl-C), so that a timing on a shared 2-core machine is not the neighbours'.
# Another quiet.sh and its command are left running (two pausing each other would never resume).
set -uo pipefail
stopped=$(mktemp)
"$@" &
cmd=$!
ours() {  # is $1 this script's command, or another quiet.sh run, or below one of them?
  local p=$1
  while [ -n "$p" ] && [ "$p" -gt 1 ]; do
    [ "$p" = "$$" ] && return 0
    grep -q "quiet.sh" "/proc/$p/cmdline" 2>/dev/null && return 0
    p=$(ps -o ppid= -p "$p" 2>/dev/null | tr -d ' ')
  done
  return 1
}
resume() { sort -u "$stopped" | xargs -r kill -CONT 2>/dev/null; rm -f "$stopped"; }
trap resume EXIT
trap 'kill "$cmd" 2>/dev/null; exit 130' INT TERM
while kill -0 "$cmd" 2>/dev/null; do
  for pid in $(pgrep -u "$(id -u)" -f 'python|cc1|g\+\+|gcc|cmake|make|ninja|collect2'); do
    ours "$pid" || { kill -STOP "$pid" 2>/dev/null && echo "$pid" >> "$stopped"; }
  done
  sleep 0.5
done
wait "$cmd"
