#!/bin/sh
# Build the C load generator into bench/build/ (git-ignored).
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$here/build"
${CC:-cc} -O2 -Wall -Wextra -o "$here/build/loadgen" "$here/loadgen.c"
echo "$here/build/loadgen"
