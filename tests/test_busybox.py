"""Debian's busybox-static (i386) under `btvm run`, compared byte for byte with the same binary run natively.

Each script runs twice, natively and under btvm, in its own temporary folder holding the same fixed
inputs (created by `_prepare`), with the same environment; stdout, stderr and the exit status must be
identical. The applets are batched into a few `busybox sh -c` scripts so btvm's start-up and
translation cost is paid a few times only, and the btvm runs go through a 2-thread pool.
The binary comes from `tools/fetch_guests.sh` (CI fetches it); the module is skipped without it.
"""
import concurrent.futures as cf
import difflib
import os
import sys
from pathlib import Path
import subprocess

import pytest

ROOT = Path(__file__).resolve().parent.parent
BTVM = [sys.executable, "-m", "runtime.cli", "run"]
TIMEOUT = 300
GUESTS = Path(os.environ.get("BTVM_GUESTS", Path.home() / ".cache/btvm/guests"))
BUSYBOX = GUESTS / "x/busybox-static/bin/busybox"

pytestmark = pytest.mark.skipif(not BUSYBOX.is_file(),
                                reason=f"busybox-static not fetched: run tools/fetch_guests.sh ({BUSYBOX} absent)")

# The guests' environment (the host's locale/TZ/PATH must not leak in). PATH is set per session to a
# folder of applet links to busybox, so programs that exec others by name (tar's gzip helper, `sh -c`)
# run busybox in both runs, never a host (x86-64) program. btvm itself keeps the host environment
# (HOME, BTVM_CACHE_DIR: the persistent cache) and gets the guest's through --clean-env -E.
ENV = {"HOME": "/nonexistent", "LC_ALL": "C", "TZ": "UTC", "TERM": "dumb", "BBTEST": "value with  spaces"}

# Shell language: loops, functions, pipes, substitution, background jobs, signals, expansions.
# (`wait $!` after `kill` prints "Terminated" only if the child dies while ash waits; if ash reaped
# it earlier - a slower shell, as under btvm with a cold cache - it prints nothing: a race in the
# script, not a difference in behaviour, so that message is discarded.)
SHELL = r"""
i=0; while [ $i -lt 300 ]; do i=$((i+1)); done; echo "while: $i"
n=0; until [ $n -ge 3 ]; do n=$((n+1)); echo "until: $n"; done
for w in alpha "beta gamma" delta; do echo "for: [$w]"; done
for i in 1 2 3 4 5 6; do [ $i -eq 2 ] && continue; [ $i -eq 5 ] && break; echo "loop $i"; done
f() { echo "f($#): $*"; return 7; }; f a "b  c" d; echo "f rc=$?"
fact() { if [ $1 -le 1 ]; then echo 1; else echo $(( $1 * $(fact $(($1-1))) )); fi; }; echo "fact 10=$(fact 10)"
g() { local x=$1; x=$((x*x)); echo $x; }; x=keep; echo "g=$(g 12) x=$x"
s=$(echo hello | tr a-z A-Z); echo "subst=$s nested=$(echo $(echo in$(echo ner)))"; echo "backq=`echo bq`"
seq 1 10 | while read v; do echo $((v*v)); done | tail -n 3
printf 'b\na\nc\nb\n' | sort | uniq -c | sort -rn | head -n 1
echo "pipe status: $(false | true; echo $?) $(true | false; echo $?)"
(echo in-subshell; exit 4); echo "subshell rc=$?"
{ echo grouped; echo group2; } | wc -l
sleep 0.2 & p1=$!
(echo bg-two > bg2.txt; exit 6) & p2=$!
wait $p1; echo "wait p1=$?"; wait $p2; echo "wait p2=$?"; cat bg2.txt
for k in 1 2 3; do (echo "job $k" > job$k.txt) & done; wait; cat job1.txt job2.txt job3.txt
sleep 10 & kill -TERM $!; wait $! 2>/dev/null; echo "killed rc=$?"
trap 'echo trapped USR1' USR1; kill -USR1 $$; echo after-trap
case foo.txt in *.c) echo c;; *.txt) echo case-txt;; *) echo other;; esac
set -- x "y z" w; echo "argc=$# 2=[$2] all=$*"; shift; echo "after shift: $1"
v=abcdefabc; echo "${#v} ${v#ab} ${v##*b} ${v%bc} ${v%%c*} ${unset_v:-dflt} ${v:2:3} ${v/abc/X}"
echo "math: $((7/2)) $((7%3)) $((1<<10)) $((-7/2)) $((0x1f)) $((010)) $((3>2 && 1)) $((5^3)) $((~5))"
echo "env: [$BBTEST]"; X=1 sh -c 'echo "child sees X=$X"'; echo "X after=[${X}]"
[ -n "" ] || echo "test -n ok"; [ abc = abc ] && [ 3 -gt 2 ] && echo "test ok"; test -d . && echo dir-ok
if grep -q gamma /dev/null; then echo no; elif true; then echo elif-ok; fi
echo $(( $(echo 20) + 22 )); read a b <<EOF
first second third
EOF
echo "read: [$a] [$b]"
cat <<'EOF'
heredoc $not_expanded
EOF
nosuchcommand_xyz 2>&1; echo "127? $?"
sh -c 'exit 42'; echo "sh rc=$?"
eval 'echo eval $((1+1))'
exit 3
"""

# Text applets on fixed inputs: echo, printf, cat, sort, uniq, wc, head, tail, cut, tr.
TEXT = r"""
echo plain; echo -n "no newline|"; echo; echo -e 'tab\there\\back'; echo "$BBTEST"
printf '%s|%5d|%-5s|%x|%X|%o|%c|%%\n' str 42 ab 255 255 8 Z
printf '%.2f %8.3f %e %g %g %g %05.1f\n' 3.14159 -2.5 12345.678 0.0001 1e20 100 2.25
printf '%s\n' one two three; printf '%d-%d\n' 1 2 3 4
cat words.txt; cat -n data.csv | head -n 3; cat words.txt data.csv | wc -l
sort words.txt; sort -u words.txt; sort -r words.txt | head -n 2; sort -t, -k2 -n data.csv; sort -n nums.txt | tr '\n' ' '; echo
sort words.txt | uniq; sort words.txt | uniq -c; sort words.txt | uniq -d; sort words.txt | uniq -u
wc words.txt; wc -l < words.txt; wc -c data.csv; wc -w words.txt data.csv
head -n 3 words.txt; tail -n 2 words.txt; head -c 10 words.txt; echo; tail -c 6 words.txt; tail -n +8 words.txt
cut -d, -f1,3 data.csv; cut -c2-4 words.txt | head -n 4; cut -d, -f2 data.csv | paste -sd+ | sed 's/+/ + /g'
tr a-z A-Z < words.txt | head -n 3; tr -d aeiou < words.txt | head -n 3; tr -s ' ' < spaces.txt; echo abc | tr abc xyz
"""

# sed, grep, awk (floating point), expr, seq, checksums, error messages.
SCRIPT = r"""
sed -e 's/a/A/g' -e '/^b/d' words.txt; sed -n '2,4p' words.txt; sed 's/\([a-z]*\),\([0-9]*\),.*/\2-\1/' data.csv
sed -E 's/(an)+/<&>/g' words.txt | head -n 4; sed '1i header' nums.txt | head -n 2; sed '$!d' words.txt
grep -E '^(a|c)' words.txt; grep -c a words.txt; grep -n -v e words.txt; grep -i APPLE words.txt
grep -E 'x+y' words.txt; echo "grep rc=$?"; grep -o 'an' words.txt | wc -l; grep -E '[0-9]{3}' data.csv
awk -F, '{s+=$2} END{print s, s/NR, NR}' data.csv
awk 'BEGIN{printf "%.3f\n", 3.14159*2; print 10/3, -7/4, 1e300*10, -1e-5, 0.1+0.2, 1/3*3, 2*2*2*2*2*2*2*2*2*2, -2/8, int(7/3), -7.5-2}'
awk 'BEGIN{print int(-3.7), int(3.99), 123456789012, 9007199254740993, 1e6, 1e16, 0.000001; printf "%d %5.2e %i %s %g %G %.0f %.0f\n", 1e9, 123456, 3.99, 0.1+0.2, 1/7, 1e-10, 2.5, 3.5}'
awk 'BEGIN{x=1; for(i=1;i<=30;i++) x*=1.1; printf "%.15g %a\n", x, 0.75; print "3.5"+1, "1e3"*1, "0x10"+0, (0.1+0.2==0.3), (1.5<2)}'
awk 'BEGIN{x=0; for(i=1;i<=1000;i++) x+=1/i; printf "%.10f %.17g\n", x, x}'
awk '{print NR": "toupper($0), length($0)}' words.txt | head -n 4; awk -F, '$2>50{print $1}' data.csv
awk '{c[$1]++} END{n=0; for(k in c) n++; print n}' words.txt; awk 'BEGIN{s=sprintf("%c%c", 72, 105); print s, index("hello","l"), substr("hello",2,3), split("a:b:c",arr,":")}'
expr 3 + 4; expr 10 / 3; expr 10 % 3; expr length hello; expr substr hello 2 3; expr 5 \> 3; expr abc : 'a\(.*\)'
expr 1 = 2; echo "expr rc=$?"; expr 2 \* -21
seq 5; seq 2 3 11; seq -s, 1 5; seq 10 -3 1; seq 0.5 0.25 1.5; seq -w 8 11
md5sum words.txt data.csv; sha256sum words.txt; echo abc | md5sum; printf '' | sha256sum
cat nosuchfile; echo "cat rc=$?"; grep -E '(' words.txt; echo "bad re rc=$?"
"""

# ls of a tree with fixed modes and mtimes (the tree is also the input of ARCHIVE).
LS = r"""
mkdir -p t/d/sub t/d/empty
cp words.txt t/d/a.txt; cp data.csv t/d/b.csv; echo nested > t/d/sub/c.txt; : > t/d/zero
chmod 600 t/d/b.csv; chmod 755 t/d/sub; ln -s a.txt t/d/link
touch -d '2001-02-03 04:05:06' t/d/a.txt; touch -d '2010-10-10 10:10:10' t/d/b.csv
touch -d '1999-12-31 23:59:59' t/d/sub/c.txt t/d/zero t/d/sub t/d/empty
touch -h -d '2005-05-05 05:05:05' t/d/link 2>/dev/null; touch -d '2020-01-02 03:04:05' t/d t
ls -la t/d; ls -lan t/d/sub; ls -1 t/d; ls -lR t | head -n 20; ls -ld t/d/*.txt; ls nosuch; echo "ls rc=$?"
"""

# Checksums, gzip, tar, find.
ARCHIVE = r"""
md5sum big.bin; sha256sum big.bin t/d/a.txt
gzip -n -c words.txt; echo "|gz rc=$?"
gzip -n -c big.bin > big.gz; md5sum big.gz; gunzip -c big.gz | cmp - big.bin && echo "gunzip -c roundtrip ok"
gzip -n -9 -c big.bin | md5sum; gzip -n -1 -c big.bin | wc -c
cp big.bin b2; gzip -n b2; ls b2*; gunzip b2.gz; cmp b2 big.bin; echo "cmp rc=$?"; gunzip -c big.gz | md5sum
gzip -c -n words.txt | gunzip | md5sum; echo junk | gunzip; echo "bad gz rc=$?"
tar cf t.tar t/d/a.txt t/d/b.csv t/d/sub t/d/zero t/d/link; echo "tar c rc=$?"; md5sum t.tar
tar tf t.tar; tar tvf t.tar; tar czf - t/d/sub | gunzip | md5sum
mkdir x; tar xf t.tar -C x; cmp x/t/d/a.txt t/d/a.txt && echo "tar x ok"; ls -l x/t/d/b.csv
tar cf - t/d/sub/c.txt | tar tvf -
find t -type f | sort; find t -name '*.txt' | sort; find t -type d | sort; find t -newer t/d/a.txt -type f | sort
find t/d/sub; find t -size +1 -type f | sort; find t -empty | sort; find t -type l
"""

# date, od, cmp, dd.
MISC = r"""
date -u -d @0; date -u -d '2020-01-02 03:04:05'; date -u -d @1234567890 '+%Y-%m-%d %H:%M:%S %j %a %b %s %u %%'
date -u -d '2000-02-29 12:00:00' -R; date -u -d @2147483647; date -u -d @-86400 '+%F %T'
od -c words.txt | head -n 3; od -An -tx1 -N16 big.bin; od -tx4 -N32 big.bin; od -An -td2 -N12 big.bin; od -b -N8 data.csv
cmp words.txt words.txt; echo "cmp same=$?"; cmp words.txt data.csv; echo "cmp diff=$?"; printf 'banana\nApple\n' > w2; cmp -l words.txt w2; echo "cmp -l rc=$?"
dd if=big.bin bs=1k skip=3 count=5 status=none | md5sum; dd if=big.bin of=part.bin bs=512 count=7 status=none; wc -c part.bin
dd if=big.bin bs=4096 count=3 2>/dev/null | od -An -tx1 -N4 -j 4096; printf 'hello world' | dd bs=1 skip=6 status=none; echo
dd if=/dev/zero bs=1k count=4 status=none | md5sum; dd if=nosuch status=none; echo "dd rc=$?"
"""

# Ordered by cost (cold translation), most expensive first: the pool runs two at a time.
SCRIPTS = {"shell": SHELL, "script": SCRIPT, "archive": LS + ARCHIVE, "text": TEXT, "misc": MISC}

WORDS = ("banana\napple\ncherry\nbanana\ndate\napple\nelderberry\nfig\ngrape  fruit\nbanana\n"
         "kiwi\nlemon\nmango\napple\n")
DATA = "".join(f"{n},{v},{c}\n" for n, v, c in [
    ("alpha", 17, "x"), ("bravo", 93, "y"), ("charlie", 5, "x"), ("delta", 250, "z"),
    ("echo", 61, "y"), ("foxtrot", 42, "x"), ("golf", 7, "z"), ("hotel", 128, "x")])
NUMS = "\n".join(str(v) for v in (10, -3, 7, 100, 0, 42, -17, 3, 8, 1000)) + "\n"
SPACES = "a  b   c    d\n   leading and trailing   \n"


def _big():
    """256 KiB of fixed bytes: an LCG stream mixed with text runs, so gzip both matches and literals."""
    out = bytearray()
    x = 12345
    while len(out) < 256 * 1024:
        x = (1103515245 * x + 12345) & 0x7FFFFFFF
        if x % 5 == 0:
            out += WORDS.encode()[x % 50: x % 50 + 40]
        else:
            out += x.to_bytes(4, "little")[:(x >> 8) % 4 + 1]
    return bytes(out[:256 * 1024])


def _prepare(d):
    d.mkdir(parents=True)
    (d / "words.txt").write_text(WORDS)
    (d / "data.csv").write_text(DATA)
    (d / "nums.txt").write_text(NUMS)
    (d / "spaces.txt").write_text(SPACES)
    (d / "big.bin").write_bytes(_big())
    return d


def _run(cmd, cwd, env):
    p = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, env=env, cwd=cwd, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


def _applet_path(d):
    """A folder with a link named after every applet, pointing at busybox: the guests' PATH."""
    d.mkdir()
    names = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, check=True, text=True).stdout.split()
    for name in names:
        (d / name).symlink_to(BUSYBOX)
    return str(d)


def _run_native(script, cwd, env):
    return _run([str(BUSYBOX), "sh", "-c", script], cwd, env)


def _run_btvm(script, cwd, env):
    host_env = dict(os.environ)
    host_env.pop("PYTHONWARNINGS", None)
    guest_env = [a for k, v in env.items() for a in ("-E", f"{k}={v}")]
    return _run(BTVM + ["--clean-env"] + guest_env + ["--", str(BUSYBOX), "sh", "-c", script], cwd, host_env)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{script name: (native (rc, out, err), btvm (rc, out, err))}; btvm runs 2 at a time."""
    base = tmp_path_factory.mktemp("busybox")
    env = dict(ENV, PATH=_applet_path(base / "bin"))
    native = {name: _run_native(s, _prepare(base / "native" / name), env) for name, s in SCRIPTS.items()}
    with cf.ThreadPoolExecutor(2) as ex:
        emu = {name: ex.submit(_run_btvm, s, _prepare(base / "btvm" / name), env) for name, s in SCRIPTS.items()}
        return {name: (native[name], emu[name].result()) for name in SCRIPTS}


def _diff(what, a, b):
    lines = difflib.unified_diff(a.decode("latin-1").splitlines(), b.decode("latin-1").splitlines(),
                                 f"native {what}", f"btvm {what}", lineterm="", n=1)
    return "\n".join(list(lines)[:60])


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_busybox_script_matches_native(results, name):
    (nrc, nout, nerr), (erc, eout, eerr) = results[name]
    assert eerr == nerr, "stderr differs\n" + _diff("stderr", nerr, eerr)
    assert eout == nout, "stdout differs\n" + _diff("stdout", nout, eout)
    assert erc == nrc, f"exit status differs: native {nrc}, btvm {erc}"


def test_native_outputs_are_meaningful(results):
    """Guard against a script that silently stopped early: native output covers every section."""
    (rc, out, err), _ = results["shell"]
    assert rc == 3 and b"killed rc=143" in out and b"trapped USR1" in out and b"wait p2=6" in out
    (rc, out, err), _ = results["script"]
    assert b"6.283\n" in out and b"can't open 'nosuchfile'" in err
    (rc, out, err), _ = results["archive"]
    assert b"gunzip -c roundtrip ok" in out and b"tar x ok" in out and b" t/d/sub/c.txt\n" in out
    (rc, out, err), _ = results["misc"]
    assert b"Thu Jan  1 00:00:00 UTC 1970" in out and b"dd rc=1" in out
    (rc, out, err), _ = results["text"]
    assert b"grape  fruit" in out and b"1-2\n3-4\n" in out


def test_guest_sees_no_descriptor_of_btvm(tmp_path):
    """btvm's own files (the disk cache's index log) never hold a descriptor while the guest runs:
    the guest shares the process's fd table, so a held descriptor showed up in /proc/self/fd, moved
    the guest's first open() from 3 to 4, and a guest dup2 onto it sent btvm's index records into
    the guest's file (a corrupt tar archive)."""
    script = "ls /proc/self/fd; exec 3>f3; ls /proc/self/fd"
    native = _run_native(script, tmp_path, ENV)
    cache = tmp_path / "cache"          # an empty persistent cache: this run stores batches
    host_env = dict(os.environ, BTVM_CACHE_DIR=str(cache))
    host_env.pop("BTVM_NO_CACHE", None)
    emu = _run(BTVM + ["--clean-env"] + [a for k, v in ENV.items() for a in ("-E", f"{k}={v}")] +
               ["--", str(BUSYBOX), "sh", "-c", script], tmp_path, host_env)
    assert list(cache.rglob("*.log")) or list(cache.rglob("*.stl")), "the run stored nothing: the test checks nothing"
    assert emu == native
