# Sourced by bin/run and bin/test (not a command): create .venv and install requirements into it.
# Usage: ensure_venv REQUIREMENTS_FILE. Re-installs only when the requirements files changed: a
# checksum of them is kept in .venv/.installed-<file>.

ensure_venv() {
    local requirements="$1"
    local python="${PYTHON:-python3}"
    local stamp=".venv/.installed-${requirements}"
    local wanted
    # requirements-dev.txt includes requirements.txt and requirements-otel.txt (-r), so they
    # count for every stamp.
    wanted="$(cat "$requirements" requirements.txt requirements-otel.txt | cksum)"

    if ! .venv/bin/python -c "" 2>/dev/null; then
        if ! command -v "$python" >/dev/null; then
            echo "error: $python not found; install Python 3.11 or newer (or set PYTHON)" >&2
            return 1
        fi
        if ! "$python" -c "import sys; sys.exit(sys.version_info < (3, 11))"; then
            echo "error: Python 3.11 or newer is required, $python is $("$python" -V 2>&1)" >&2
            return 1
        fi
        echo "Creating .venv with $("$python" -V 2>&1)"
        "$python" -m venv --clear .venv
    fi

    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$wanted" ]]; then
        echo "Installing $requirements into .venv (the first time takes a minute or two)"
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
        echo "$wanted" >"$stamp"
    fi
}
