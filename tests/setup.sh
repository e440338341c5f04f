#!/usr/bin/env bash
# What make test needs beyond a C compiler: a python3 with numpy (for export.py). Installs
# Debian's python3-numpy when run as root or with sudo; otherwise says what to do.
set -euo pipefail
for p in python3 /usr/bin/python3; do
  if $p -c 'import numpy' 2>/dev/null; then echo "$p"; exit 0; fi
done
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if command -v apt-get >/dev/null && { [ -z "$SUDO" ] || command -v sudo >/dev/null; }; then
  echo "make test: installing python3-numpy (Debian) for export.py" >&2
  $SUDO apt-get install -y -qq python3-numpy >&2 || { $SUDO apt-get update -qq >&2 && $SUDO apt-get install -y -qq python3-numpy >&2; }
  /usr/bin/python3 -c 'import numpy' && echo /usr/bin/python3 && exit 0
fi
echo "error: no python3 with numpy (Debian: apt-get install -y python3-numpy)" >&2
exit 1
