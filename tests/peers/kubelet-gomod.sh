#!/usr/bin/env bash
# Regenerate tests/peers/kubelet/go.mod and go.sum for the k8s.io/kubernetes
# version in versions.env: require that module and map each staging module it
# replaces with a ./staging path to the published release of the same version.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/versions.env"
cd "$here/kubelet"
gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" 2>/dev/null \
  | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
goversion=$(sed -n 's/^go \(.*\)$/\1/p' "$gomod")
{
  echo "// A consumer module to build kubelet from the published k8s.io/kubernetes"
  echo "// module: that module replaces every k8s.io staging module with a ./staging"
  echo "// path, so here each is mapped to its published release of the same version."
  echo "// Versions come from ../versions.env; regenerate with ../kubelet-gomod.sh."
  echo "module github.com/cri-shim/cri-shim/tests/peers/kubelet"
  echo
  echo "go $goversion"
  echo
  echo "tool k8s.io/kubernetes/cmd/kubelet"
  echo
  echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
  echo
  echo "replace ("
  grep -E '=> \./staging' "$gomod" | awk -v v="$KUBERNETES_STAGING_VERSION" '{printf "\t%s => %s %s\n", $1, $1, v}'
  echo ")"
} >go.mod
rm -f go.sum
go mod tidy
