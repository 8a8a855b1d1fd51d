#!/bin/sh
# collect-rootfs.sh DEST BINARY...
#
# Builds in DEST the whole root file system of the image's `minimal` stage (FROM scratch): the
# BINARYs in /usr/bin, exactly the shared libraries they load (ldd: direct and indirect, each at
# the path the loader resolved, as a regular file), the dynamic loader, the Debian copyright file
# of each library's package (/usr/share/doc/PACKAGE/copyright: the LGPL/GPL libraries' licences
# travel with them), passwd/group entries for the non-root user 65532, /tmp (1777) and
# /run/hsm-agent (65532, 0755). No shell, no package manager, nothing else.
#
# Runs in the Dockerfile's `rootfs` stage (FROM runtime, the Debian image that has the packages)
# and, without a container engine, in tests/deploy/check_minimal_rootfs.sh on a staging install.
# POSIX sh (dash in Debian images). Exit status non-zero, with a message, on any failure.
set -eu

if [ "$#" -lt 2 ]; then
  echo "usage: $0 DEST BINARY..." >&2
  exit 2
fi
dest="$1"
shift

mkdir -p "$dest/usr/bin" "$dest/etc" "$dest/tmp" "$dest/run/hsm-agent" "$dest/usr/share/doc"
chmod 1777 "$dest/tmp"
chmod 0755 "$dest/run/hsm-agent"
# Owned by the agent's user, as in the runtime stage (needs root, as a build stage has).
chown 65532:65532 "$dest/run/hsm-agent" 2>/dev/null || echo "note: could not chown /run/hsm-agent (not root)" >&2
printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' \
  >"$dest/etc/passwd"
printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' >"$dest/etc/group"

for bin in "$@"; do
  cp "$bin" "$dest/usr/bin/"
  chmod 0755 "$dest/usr/bin/$(basename "$bin")"
done

# "libfoo.so.1 => /path (0x...)" and the loader "/lib64/ld-linux-x86-64.so.2 (0x...)"; ldd
# prints a "BINARY:" header per file when given several.
libs="$(ldd "$@" | awk '
  /=> not found/ { print "NOT-FOUND " $1; next }
  $2 == "=>" && $3 ~ /^\// { print $3; next }
  $1 ~ /^\// && $2 ~ /^\(0x/ { print $1 }' | sort -u)"
case "$libs" in
  *NOT-FOUND*)
    echo "collect-rootfs: a library is not found: $(echo "$libs" | grep NOT-FOUND | tr '\n' ' ')" >&2
    exit 1
    ;;
esac
[ -n "$libs" ] || { echo "collect-rootfs: ldd found no library for $*" >&2; exit 1; }

# The Debian package owning a library: dpkg may know the file under /lib or /usr/lib (merged
# /usr), by the path ldd printed or the file it points to. One dpkg-query for every candidate
# path (it is slow per call); its lines are "package[:arch][, package...]: /path".
candidates() {
  real="$(readlink -f "$1")"
  for c in "$1" "$real" "/usr$1" "${1#/usr}" "/usr$real" "${real#/usr}"; do
    case "$c" in /*) echo "$c" ;; esac
  done
}
owners="$(for lib in $libs; do candidates "$lib"; done | sort -u | xargs dpkg-query -S 2>/dev/null || true)"
package_of() {
  for c in $(candidates "$1"); do
    pkg="$(echo "$owners" | awk -v path="$c" '{ i = index($0, ": "); if (substr($0, i + 2) == path) { print substr($0, 1, i - 1); exit } }')"
    if [ -n "$pkg" ]; then
      echo "$pkg" | sed -e 's/[:,].*//'
      return 0
    fi
  done
  return 1
}

for lib in $libs; do
  mkdir -p "$dest$(dirname "$lib")"
  cp -L "$lib" "$dest$lib"
  pkg="$(package_of "$lib")" || { echo "collect-rootfs: no Debian package owns $lib" >&2; exit 1; }
  if [ -f "/usr/share/doc/$pkg/copyright" ]; then
    mkdir -p "$dest/usr/share/doc/$pkg"
    cp "/usr/share/doc/$pkg/copyright" "$dest/usr/share/doc/$pkg/copyright"
  fi
  echo "$lib $pkg"
done
