#!/usr/bin/env python3
"""Build a busybox initramfs (cpio "newc", gzip) in pure Python.

The archive holds:
  /bin/busybox        the static i386 busybox (tools/fetch_guests.sh fetches Debian's)
  /bin/sh -> busybox
  /dev /proc /sys     empty directories
  /init               a shell script: installs the applets, mounts proc, sysfs and
                      devtmpfs, prints the marker line BTVM-INIT-OK, runs /script.sh
                      (given with --script) or else an interactive shell, then
                      `busybox poweroff -f`
  /script.sh          only with --script

Usage:
  tools/make_initramfs.py [--busybox PATH] [--script FILE] [-o OUT]
  tools/make_initramfs.py --list ARCHIVE      # print the entries of an archive

The output is reproducible: every mtime is 0 and the gzip header carries no time.
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import stat
import subprocess
import sys

MARKER = "BTVM-INIT-OK"

INIT_SCRIPT = """#!/bin/sh
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo {marker}
if [ -f /script.sh ]; then
    sh /script.sh
    echo "BTVM-SCRIPT-EXIT $?"
elif [ -x /bin/cttyhack ]; then
    setsid cttyhack sh
else
    sh
fi
busybox poweroff -f
""".format(marker=MARKER)

HERE = os.path.dirname(os.path.abspath(__file__))


def default_out() -> str:
    base = os.environ.get("BTVM_GUESTS") or os.path.join(
        os.path.expanduser("~"), ".cache", "btvm", "guests")
    return os.path.join(base, "initramfs.cpio.gz")


def default_busybox() -> str:
    out = subprocess.run(["sh", os.path.join(HERE, "fetch_guests.sh")],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    lines = [l for l in out.splitlines() if l.strip()]
    if not lines:
        raise SystemExit("make_initramfs.py: tools/fetch_guests.sh printed no path")
    return lines[-1].strip()


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class NewcWriter:
    """Writes a cpio archive in the SVR4 "newc" format (magic 070701, no CRC)."""

    def __init__(self, out):
        self.out = out
        self.ino = 0x300000  # arbitrary start; each entry gets its own inode

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        self.ino += 1
        name_b = name.encode() + b"\0"
        fields = (
            self.ino,     # c_ino
            mode,         # c_mode
            0, 0,         # c_uid, c_gid
            nlink,        # c_nlink
            0,            # c_mtime
            len(data),    # c_filesize
            0, 0,         # c_devmajor, c_devminor
            0, 0,         # c_rdevmajor, c_rdevminor
            len(name_b),  # c_namesize (with the NUL)
            0,            # c_check
        )
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        assert len(hdr) == 110
        self.out.write(hdr + name_b + _pad4(110 + len(name_b)))
        self.out.write(data + _pad4(len(data)))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def trailer(self) -> None:
        self.ino = -1  # the trailer has inode 0
        self._entry("TRAILER!!!", 0, nlink=1)


def build(busybox: bytes, script: bytes | None = None) -> bytes:
    """Return the uncompressed newc archive."""
    buf = io.BytesIO()
    w = NewcWriter(buf)
    for d in ("bin", "dev", "proc", "sys"):
        w.dir(d)
    w.file("bin/busybox", busybox, 0o755)
    w.symlink("bin/sh", "busybox")
    w.file("init", INIT_SCRIPT.encode(), 0o755)
    if script is not None:
        w.file("script.sh", script, 0o755)
    w.trailer()
    return buf.getvalue()


def read_newc(raw: bytes):
    """Yield (name, mode, data) for each entry of an uncompressed newc archive."""
    pos = 0
    while True:
        hdr = raw[pos:pos + 110]
        if len(hdr) < 110 or hdr[:6] != b"070701":
            raise ValueError("bad newc header at offset %d" % pos)
        f = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        pos += 110
        name = raw[pos:pos + namesize - 1].decode()
        pos += namesize + (-(110 + namesize) % 4)
        data = raw[pos:pos + size]
        pos += size + (-size % 4)
        if name == "TRAILER!!!":
            return
        yield name, mode, data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--busybox", help="static i386 busybox (default: tools/fetch_guests.sh)")
    ap.add_argument("--script", help="shell script to embed as /script.sh and run after boot")
    ap.add_argument("-o", "--output", help="output file (default: %s)" % default_out())
    ap.add_argument("--list", metavar="ARCHIVE", help="list the entries of a .cpio.gz and exit")
    args = ap.parse_args(argv)

    if args.list:
        with gzip.open(args.list, "rb") as f:
            raw = f.read()
        for name, mode, data in read_newc(raw):
            extra = (" -> " + data.decode()) if stat.S_ISLNK(mode) else ""
            print("%s %8d %s%s" % (stat.filemode(mode), len(data), name, extra))
        return 0

    bb_path = args.busybox or default_busybox()
    with open(bb_path, "rb") as f:
        busybox = f.read()
    if busybox[:4] != b"\x7fELF":
        raise SystemExit("make_initramfs.py: %s is not an ELF binary" % bb_path)
    script = None
    if args.script:
        with open(args.script, "rb") as f:
            script = f.read()

    out = args.output or default_out()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    raw = build(busybox, script)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
            gz.write(raw)
    os.replace(tmp, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
