# dev_banner URL TOKEN PUBLISHER_TOKEN: what scripts/run prints before the server starts,
# describing the EVA_WS_* settings in effect (broker, demo traffic), not the defaults.
dev_banner() {
  local url="$1" token="$2" publisher_token="$3" broker demo ws_url
  if [ -n "${EVA_WS_REDIS_URL:-}" ]; then
    # The URL itself may hold a password: name the variable, not its value.
    broker="Redis broker from EVA_WS_REDIS_URL"
  else
    broker="embedded broker"
  fi
  case "$(printf '%s' "${EVA_WS_DEMO_PUBLISHER:-}" | tr '[:upper:]' '[:lower:]')" in
    1|true|yes|on) demo="on" ;;
    0|false|no|off) demo="off" ;;
    *) if [ "${EVA_WS_MODE:-production}" = development ]; then demo="on"; else demo="off"; fi ;;
  esac
  ws_url="ws${url#http}"
  cat <<MSG

  eva-ws is starting on $url (${EVA_WS_MODE:-production} mode, $broker, demo traffic $demo)

  Live page:   $url/
  Dev token:   $token

  From a terminal (websocat):
    websocat "$ws_url/ws/transactions?token=$token"
    {"type":"subscribe","channel":"transactions","filters":{"customerId":"CUST-001"}}

  Publish an event:
    curl -X POST $url/api/v1/publish -H "Authorization: Bearer $publisher_token" \\
      -H 'Content-Type: application/json' \\
      -d '{"type":"transaction_new","data":{"id":"TXN-1","customerId":"CUST-001","status":"pending","stage":"created"}}'

  More tokens, signed with this checkout's secret (kept in .eva-ws-dev.env):
    set -a; . ./.eva-ws-dev.env; set +a; .venv/bin/eva-ws token --sub alice --customer CUST-001

  Another port:   EVA_WS_PORT=9000 scripts/run
  A shared Redis: EVA_WS_REDIS_URL=redis://localhost:6379/0 scripts/run
  (every EVA_WS_* setting applies: docs/configuration.md)

  Stop with Ctrl-C.

MSG
}
