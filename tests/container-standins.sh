#!/usr/bin/env bash
# Test scaffolding only: local stand-ins for the base images that
# deploy/Dockerfile, docker-compose.yml and deploy/k8s name, because this
# machine kind reaches no container registry. The shipped files stay exactly
# what a Docker user runs; only the images behind their names differ:
#
#   docker.io/library/debian:bookworm-slim  mmdebstrap --variant=minbase bookworm
#   docker.io/library/rust:1.95-bookworm    that debian + gcc + the host's Rust toolchain
#   docker.io/library/redis:7-alpine        that debian + Debian's redis-server
#   docker.io/library/nginx:1.27-alpine     that debian + Debian's nginx-light
#
# Each image is made once and kept in podman's store (cached between runs).
# It also writes target/containers/containers.conf, the podman settings this
# machine needs (runc, no per-container rlimits; ../shared notes explain why).
# Callers export CONTAINERS_CONF to that file.
#
#   tests/container-standins.sh          make what is missing
#   tests/container-standins.sh --force  make all four again
set -euo pipefail
cd "$(dirname "$0")/.."

work="$PWD/target/containers"
mkdir -p "$work"
export CONTAINERS_CONF="$work/containers.conf"
cat >"$CONTAINERS_CONF" <<'EOF'
# crun rejects this machine's hybrid cgroup layout, and runc cannot set
# rlimits here: run with runc and the host's limits.
[containers]
default_ulimits = []

[engine]
runtime = "runc"
EOF

force=
[ "${1:-}" = "--force" ] && force=1

log() { printf '==> standins: %s\n' "$*" >&2; }
missing() { [ -n "$force" ] || ! podman image exists "$1"; }
# Chroot isolation and the host network: the default OCI isolation fails here
# (setrlimit RLIMIT_NPROC: operation not permitted).
build() { podman build --isolation chroot --network host --format docker "$@"; }

debian=docker.io/library/debian:bookworm-slim
# context NAME: a fresh build-context directory; prints its path.
context() { local d="$work/$1-context"; rm -rf "$d"; mkdir -p "$d"; echo "$d"; }
# from_debian PACKAGES...: Dockerfile lines, the debian stand-in plus packages.
from_debian() {
  printf 'FROM %s\nRUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends %s && rm -rf /var/lib/apt/lists/*\n' \
    "$debian" "$*"
}
# make_image IMAGE CONTEXT: build CONTEXT/Dockerfile as IMAGE, then drop CONTEXT.
make_image() { build -q -t "$1" "$2" >/dev/null; rm -rf "$2"; }

if missing "$debian"; then
  log "$debian from mmdebstrap (minbase bookworm)"
  rm -f "$work/rootfs.tar"
  # The official slim image's dpkg filters: no documentation, manuals or
  # translations (copyright files stay). It is still about 50 MB larger than
  # the official image: mmdebstrap merges /usr with the usrmerge package, which
  # brings the full perl.
  mmdebstrap --quiet --variant=minbase --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/groff/*' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' --dpkgopt='path-exclude=/usr/share/linda/*' \
    bookworm "$work/rootfs.tar" http://deb.debian.org/debian
  podman import --quiet "$work/rootfs.tar" "$debian" >/dev/null
  rm -f "$work/rootfs.tar"
fi

rust=docker.io/library/rust:1.95-bookworm
if missing "$rust"; then
  log "$rust from $debian and the host's Rust toolchain"
  ctx=$(context rust); mkdir "$ctx/toolchain"
  sysroot="$(rustc --print sysroot)"
  # bin/ lib/ libexec/ etc/ are the toolchain; share/ is documentation.
  cp -a "$sysroot/bin" "$sysroot/lib" "$sysroot/libexec" "$sysroot/etc" "$ctx/toolchain/"
  # The Rust package registry is reached through a TLS-inspecting path whose
  # CA is only in the host's bundle.
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/ca-certificates.crt"
  { from_debian gcc libc6-dev ca-certificates pkg-config; cat <<EOF
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY toolchain /usr/local/rust
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
EOF
  } >"$ctx/Dockerfile"
  make_image "$rust" "$ctx"
fi

redis=docker.io/library/redis:7-alpine
if missing "$redis"; then
  log "$redis from $debian and Debian's redis-server"
  ctx=$(context redis)
  # As the official image does: without a config file, listen on every
  # interface with protected mode off (other containers must reach it).
  cat >"$ctx/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
set -e
if [ "${1#-}" != "$1" ]; then set -- redis-server "$@"; fi
if [ "$1" = redis-server ]; then
  case "${2:-}" in *.conf) ;; *) shift; set -- redis-server --protected-mode no --bind 0.0.0.0 "$@" ;; esac
fi
exec "$@"
EOF
  { from_debian redis-server redis-tools; cat <<EOF
RUN mkdir /data
COPY --chmod=0755 docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
EOF
  } >"$ctx/Dockerfile"
  make_image "$redis" "$ctx"
fi

nginx=docker.io/library/nginx:1.27-alpine
if missing "$nginx"; then
  log "$nginx from $debian and Debian's nginx-light"
  ctx=$(context nginx)
  # Debian's nginx.conf includes conf.d/*.conf, as the official image's does;
  # its default site would also listen on :80, so it goes.
  { from_debian nginx-light; cat <<EOF
RUN rm /etc/nginx/sites-enabled/default \\
 && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
EOF
  } >"$ctx/Dockerfile"
  make_image "$nginx" "$ctx"
fi
log "ready: $debian $rust $redis $nginx"
