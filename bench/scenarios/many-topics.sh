#!/usr/bin/env bash
# Scenario 2, many topics: 10,000 clients over 1,000 topics, 20,000 messages.
#   TARGET=fanout|pocketbase bench/scenarios/many-topics.sh
source "$(dirname "$0")/lib.sh"
[ "${SKIP_BUILD:-}" ] || build
scenario "${TARGET:-fanout}" many-topics --clients 10000 --topics 1000 --messages 20000 --publishers 8 --max-duration 240s
[ "${KEEP_RESULTS:-}" ] || cat "$RESULTS"
