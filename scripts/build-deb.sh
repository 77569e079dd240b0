#!/usr/bin/env bash
# Builds the Debian package (dpkg-buildpackage -us -uc -b) from a copy of this tree, so the build
# leaves nothing behind here and nothing next to the repository. Prints the .deb's path.
# Usage: scripts/build-deb.sh [OUTDIR]   (default: dist/)
# Needs: scripts/install-system-deps.sh deb (debhelper, dh-python, clang, libbpf-dev, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
outdir=$(realpath -m "${1:-dist}")
version=$(dpkg-parsechangelog -S Version)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src="$work/picosnitch-$version"
mkdir "$src"
# The files git knows and the new ones it does not ignore (not .venv, build/, *.bpf.o, ...).
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"
done | tar --null -T - -cf - | tar -xf - -C "$src"
# Debian's own tools and Python only (not a pyenv or venv python that happens to come first).
(cd "$src" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1) || {
    tail -n 60 "$work/build.log" >&2
    echo "dpkg-buildpackage failed (the last lines of its output are above)" >&2
    exit 1
}
mkdir -p "$outdir"
deb=$(ls "$work"/picosnitch_"$version"_*.deb)
cp "$deb" "$outdir/"
echo "$outdir/$(basename "$deb")"
