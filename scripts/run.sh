#!/usr/bin/env bash
# Set up (first time only) and run the SPARCOM pipeline; extra arguments go to `sparcom run`.
source "$(dirname "$0")/bootstrap.sh"
cd "$ROOT"
exec sparcom run "$@"
