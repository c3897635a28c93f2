#!/bin/sh
# Fetch unmodified Debian guest images into a cache folder (no root needed).
# Cache: $BTVM_GUESTS or ~/.cache/btvm/guests.
#
#   tools/fetch_guests.sh            fetch busybox-static (i386); print the path of its bin/busybox
#   tools/fetch_guests.sh all        also fetch the current i386 linux-image-686 kernel and
#   tools/fetch_guests.sh kernel     memtest86+; print one labelled path a line:
#                                      busybox=/.../bin/busybox
#                                      kernel=/.../boot/vmlinuz-<version>-686
#                                      memtest=/.../boot/memtest86+ia32.bin
#
# Versions are looked up in the package index each time (never hard-coded); a package
# already downloaded and unpacked under $W/x/<package> is not fetched again.
set -e
MODE="${1:-busybox}"
case "$MODE" in
    busybox|all|kernel) ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "usage: $0 [all|kernel]" >&2; exit 2 ;;
esac
W="${BTVM_GUESTS:-$HOME/.cache/btvm/guests}"
BB="$W/x/busybox-static/bin/busybox"
I386="-oAPT::Architecture=i386 -oAPT::Architectures::=i386 -oDir::State::Lists=$W/lists -oDir::Cache=$W/cache"

UPDATED=
apt_update() {
    [ -n "$UPDATED" ] && return 0
    mkdir -p "$W"/debs "$W"/x "$W"/lists/partial "$W"/cache/archives/partial
    # The security index may fail to sync: the main index suffices.
    # shellcheck disable=SC2086
    apt-get $I386 update -qq >&2 || true
    UPDATED=1
}

# fetch_pkg PACKAGE: download PACKAGE (i386 index) into $W/debs and unpack it into $W/x/PACKAGE.
fetch_pkg() {
    apt_update
    # shellcheck disable=SC2086
    (cd "$W/debs" && apt-get $I386 download "$1" >&2)
    DEB=$(ls -t "$W"/debs/"$1"_*.deb | head -n 1)
    rm -rf "$W/x/$1"
    mkdir -p "$W/x/$1"
    dpkg -x "$DEB" "$W/x/$1"
}

# --- busybox-static (the default mode prints its path alone) -------------------
if [ ! -x "$BB" ]; then
    fetch_pkg busybox-static
    if [ ! -x "$BB" ]; then
        echo "fetch_guests.sh: busybox-static did not contain bin/busybox" >&2
        exit 1
    fi
fi
if [ "$MODE" = busybox ]; then
    echo "$BB"
    exit 0
fi

# --- kernel: linux-image-686 is a metapackage; resolve the versioned package ----
apt_update
# shellcheck disable=SC2086
KPKG=$(apt-cache $I386 depends linux-image-686 2>/dev/null \
       | sed -n 's/^ *|\{0,1\}Depends: \(linux-image-[^ <>]*\).*/\1/p' | head -n 1)
if [ -z "$KPKG" ]; then
    echo "fetch_guests.sh: cannot resolve the package linux-image-686 depends on" >&2
    exit 1
fi
KERNEL=$(ls "$W/x/$KPKG"/boot/vmlinuz-* 2>/dev/null | head -n 1 || true)
if [ -z "$KERNEL" ]; then
    fetch_pkg "$KPKG"
    KERNEL=$(ls "$W/x/$KPKG"/boot/vmlinuz-* 2>/dev/null | head -n 1 || true)
fi
if [ -z "$KERNEL" ]; then
    echo "fetch_guests.sh: $KPKG did not contain boot/vmlinuz-*" >&2
    exit 1
fi

# --- memtest86+: the 32-bit image in bzImage format ----------------------------
find_memtest() {
    for f in "$W"/x/memtest86+/boot/mt86+_ia32.bin "$W"/x/memtest86+/boot/memtest86+ia32.bin \
             "$W"/x/memtest86+/boot/*ia32*.bin "$W"/x/memtest86+/boot/*32*.bin; do
        if [ -f "$f" ]; then echo "$f"; return 0; fi
    done
    return 0
}
MEMTEST=$(find_memtest)
if [ -z "$MEMTEST" ]; then
    fetch_pkg memtest86+
    MEMTEST=$(find_memtest)
fi
if [ -z "$MEMTEST" ]; then
    echo "fetch_guests.sh: memtest86+ did not contain a 32-bit boot/*.bin image" >&2
    exit 1
fi

echo "busybox=$BB"
echo "kernel=$KERNEL"
echo "memtest=$MEMTEST"
