#!/usr/bin/env bash
# Consumer project test (ctest "consumer_project"): what an application team does with the
# installed client library, end to end.
#   1. cmake --install <build> --component client --prefix <tmp>/prefix  (the client alone)
#   2. the installed tree holds the headers, libhsm_client.so/.a, the CMake package and
#      hsm-client.pc, and no header of msgpack, libuv, prometheus-cpp or PKCS#11 is reachable
#   3. tests/consumer/project (find_package(hsm_client CONFIG)) builds the example against it,
#      linked shared and static; the same example is built with pkg-config alone, shared
#      (hsm-client) and static (hsm-client-static, no libhsm_client.so), and from source with
#      add_subdirectory (tests/consumer/subdirectory: the client alone, no agent dependency);
#      <hsm/client.hpp> compiled as C++17 stops at its #error saying C++20 is needed
#   4. a real hsm-agent on a throwaway SoftHSMv2 token; each binary issues a JWT in the HSM and
#      verifies it offline against the JWKS; the JWT is also checked with the openssl CLI
#
#   run.sh --build-dir B --source-dir S --agent PATH [--cxx C] [--cxx-flags F] [--link-flags L]
set -euo pipefail

build="" source="" agent="" cxx="c++" cxx_flags="" link_flags=""
while (($#)); do
  case "$1" in
    --build-dir) build=$2; shift 2 ;;
    --source-dir) source=$2; shift 2 ;;
    --agent) agent=$2; shift 2 ;;
    --cxx) cxx=$2; shift 2 ;;
    --cxx-flags) cxx_flags=$2; shift 2 ;;
    --link-flags) link_flags=$2; shift 2 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -n $build && -n $source && -x $agent ]] || { echo "run.sh: --build-dir, --source-dir and --agent are required" >&2; exit 2; }

tmp=$(mktemp -d /tmp/hsm-consumer.XXXXXX)
agent_pid=""
cleanup() {
  if [[ -n $agent_pid ]]; then kill "$agent_pid" 2>/dev/null || true; wait "$agent_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
passed=0 failed=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
step() { printf '\n---- %s\n' "$*"; }

step "install the client component into $tmp/prefix"
cmake --install "$build" --component client --prefix "$tmp/prefix" >"$tmp/install.log"
prefix=$tmp/prefix
pc=$(find "$prefix" -name hsm-client.pc)
config=$(find "$prefix" -name hsm_clientConfig.cmake)
pc_static=$(find "$prefix" -name hsm-client-static.pc)
for file in "$prefix/include/hsm/client.hpp" "$prefix/include/hsm/jose.hpp" "$pc" "$pc_static" "$config"; do
  if [[ -f $file ]]; then pass "installed ${file#"$prefix"/}"; else fail "missing $file"; fi
done
libdir=$(dirname "$(dirname "$pc")")
for lib in libhsm_client.so libhsm_client.a; do
  if [[ -e $libdir/$lib ]]; then pass "installed ${libdir#"$prefix"/}/$lib"; else fail "missing $lib"; fi
done
# Self-contained: the installed headers include nothing of the agent's dependencies, and the
# client component installs no other header.
if grep -REq '#include <(msgpack|uv|prometheus|p11-kit|pkcs11|nlohmann|openssl)' "$prefix/include"; then
  fail "an installed header includes a private dependency"
else
  pass "installed headers include only the standard library and each other"
fi
extra=$(find "$prefix/include" -type f ! -path '*/hsm/client.hpp' ! -path '*/hsm/jose.hpp')
if [[ -z $extra ]]; then pass "only hsm/client.hpp and hsm/jose.hpp installed"; else fail "unexpected headers: $extra"; fi

mkdir -p "$tmp/src"
cp "$source/tests/consumer/project/CMakeLists.txt" "$source/client/examples/issue_jwt.cpp" "$tmp/src/"

step "build the consumer with find_package(hsm_client CONFIG)"
if cmake -S "$tmp/src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_CXX_COMPILER="$cxx" \
    -DCMAKE_CXX_FLAGS="$cxx_flags" -DCMAKE_EXE_LINKER_FLAGS="$link_flags" >"$tmp/configure.log" 2>&1 &&
   cmake --build "$tmp/build" -j2 >"$tmp/build.log" 2>&1; then
  pass "find_package consumer configured and built (shared and static)"
else
  cat "$tmp/configure.log" "$tmp/build.log" 2>/dev/null | tail -40
  fail "find_package consumer did not build"
fi
# The static binary must not need libhsm_client.so.
if [[ -x $tmp/build/issue_jwt_static ]] && ! ldd "$tmp/build/issue_jwt_static" | grep -q hsm_client; then
  pass "issue_jwt_static has the client linked in"
else
  fail "issue_jwt_static missing or linked to libhsm_client.so"
fi

step "build the example with pkg-config alone"
export PKG_CONFIG_PATH="$(dirname "$pc")"
# shellcheck disable=SC2046,SC2086  # pkg-config output is a list of flags
if "$cxx" -std=c++20 $cxx_flags "$tmp/src/issue_jwt.cpp" -o "$tmp/issue_jwt_pkgconfig" \
    $(pkg-config --cflags --libs hsm-client) \
    -Wl,-rpath,"$(pkg-config --variable=libdir hsm-client)" $link_flags 2>"$tmp/pc-build.log"; then
  pass "pkg-config consumer built ($(pkg-config --modversion hsm-client))"
else
  cat "$tmp/pc-build.log" | tail -40
  fail "pkg-config consumer did not build"
fi

step "build the example with pkg-config --static (hsm-client-static)"
static_libs=$(pkg-config --static --libs hsm-client-static)
if [[ $static_libs == *libhsm_client.a* && $static_libs != *-lhsm_client* ]]; then
  pass "pkg-config --static --libs hsm-client-static names the archive: $static_libs"
else
  fail "pkg-config --static --libs hsm-client-static: $static_libs"
fi
# shellcheck disable=SC2046,SC2086  # pkg-config output is a list of flags
if "$cxx" -std=c++20 $cxx_flags "$tmp/src/issue_jwt.cpp" -o "$tmp/issue_jwt_pkgconfig_static" \
    $(pkg-config --static --cflags --libs hsm-client-static) $link_flags 2>"$tmp/pc-static-build.log" &&
   ! ldd "$tmp/issue_jwt_pkgconfig_static" | grep -q hsm_client; then
  pass "pkg-config static consumer built, without libhsm_client.so"
else
  tail -40 "$tmp/pc-static-build.log"
  fail "pkg-config static consumer did not build, or links libhsm_client.so"
fi

step "build the example with add_subdirectory(<hsm-sidecar source>) (the client alone)"
mkdir -p "$tmp/subdir-src"
cp "$source/tests/consumer/subdirectory/CMakeLists.txt" "$source/client/examples/issue_jwt.cpp" "$tmp/subdir-src/"
# Release without -g: ccache can share the objects between runs.
if cmake -S "$tmp/subdir-src" -B "$tmp/subdir-build" -DCMAKE_BUILD_TYPE=Release \
    -DHSM_SIDECAR_SOURCE_DIR="$source" -DCMAKE_CXX_COMPILER="$cxx" \
    -DCMAKE_CXX_FLAGS="$cxx_flags" -DCMAKE_EXE_LINKER_FLAGS="$link_flags" \
    -DCMAKE_CXX_COMPILER_LAUNCHER="$(command -v ccache || true)" >"$tmp/subdir-configure.log" 2>&1 &&
   cmake --build "$tmp/subdir-build" -j2 >"$tmp/subdir-build.log" 2>&1; then
  pass "add_subdirectory consumer configured and built"
else
  tail -40 "$tmp/subdir-configure.log" "$tmp/subdir-build.log" 2>/dev/null
  fail "add_subdirectory consumer did not build"
fi
if grep -Eq '^(CLI11_DIR|prometheus-cpp_DIR|spdlog_DIR|yaml-cpp_DIR|UV_[A-Z_]+|P11KIT_[A-Z_]+|Catch2_DIR)[:=]' \
    "$tmp/subdir-build/CMakeCache.txt"; then
  fail "the add_subdirectory build looked for an agent or hsmctl dependency"
else
  pass "the add_subdirectory build found only the client's dependencies"
fi

step "compile <hsm/client.hpp> as C++17"
printf '#include <hsm/client.hpp>\nint main() {}\n' >"$tmp/cxx17.cpp"
if "$cxx" -std=c++17 -fsyntax-only -I"$prefix/include" "$tmp/cxx17.cpp" >"$tmp/cxx17.log" 2>&1; then
  fail "a C++17 compile of hsm/client.hpp succeeded"
elif head -3 "$tmp/cxx17.log" | grep -q 'requires C++20'; then
  pass "a C++17 compile stops first at: $(grep -m1 -o 'hsm/client.hpp requires C++20[^"]*' "$tmp/cxx17.log")"
else
  head -5 "$tmp/cxx17.log"
  fail "a C++17 compile failed without saying C++20 is required"
fi

step "start hsm-agent on a throwaway SoftHSMv2 token"
mkdir -p "$tmp/tokens"
cat >"$tmp/softhsm2.conf" <<EOF
directories.tokendir = $tmp/tokens
objectstore.backend = file
log.level = ERROR
EOF
export SOFTHSM2_CONF=$tmp/softhsm2.conf
(umask 077; od -An -N8 -tx8 /dev/urandom | tr -d ' \n' >"$tmp/pin")
# softhsm2-util takes PINs only as arguments; this token lives for this test only.
softhsm2-util --init-token --free --label consumer --so-pin "$(cat "$tmp/pin")" \
  --pin "$(cat "$tmp/pin")" >/dev/null
"$agent" --module /usr/lib/softhsm/libsofthsm2.so --token-label consumer --pin-file "$tmp/pin" \
  --socket "$tmp/agent.sock" --metrics-listen "" >"$tmp/agent.out" 2>"$tmp/agent.err" &
agent_pid=$!
for _ in $(seq 1 300); do
  [[ -S $tmp/agent.sock ]] && break
  kill -0 "$agent_pid" 2>/dev/null || break
  sleep 0.1
done
if [[ -S $tmp/agent.sock ]]; then pass "agent listening"; else cat "$tmp/agent.err"; fail "agent did not start"; fi
export HSM_AGENT_SOCKET=$tmp/agent.sock

# The openssl CLI, independently of the library: the ES256 r||s signature of a JWT converted
# to DER and checked over header.payload with `openssl dgst -verify` and the key's PEM (from
# hsmctl in the build tree).
verify_with_openssl() {  # $1 = JWT, $2 = PEM public key file
  local jwt=$1 pem=$2 sig_der
  printf '%s' "${jwt%.*}" >"$tmp/input"
  /usr/bin/python3 - "$jwt" "$tmp/sig.der" <<'PY'
import base64, sys
sig = sys.argv[1].rsplit('.', 1)[1]
raw = base64.urlsafe_b64decode(sig + '=' * (-len(sig) % 4))
def der_int(b):
    b = b.lstrip(b'\0') or b'\0'
    if b[0] & 0x80: b = b'\0' + b
    return b'\x02' + bytes([len(b)]) + b
body = der_int(raw[:32]) + der_int(raw[32:])
open(sys.argv[2], 'wb').write(b'\x30' + bytes([len(body)]) + body)
PY
  openssl dgst -sha256 -verify "$pem" -signature "$tmp/sig.der" "$tmp/input" >/dev/null
}

step "run the five binaries against the agent"
for binary in "$tmp/build/issue_jwt_shared" "$tmp/build/issue_jwt_static" "$tmp/issue_jwt_pkgconfig" \
    "$tmp/issue_jwt_pkgconfig_static" "$tmp/subdir-build/issue_jwt_subdirectory"; do
  name=$(basename "$binary")
  if [[ ! -x $binary ]]; then fail "$name not built"; continue; fi
  if "$binary" consumer-jwt ES256 >"$tmp/$name.jwt" 2>"$tmp/$name.err" &&
     grep -q '^verified: alg=ES256 kid=consumer-jwt' "$tmp/$name.err"; then
    pass "$name issued and verified a JWT: $(cat "$tmp/$name.err")"
  else
    cat "$tmp/$name.err"
    fail "$name"
    continue
  fi
  jwt=$(cat "$tmp/$name.jwt")
  if [[ $jwt =~ ^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$ ]]; then
    pass "$name printed a compact JWS"
  else
    fail "$name printed '$jwt'"
  fi
done

step "check one JWT with the openssl CLI (independently of the library)"
hsmctl=$build/client/hsmctl
jwt=$(cat "$tmp/issue_jwt_shared.jwt" 2>/dev/null || true)
if [[ -n $jwt && -x $hsmctl ]] && "$hsmctl" pubkey consumer-jwt --format pem >"$tmp/key.pem" 2>"$tmp/hsmctl.err" &&
   verify_with_openssl "$jwt" "$tmp/key.pem"; then
  pass "openssl dgst -verify accepts the JWT's ES256 signature"
else
  cat "$tmp/hsmctl.err" 2>/dev/null || true
  fail "openssl could not verify the JWT"
fi

echo
echo "consumer: $passed passed, $failed failed"
((failed == 0))
