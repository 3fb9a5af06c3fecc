#!/usr/bin/env bash
# Exercise the Windows C on Linux: cross-compile native/windows with
# mingw-w64 (-Wall -Wextra -Werror, so the WHP layout asserts run too) and
# run the self-test driver under wine, once in full and once per WHP probe
# branch. Exit status 0 = every check passed; 77 = a tool is missing and
# this run may not install it; anything else = a failure.
#
#   native/windows/ci.sh [--install | --no-install] [--out DIR]
#
# --install (or CI set in the environment, as root): apt-get the missing
# Debian packages first. --no-install: never (what the pytest self-test uses).
# The wine prefix is private and temporary; the build goes to --out
# (default native/windows/out, git-ignored).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=$HERE/out
INSTALL=auto
while [ $# -gt 0 ]; do
    case $1 in
        --install) INSTALL=yes ;;
        --no-install) INSTALL=no ;;
        --out) OUT=$2; shift ;;
        *) echo "ci.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

CC=x86_64-w64-mingw32-gcc
PACKAGES="gcc-mingw-w64-x86-64 wine wine64"
# First wine start builds a prefix: slow on a cold CI runner, so be generous.
WINE_TIMEOUT=${SNAPPROOF_WINE_TIMEOUT:-600}

missing_tools() {
    local t
    for t in "$CC" wine wineserver; do
        command -v "$t" >/dev/null 2>&1 || echo "$t"
    done
}

if [ -n "$(missing_tools)" ]; then
    if [ "$INSTALL" = yes ] || { [ "$INSTALL" = auto ] && [ -n "${CI:-}" ]; }; then
        if [ "$(id -u)" != 0 ]; then
            echo "ci.sh: missing $(missing_tools | tr '\n' ' ')and not root: cannot apt-get install $PACKAGES" >&2
            exit 77
        fi
        echo "ci.sh: installing $PACKAGES"
        export DEBIAN_FRONTEND=noninteractive
        timeout 600 apt-get update -qq
        timeout 1200 apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
    fi
fi
if [ -n "$(missing_tools)" ]; then
    echo "ci.sh: missing $(missing_tools | tr '\n' ' ')(Debian: apt-get install $PACKAGES)" >&2
    exit 77
fi

mkdir -p "$OUT"
echo "ci.sh: building $OUT/selftest.exe with $("$CC" --version | head -n 1)"
# -static: no mingw runtime DLLs to find under wine or on a Windows box.
"$CC" -std=c11 -O2 -Wall -Wextra -Werror -municode -static -I"$HERE" \
    -o "$OUT/selftest.exe" \
    "$HERE/selftest.c" "$HERE/common.c" "$HERE/file_view.c" "$HERE/whp_vm.c" "$HERE/cow.c" -lpsapi
# Stand-in WinHvPlatform.dll files: wine has none, so these reach the probe's other branches.
for mode in 1 2 3 4 5 6 7; do
    "$CC" -std=c11 -O2 -Wall -Wextra -Werror -shared -static -I"$HERE" -DSP_FAKE_MODE=$mode \
        -o "$OUT/fake_whp_$mode.dll" "$HERE/fake_whp.c"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/snapproof-wine.XXXXXX")
export WINEPREFIX=$WORK/prefix
export WINEDEBUG=-all
# No Mono/Gecko install prompts: they would wait for a click that never comes.
export WINEDLLOVERRIDES="mscoree=;mshtml="
unset DISPLAY
cleanup() {
    # Stop this prefix's wineserver (and only it), then drop the prefix.
    timeout 30 wineserver -k >/dev/null 2>&1 || true
    timeout 30 wineserver -w >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "ci.sh: starting wine (private prefix $WINEPREFIX)"
if ! timeout -k 10 "$WINE_TIMEOUT" wineboot --init >"$WORK/wineboot.log" 2>&1; then
    echo "ci.sh: wineboot --init failed or timed out after ${WINE_TIMEOUT}s:" >&2
    cat "$WORK/wineboot.log" >&2
    exit 1
fi

run_selftest() {
    local rc=0
    timeout -k 10 "$WINE_TIMEOUT" wine "$OUT/selftest.exe" "$@" || rc=$?
    if [ $rc -eq 124 ]; then
        echo "ci.sh: selftest.exe${*:+ $*} timed out after ${WINE_TIMEOUT}s" >&2
    fi
    echo "ci.sh: selftest.exe${*:+ $*} exit status $rc"
    return $rc
}

status=0
# The full run: file views, the read-only control, and WHP absent because the DLL is missing.
run_selftest || status=1

# The probe's other branches, in enum sp_whp_probe's order: stand-in mode -> the probe result it must give
# (2 no export, 3 capability failed, 4 not present, 5 create failed, 6 property failed, 7 setup failed).
SYSTEM32=$WINEPREFIX/drive_c/windows/system32
for pair in 1:2 2:3 3:4 5:5 6:6 7:7; do
    mode=${pair%%:*}
    echo "ci.sh: stand-in WinHvPlatform.dll, mode $mode"
    cp "$OUT/fake_whp_$mode.dll" "$SYSTEM32/WinHvPlatform.dll"
    run_selftest --probe "${pair##*:}" || status=1
    rm -f "$SYSTEM32/WinHvPlatform.dll"
done
# Mode 4 reports WHP present and interprets the guests: the WHP half of selftest.exe runs against
# whp_vm.c and cow.c for real (the rules, partitions in turn, run loop, watchdog, cancel, the write
# exit, the copy-on-write load, the read-only control).
echo "ci.sh: stand-in WinHvPlatform.dll, mode 4 (a toy partition, not a hypervisor)"
cp "$OUT/fake_whp_4.dll" "$SYSTEM32/WinHvPlatform.dll"
run_selftest || status=1
rm -f "$SYSTEM32/WinHvPlatform.dll"
echo "ci.sh: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
