#!/usr/bin/env bash
# Fetches the dashboard's JavaScript dependency (uPlot) from the npm registry and copies the two
# files the dashboard serves, with the package's license, into picosnitch/ui/dash/static/vendor/.
# Build/maintenance time only: `picosnitch dash` never fetches anything, and the vendored files
# are committed so that building, testing and running need no network.
# The tarball is checked against the registry's pinned sha512 integrity before it is unpacked.
# Usage: scripts/fetch-js-assets.sh           (re)vendor the pinned version
#        scripts/fetch-js-assets.sh --check   verify that the vendored files match the tarball
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE=uplot
VERSION=1.6.32
INTEGRITY="sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw=="
DEST=picosnitch/ui/dash/static/vendor
FILES=(dist/uPlot.iife.min.js dist/uPlot.min.css LICENSE)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$PACKAGE@$VERSION" >/dev/null 2>&1)
tarball=$(ls "$work"/*.tgz)
actual="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
if [ "$actual" != "$INTEGRITY" ]; then
    echo "fetch-js-assets: $PACKAGE@$VERSION integrity mismatch: got $actual" >&2
    exit 1
fi
tar -xzf "$tarball" -C "$work"
status=0
for f in "${FILES[@]}"; do
    target="$DEST/$(basename "$f")"
    [ "$f" = LICENSE ] && target="$DEST/uPlot.LICENSE"
    if [ "${1:-}" = --check ]; then
        cmp -s "$work/package/$f" "$target" || { echo "fetch-js-assets: $target differs from $PACKAGE@$VERSION" >&2; status=1; }
    else
        mkdir -p "$DEST"
        cp "$work/package/$f" "$target"
    fi
done
if [ "${1:-}" != --check ]; then
    printf '%s@%s from the npm registry (%s), fetched by scripts/fetch-js-assets.sh\n' \
        "$PACKAGE" "$VERSION" "$INTEGRITY" > "$DEST/VERSION"
fi
exit $status
