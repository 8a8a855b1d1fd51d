#!/usr/bin/env bash
# Installs the Debian bookworm packages hsm-sidecar needs to build, run and test.
# Idempotent: when every package is present it changes nothing (and does not touch the network).
set -euo pipefail

PACKAGES=(
  # toolchain
  build-essential cmake pkg-config git ccache
  # libraries
  libuv1-dev libmsgpack-cxx-dev prometheus-cpp-dev libmicrohttpd-dev libssl-dev libp11-kit-dev
  libcli11-dev libspdlog-dev libyaml-cpp-dev nlohmann-json3-dev
  # the agent: gzip for /metrics, sd_notify for systemd (Type=notify)
  zlib1g-dev libsystemd-dev
  # tokens and PKCS#11 tools
  softhsm2 opensc p11-kit openssl
  # tests: Catch2, promtool, a third-party msgpack/JOSE client, fuzzing and sanitizers
  catch2 prometheus python3 python3-msgpack python3-jwcrypto python3-yaml clang libfuzzer-14-dev
  libclang-rt-14-dev procps systemd
  # deploy tests: helm/kubectl come from an npm package; node validates the rendered objects
  unzip
)
# Node.js (18 or newer) and npm, for client/node and the deploy tests: any installation will do.
# Some machines carry a newer nodejs package whose bundled npm conflicts with Debian's npm
# package, so these are checked as commands.
command -v node >/dev/null 2>&1 || PACKAGES+=(nodejs)
command -v npm >/dev/null 2>&1 || PACKAGES+=(npm)

missing=()
for package in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
