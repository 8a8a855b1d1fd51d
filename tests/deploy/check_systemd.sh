#!/usr/bin/env bash
# Checks deploy/systemd/hsm-agent.service:
# - `systemd-analyze verify` prints nothing (unknown keys, bad values and missing executables are
#   all warnings with exit code 0, so any output fails). While the agent is not installed at
#   /usr/bin/hsm-agent, a copy of the unit runs /bin/true instead;
# - `systemd-analyze security --offline` rates the unit at most 2.0 (threshold 20);
# - the hardening and PIN settings are present (a unit edited into something weaker fails);
# - the sysusers file parses (systemd-sysusers --dry-run).
# Skips (and says so) when systemd-analyze is missing. Last line: "N passed, M failed".
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
unit="$root/deploy/systemd/hsm-agent.service"
passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok   $1"; }
fail() { failed=$((failed + 1)); echo "FAIL $1"; }

if ! command -v systemd-analyze >/dev/null; then
  echo "skip: systemd-analyze not found (Debian package systemd)"
  echo "0 passed, 0 failed"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# verify: the unit as shipped when the binary exists, else a copy running /bin/true.
if [[ -x /usr/bin/hsm-agent ]]; then
  cp "$unit" "$work/hsm-agent.service"
else
  sed 's#^ExecStart=/usr/bin/hsm-agent #ExecStart=/bin/true #' "$unit" >"$work/hsm-agent.service"
fi
if out="$(systemd-analyze verify "$work/hsm-agent.service" 2>&1)" && [[ -z "$out" ]]; then
  ok "systemd-analyze verify hsm-agent.service: no warnings"
else
  fail "systemd-analyze verify hsm-agent.service"
  echo "$out"
fi

# the verify check itself notices a misspelt key
sed 's/^NoNewPrivileges=/NoNewPrivilege=/' "$work/hsm-agent.service" >"$work/typo.service"
if out="$(systemd-analyze verify "$work/typo.service" 2>&1)" && [[ -n "$out" ]]; then
  ok "systemd-analyze verify reports a misspelt key (the check can fail)"
else
  fail "systemd-analyze verify did not report a misspelt key"
fi

if out="$(systemd-analyze security --offline=yes --threshold=20 "$unit" 2>&1)"; then
  ok "systemd-analyze security: $(grep -o 'Overall exposure level.*' <<<"$out")"
else
  fail "systemd-analyze security above threshold 2.0"
  tail -5 <<<"$out"
fi

# Required settings: key=value lines that must be present exactly.
required=(
  "Type=notify"
  "DynamicUser=yes"
  "SupplementaryGroups=hsm-clients"
  "RuntimeDirectory=hsm-agent"
  "RuntimeDirectoryMode=0755"
  "UMask=0077"
  "LoadCredential=pin:/etc/hsm-agent/pin"
  "NoNewPrivileges=yes"
  "CapabilityBoundingSet="
  "AmbientCapabilities="
  "ProtectSystem=strict"
  "ProtectHome=yes"
  "PrivateTmp=yes"
  "DevicePolicy=closed"
  "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"
  "SystemCallFilter=@system-service"
  "SystemCallArchitectures=native"
  "MemoryDenyWriteExecute=yes"
  "LockPersonality=yes"
  "RestrictSUIDSGID=yes"
  "RestrictNamespaces=yes"
  "LimitCORE=0"
)
for line in "${required[@]}"; do
  if grep -qxF -- "$line" "$unit"; then ok "unit has $line"; else fail "unit lacks $line"; fi
done

exec_line="$(grep '^ExecStart=' "$unit")"
if [[ "$exec_line" == "ExecStart=/usr/bin/hsm-agent "*"--pin-file %d/pin"* ]]; then
  ok "ExecStart runs /usr/bin/hsm-agent with --pin-file %d/pin"
else
  fail "ExecStart: $exec_line"
fi
if grep -qiE '^[^#]*(HSM_AGENT_PIN|--pin[^-])' "$unit" "$root/deploy/systemd/hsm-agent.env"; then
  fail "a PIN value or HSM_AGENT_PIN appears in the unit or the environment file"
else
  ok "no PIN in the unit or the environment file"
fi
if grep -qE '^(User|Group)=root$|^PrivateDevices=yes$' "$unit"; then
  fail "unit runs as root or hides HSM device nodes"
else
  ok "unit neither runs as root nor sets PrivateDevices=yes"
fi

if command -v systemd-sysusers >/dev/null; then
  if out="$(systemd-sysusers --dry-run "$root/deploy/systemd/hsm-agent.sysusers" 2>&1)"; then
    ok "systemd-sysusers --dry-run hsm-agent.sysusers"
  else
    fail "systemd-sysusers --dry-run hsm-agent.sysusers"
    echo "$out"
  fi
fi

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
