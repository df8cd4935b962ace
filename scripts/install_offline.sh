#!/usr/bin/env bash
# Install fastssl's loaders from a wheelhouse written by scripts/wheelhouse.py, on a node without internet.
#
#   bash scripts/install_offline.sh [--verify-only] DIR
#
# 1. Checks every file SHA256SUMS lists: a missing one (a transfer may bring the parts in several goes) or a
#    damaged one is named, and the script stops with status 1 before touching anything.
# 2. Joins NAME.part000, NAME.part001, ... into NAME and checks it against SHA256SUMS.joined.
# 3. pip install --no-index --find-links DIR of REQUIREMENTS.txt into the current environment (the python3 on
#    PATH, or $PYTHON), with the packages the wheelhouse left out (torch, torchvision, ...) pinned to the
#    versions installed here: this environment's torch is never reinstalled or upgraded.
# 4. Imports each backend (nvidia.dali, ffcv and its compiled ffcv._libffcv, torchcodec, fastssl, pipelines)
#    and prints its version; status 2 names those that fail.
# Running it again is harmless: joined files that verify are kept, and pip finds everything installed.
# --verify-only stops after step 2.
set -euo pipefail

usage() { echo "usage: $0 [--verify-only] WHEELHOUSE_DIR" >&2; exit 64; }
verify_only=0
[[ ${1:-} == --verify-only ]] && { verify_only=1; shift; }
[[ $# -eq 1 ]] || usage
dir=$(cd "$1" 2>/dev/null && pwd) || { echo "error: $1: no such folder (the wheelhouse to install)" >&2; exit 1; }
py=${PYTHON:-python3}
say() { printf '[install_offline] %s\n' "$*"; }
cd "$dir"
[[ -f SHA256SUMS ]] || { echo "error: $dir/SHA256SUMS is missing: carry it (it lists every file) and rerun" >&2; exit 1; }

# ---- 1. every file present and intact ---------------------------------------------------------------------
missing=() damaged=() total=0
while read -r sum name; do
    [[ -n ${name:-} ]] || continue
    total=$((total + 1))
    if [[ ! -f $name ]]; then
        missing+=("$name")
    elif [[ $(sha256sum <"$name" | cut -d' ' -f1) != "$sum" ]]; then
        damaged+=("$name")
    fi
done <SHA256SUMS
if ((${#missing[@]} || ${#damaged[@]})); then
    if ((${#missing[@]})); then
        echo "missing ${#missing[@]} of $total files in $dir (carry them, then rerun):" >&2
        printf '  %s\n' "${missing[@]}" >&2
    fi
    if ((${#damaged[@]})); then
        echo "damaged (checksum differs; carry them again):" >&2
        printf '  %s\n' "${damaged[@]}" >&2
    fi
    exit 1
fi
say "all $total files of SHA256SUMS present and verified"

# ---- 2. join the parts ------------------------------------------------------------------------------------
if [[ -s SHA256SUMS.joined ]]; then
    while read -r sum name; do
        [[ -n ${name:-} ]] || continue
        if [[ -f $name && $(sha256sum <"$name" | cut -d' ' -f1) == "$sum" ]]; then
            say "$name: already joined"
            continue
        fi
        mapfile -t parts < <(awk -v p="$name.part" \
            'index($2, p) == 1 && substr($2, length(p) + 1) ~ /^[0-9]+$/ {print $2}' SHA256SUMS | sort)
        ((${#parts[@]})) || { echo "error: SHA256SUMS lists no parts of $name" >&2; exit 1; }
        cat "${parts[@]}" >".$name.tmp"
        if [[ $(sha256sum <".$name.tmp" | cut -d' ' -f1) != "$sum" ]]; then
            rm -f ".$name.tmp"
            echo "error: $name joined from ${#parts[@]} parts does not match SHA256SUMS.joined" >&2
            exit 1
        fi
        mv ".$name.tmp" "$name"
        say "$name: joined from ${#parts[@]} parts, verified"
    done <SHA256SUMS.joined
fi
((verify_only)) && exit 0

# ---- 3. pip install, this environment's torch kept -----------------------------------------------------------
[[ -f REQUIREMENTS.txt ]] || { echo "error: $dir/REQUIREMENTS.txt is missing (wheelhouse.py writes it)" >&2; exit 1; }
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# The wheelhouse's Python must be this one, and each package it left out is pinned to what is installed here.
"$py" - "$dir" >"$constraints" <<'EOF'
import json, sys
from importlib import metadata
from pathlib import Path

info = json.loads((Path(sys.argv[1]) / "WHEELHOUSE.json").read_text())
here = "%d.%d" % sys.version_info[:2]
if info["python"] != here:
    sys.exit(f"error: the wheelhouse is for Python {info['python']}, this environment ({sys.executable}) runs {here}")
for name in info["excluded"]:
    try:
        print(f"{name}=={metadata.version(name).split('+')[0]}")
    except metadata.PackageNotFoundError:
        if name in ("torch", "torchvision"):
            sys.exit(f"error: {name} is not installed in this environment ({sys.executable}) and the wheelhouse "
                     "leaves it out: install it first")
EOF
torch_before=$("$py" -c 'import torch; print(torch.__version__)')
say "installing with $("$py" -c 'import sys; print(sys.executable)'); kept as installed: $(paste -sd' ' "$constraints")"
"$py" -m pip install --quiet --no-index --find-links "$dir" --constraint "$constraints" -r REQUIREMENTS.txt
say "pip install done"
torch_after=$("$py" -c 'import torch; print(torch.__version__)')
if [[ $torch_before != "$torch_after" ]]; then
    echo "error: torch changed from $torch_before to $torch_after" >&2
    exit 1
fi

# ---- 4. import every backend --------------------------------------------------------------------------------
cd /  # import the installed packages, not a checkout that happens to be the current folder
"$py" - <<'EOF'
import importlib
import sys

from importlib import metadata

DIST = {"nvidia.dali": "nvidia-dali-cuda130", "ffcv._libffcv": "ffcv", "pipelines": "fastssl"}

def version(name, mod):
    # The installed distribution's version first: ffcv 1.0.2 says __version__ = "0.0.3rc1".
    try:
        return metadata.version(DIST.get(name, name))
    except (metadata.PackageNotFoundError, ValueError):
        return str(getattr(mod, "__version__", "?"))

failed = []
for name in ("torch", "nvidia.dali", "ffcv", "ffcv._libffcv", "torchcodec", "fastssl", "pipelines"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name:<14} {version(name, mod):<12} {getattr(mod, '__file__', '')}")
    except Exception as e:  # report them all, not only the first
        failed.append(name)
        print(f"  {name:<14} FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
if failed:
    print(f"error: could not import {', '.join(failed)}", file=sys.stderr)
    sys.exit(2)
EOF
