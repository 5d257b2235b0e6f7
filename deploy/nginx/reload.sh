#!/bin/sh
# Reload nginx so that it re-resolves the `fanout` service's replicas, and
# say so only once it has. Run inside the nginx container, after scaling:
#
#   docker compose up -d --scale fanout=5
#   docker compose exec -T nginx sh /etc/nginx/fanout-reload.sh
#
# Why not just `nginx -s reload`: nginx resolves upstream names while it
# reads its configuration. Right after replicas start, the network's DNS may
# briefly not answer for the service name (seen with podman-compose on a
# fresh machine: `host not found in upstream "fanout:8090"`, exit 1). And
# when the name fails only for the master process, `nginx -s reload`
# succeeds while nginx keeps the old replicas. So this retries until the
# configuration tests clean and new worker processes are running (the
# master starts them only after it has read the new configuration), for up
# to 30 attempts a second apart; exit 1 if it never happens.
set -u

# nginx's master process: the one in this container (MASTER_PID overrides).
master=${MASTER_PID:-$(grep -las 'nginx: master process' /proc/[0-9]*/cmdline | head -n 1 | cut -d/ -f3)}

# The master's current worker processes (not those shutting down), by PID.
workers() {
  for f in $(grep -las 'nginx: worker process' /proc/[0-9]*/cmdline); do
    d=${f%/cmdline}
    grep -qs "^PPid:[[:space:]]*$master\$" "$d/status" || continue
    grep -qas 'shutting down' "$f" || echo "${d#/proc/}"
  done | sort | tr '\n' ' '
}

# Whether a worker runs that is not in the list $1 (old workers leave the
# list as they shut down; only a successful reload adds one).
new_worker() {
  for pid in $(workers); do
    case " $1" in *" $pid "*) ;; *) return 0 ;; esac
  done
  return 1
}

attempts=${ATTEMPTS:-30}
attempt=1
while [ "$attempt" -le "$attempts" ]; do
  before=$(workers)
  if nginx -t -q 2>/dev/null && nginx -s reload 2>/dev/null; then
    waited=0
    while [ "$waited" -lt 30 ]; do
      if new_worker "$before"; then
        echo "nginx reloaded (attempt $attempt)"
        exit 0
      fi
      sleep 0.1
      waited=$((waited + 1))
    done
  fi
  attempt=$((attempt + 1))
  sleep 1
done
echo "nginx did not reload: does the upstream name resolve? (nginx -t)" >&2
nginx -t
exit 1
