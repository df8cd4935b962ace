#!/usr/bin/env bash
# One idempotent setup for a fresh machine, and a few seconds when nothing changed:
#   1. Debian packages FFCV's C extension and the demo need (apt-get only when one is missing);
#   2. the virtualenv (Python >= 3.10);
#   3. `pip install -e .[EXTRAS]`, skipped while a stamp keyed on pyproject.toml still matches.
#
# Environment: VENV (default .venv), EXTRAS (default dev,ffcv,dali-cu13,codec), PYTHON (interpreter
# used to create the venv; default: the first python3.x >= 3.10 on PATH), FORCE=1 (reinstall).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev,ffcv,dali-cu13,codec}
# g++ compiles FFCV's extension; libgl1 is needed to import cv2 from the opencv-python wheel FFCV requires.
APT_PACKAGES=(pkg-config g++ libturbojpeg0-dev libopencv-dev libgl1 dataset-fashion-mnist)

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'printf "[setup] FAILED (line %s: %s)\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive

can_apt() { [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; }
apt_updated=0
apt_install() {
    say "installing Debian packages: $*"
    if ((apt_updated == 0)); then apt-get update -q; apt_updated=1; fi
    apt-get install -y -q "$@"
}

# --- 1. Debian packages -------------------------------------------------------------------------
if command -v dpkg-query >/dev/null 2>&1; then
    missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        say "Debian packages present: ${APT_PACKAGES[*]}"
    elif can_apt; then
        apt_install "${missing[@]}"
    else
        say "WARNING: missing Debian packages: ${missing[*]}"
        say "WARNING: run:  sudo apt-get update && sudo apt-get install -y ${missing[*]}"
        say "WARNING: continuing; building FFCV will fail without them"
    fi
else
    say "WARNING: not a Debian system; install pkg-config, a C++ compiler, OpenCV and libturbojpeg" \
        "development files yourself (FFCV's extension builds against them)"
fi

# --- 2. virtualenv ------------------------------------------------------------------------------
py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; }

if [[ -x $VENV/bin/python ]] && py_ok "$VENV/bin/python"; then
    say "virtualenv $VENV: $("$VENV/bin/python" -V 2>&1)"
elif [[ -e $VENV ]]; then
    # Never delete it here: the cause may be passing (permissions, a moved interpreter).
    die "$VENV exists but its python does not run as Python >= 3.10; remove it ('make distclean'), rerun"
else
    PY=${PYTHON:-}
    if [[ -z $PY ]]; then
        for cand in python3 python3.13 python3.12 python3.11 python3.10; do
            if command -v "$cand" >/dev/null 2>&1 && py_ok "$cand"; then PY=$cand; break; fi
        done
    fi
    if [[ -z $PY ]] && can_apt; then
        apt_install python3 python3-venv
        PY=/usr/bin/python3
    fi
    [[ -n $PY ]] && py_ok "$PY" || die "need Python >= 3.10 (set PYTHON=/path/to/python3)"
    say "creating virtualenv $VENV with $(command -v "$PY") ($("$PY" -V 2>&1))"
    if ! "$PY" -m venv "$VENV"; then
        rm -rf "$VENV"  # our own partial venv: it did not exist before this step
        # Debian's python3 creates venvs only with python3-venv installed.
        if [[ $(command -v "$PY") != /usr/bin/* ]] || ! can_apt; then
            die "'$PY -m venv' failed; on Debian: apt-get install -y python3-venv"
        fi
        apt_install python3-venv
        "$PY" -m venv "$VENV" || { rm -rf "$VENV"; die "'$PY -m venv' failed"; }
    fi
fi

# Into a log (not a terminal), pip's hundreds of "Collecting ..." lines would bury the demo's output: -q keeps
# its warnings and errors, and the warning a pip config repeats for each package (an index folder that is not
# there) is counted into one line. setuptools' 10-line "Editable installation" notice for `pip install -e`
# (a reminder, not a problem) becomes one line too. On a terminal pip prints as usual.
pip_install() {
    if [[ -t 1 ]]; then
        "$VENV/bin/python" -m pip install "$@"
    else
        "$VENV/bin/python" -m pip install -q "$@" 2>&1 | awk -f scripts/pip_quiet.awk
    fi
}

# --- 3. the package and its extras ----------------------------------------------------------------
stamp=$VENV/.fastssl-setup-stamp
key="$(sha256sum pyproject.toml | cut -d' ' -f1) extras=$EXTRAS"
if [[ ${FORCE:-0} != 1 && -f $stamp && $(<"$stamp") == "$key" ]]; then
    say "python packages up to date (pyproject.toml unchanged since the last install)"
else
    rm -f "$stamp"
    say "installing: pip install -e .[$EXTRAS] (first time: several minutes)"
    pip_install --upgrade pip setuptools wheel
    pip_install -e ".[$EXTRAS]"
    modules=(torch torchvision fastssl pipelines)
    if [[ ,$EXTRAS, == *,dali-* ]]; then modules+=(nvidia.dali); fi
    if [[ ,$EXTRAS, == *,ffcv,* ]]; then modules+=(ffcv ffcv._libffcv cv2 numba); fi
    if [[ ,$EXTRAS, == *,codec,* ]]; then modules+=(torchcodec.decoders); fi
    say "checking imports: ${modules[*]}"
    "$VENV/bin/python" -c 'import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]' \
        "${modules[@]}"
    printf '%s\n' "$key" >"$stamp"
fi
say "ready: $VENV ($("$VENV/bin/python" -V 2>&1)); try 'make demo' or 'make test'"
