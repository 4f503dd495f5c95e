#!/usr/bin/env bash
# Runs a command with every other Python process of this user paused (SIGSTOP, then SIGCONT after,
# also on failure or Ctrl-C), so that a timing on a shared 2-core machine is not the neighbours'.
set -uo pipefail
pids=$(pgrep -u "$(id -u)" -f python | grep -vx "$$" || true)
mine=$(ps -o pid= --ppid $$ 2>/dev/null || true)
resume() { [ -n "$pids" ] && kill -CONT $pids 2>/dev/null; }
trap resume EXIT INT TERM
[ -n "$pids" ] && kill -STOP $pids 2>/dev/null
"$@"
