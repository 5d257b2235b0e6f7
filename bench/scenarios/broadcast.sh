#!/usr/bin/env bash
# Scenario 1, broadcast: 5,000 and 15,000 clients on one topic, 200 messages
# published as fast as the server takes them; and 5,000 clients at a steady
# 5 messages/s, for latency below saturation.
#   TARGET=fanout|pocketbase bench/scenarios/broadcast.sh
# SIZE=2 for a smoke test in seconds (see lib.sh).
source "$(dirname "$0")/lib.sh"
[ "${SKIP_BUILD:-}" ] || build
T=${TARGET:-fanout}
scenario "$T" broadcast-5k --clients "$(size 5000)" --topics 1 --messages "$(size 200)" --publishers 4
scenario "$T" broadcast-15k --clients "$(size 15000)" --topics 1 --messages "$(size 200)" --publishers 4
scenario "$T" broadcast-5k-paced --clients "$(size 5000)" --topics 1 --messages "$(size 100)" --publishers 1 --rate 5
[ "${KEEP_RESULTS:-}" ] || cat "$RESULTS"
