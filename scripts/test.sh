#!/usr/bin/env bash
# Set up (first time only) and run the test suite; extra arguments go to pytest.
source "$(dirname "$0")/bootstrap.sh"
cd "$ROOT"
exec python -m pytest "$@"
