#!/bin/sh
# Fetch Debian's busybox-static for i386 into a cache folder (no root needed) and
# print the path of its bin/busybox.  Cache: $BTVM_GUESTS or ~/.cache/btvm/guests.
set -e
W="${BTVM_GUESTS:-$HOME/.cache/btvm/guests}"
BB="$W/x/busybox-static/bin/busybox"
if [ -x "$BB" ]; then
    echo "$BB"
    exit 0
fi
mkdir -p "$W"/debs "$W"/x "$W"/lists/partial "$W"/cache/archives/partial
I386="-oAPT::Architecture=i386 -oAPT::Architectures::=i386 -oDir::State::Lists=$W/lists -oDir::Cache=$W/cache"
# shellcheck disable=SC2086
apt-get $I386 update -qq >&2 || true
# shellcheck disable=SC2086
(cd "$W/debs" && apt-get $I386 download busybox-static >&2)
DEB=$(ls -t "$W"/debs/busybox-static_*.deb | head -n 1)
rm -rf "$W/x/busybox-static"
mkdir -p "$W/x/busybox-static"
dpkg -x "$DEB" "$W/x/busybox-static"
if [ ! -x "$BB" ]; then
    echo "fetch_guests.sh: $DEB did not contain bin/busybox" >&2
    exit 1
fi
echo "$BB"
