#!/usr/bin/env bash
# check_runtime_libs.sh [--exact] PREFIX [DOCKERFILE]
#
# Proves the runtime stage of deploy/docker/Dockerfile installs every shared library the
# installed binaries load, without a container engine: runs ldd on every ELF file under PREFIX
# (a `cmake --install build --prefix PREFIX` staging tree), maps each resolved library to the
# Debian package that owns it (dpkg -S), and fails unless that package is in the runtime
# stage's `apt-get install` line (libc6, libstdc++6 and libgcc-s1 come with debian:bookworm-slim).
# A library under PREFIX itself ships with the binaries and is fine; a library that is not
# found, or that no package owns, fails. --exact: a listed package that no binary loads fails
# too (the image carries nothing the binaries never load; run.sh uses it on the real install).
#
# Run on the build machine (bookworm, the same packages as the image's build stage).
# Last line: "N passed, M failed"; exit status 0 only when nothing failed.
set -euo pipefail

exact=0
if [[ "${1:-}" == --exact ]]; then
  exact=1
  shift
fi
if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 [--exact] PREFIX [DOCKERFILE]" >&2
  exit 2
fi
prefix="$(cd "$1" && pwd)"
here="$(cd "$(dirname "$0")" && pwd)"
dockerfile="${2:-$here/../../deploy/docker/Dockerfile}"
base_packages=(libc6 libstdc++6 libgcc-s1)

# The runtime stage: from `FROM debian:bookworm-slim AS runtime` to the next FROM. Its RUN
# lines are joined (backslash continuations) and the words after `apt-get install` up to the
# next shell operator, options excluded, are the package list.
runtime_packages() {
  awk '
    /^[[:space:]]*FROM[[:space:]]/ { in_runtime = (tolower($0) ~ /[[:space:]]as[[:space:]]+runtime[[:space:]]*$/) }
    in_runtime { print }
  ' "$1" | sed -e ':a' -e '/\\$/N; s/\\\n/ /; ta' | grep -E 'apt-get[[:space:]]+install' |
    sed -E 's/.*apt-get[[:space:]]+install//; s/(&&|;|\|).*//' | tr -s '[:space:]' '\n' |
    grep -vE '^(-.*)?$' | sort -u
}

mapfile -t listed < <(runtime_packages "$dockerfile")
if [[ ${#listed[@]} -eq 0 ]]; then
  echo "FAIL no apt-get install line in the runtime stage of $dockerfile"
  echo "0 passed, 1 failed"
  exit 1
fi
echo "runtime packages in $dockerfile: ${listed[*]}"
declare -A allowed=()
for p in "${listed[@]}" "${base_packages[@]}"; do allowed[$p]=1; done
declare -A used=()

# The package owning a library path. ldd prints /lib/... paths; on a merged-/usr system dpkg
# may know the file as /usr/lib/... (or the other way round), and the path may be a symlink.
package_of() {
  local path="$1" candidate out
  local real
  real="$(readlink -f "$path")"
  for candidate in "$path" "$real" "/usr${path}" "${path#/usr}" "/usr${real}" "${real#/usr}"; do
    [[ "$candidate" == /* ]] || continue
    if out="$(dpkg -S "$candidate" 2>/dev/null)"; then
      # "pkg:arch: /path" or "pkg1, pkg2: /path" (diversions); take the first package.
      out="${out%%: *}"
      out="${out%%,*}"
      echo "${out%%:*}"
      return 0
    fi
  done
  return 1
}

is_elf() { [[ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' \n')" == '177ELF' ]]; }

passed=0
failed=0
elf_count=0
while IFS= read -r -d '' file; do
  is_elf "$file" || continue
  elf_count=$((elf_count + 1))
  name="${file#"$prefix"/}"
  if ! out="$(ldd "$file" 2>&1)"; then
    if grep -q 'not a dynamic executable' <<<"$out"; then
      echo "note $name: statically linked, nothing to check"
      passed=$((passed + 1))
      continue
    fi
    echo "FAIL $name: ldd failed: $out"
    failed=$((failed + 1))
    continue
  fi
  problems=()
  while IFS= read -r line; do
    # "libfoo.so.1 => /path/libfoo.so.1 (0x...)", "libbar.so => not found", "/lib64/ld-linux..."
    if [[ "$line" =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+=\>[[:space:]]+not[[:space:]]found ]]; then
      problems+=("${BASH_REMATCH[1]} not found")
      continue
    fi
    if [[ "$line" =~ =\>[[:space:]]+(/[^[:space:]]+) ]]; then
      lib="${BASH_REMATCH[1]}"
    elif [[ "$line" =~ ^[[:space:]]*(/[^[:space:]]+)[[:space:]]+\( ]]; then
      lib="${BASH_REMATCH[1]}"   # the dynamic loader
    else
      continue                   # linux-vdso: no file
    fi
    if [[ "$(readlink -f "$lib")" == "$prefix"/* || "$lib" == "$prefix"/* ]]; then
      continue                   # ships with the binaries
    fi
    if ! package="$(package_of "$lib")"; then
      problems+=("$lib belongs to no Debian package")
      continue
    fi
    used[$package]=1
    if [[ -z "${allowed[$package]:-}" ]]; then
      problems+=("$lib is in package $package, which the runtime stage does not install")
    fi
  done <<<"$out"
  if [[ ${#problems[@]} -eq 0 ]]; then
    echo "ok   $name: every library is in the runtime package set"
    passed=$((passed + 1))
  else
    echo "FAIL $name:"
    printf '       %s\n' "${problems[@]}"
    failed=$((failed + 1))
  fi
done < <(find -L "$prefix" -type f -print0 | sort -z)

if [[ $elf_count -eq 0 ]]; then
  echo "FAIL no ELF binary under $prefix"
  failed=$((failed + 1))
fi
unused=()
for p in "${listed[@]}"; do [[ -n "${used[$p]:-}" ]] || unused+=("$p"); done
if [[ ${#unused[@]} -gt 0 && $exact -eq 1 ]]; then
  echo "FAIL the runtime stage installs packages these binaries never load: ${unused[*]}"
  failed=$((failed + 1))
elif [[ ${#unused[@]} -gt 0 ]]; then
  echo "note listed but not loaded by these binaries: ${unused[*]}"
elif [[ $exact -eq 1 ]]; then
  echo "ok   every package the runtime stage installs is loaded by these binaries"
  passed=$((passed + 1))
fi
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
