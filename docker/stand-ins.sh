#!/usr/bin/env bash
# The container engine the image tests use, and the base images they need, in one place.
#
#   eval "$(bash docker/stand-ins.sh env)"   CONTAINER_ENGINE (a command line) and its settings
#   bash docker/stand-ins.sh base            the Dockerfile's base image, if it is not there
#   bash docker/stand-ins.sh monitoring      the compose file's Prometheus and Alertmanager
#
# With a Docker engine that reaches its registry (`docker info` works and `docker pull` of the
# base does), nothing is stood in: the real python:3.12-slim-bookworm is used. Without (this
# workplace: Debian's podman, no registry), the base is made from Debian packages with
# mmdebstrap and tagged with the base's own name, so that the Dockerfile builds unchanged:
# Debian bookworm's python3 (3.11, where the real base has 3.12), pip, useradd, and the host's
# CA bundle for pip (the package index is reached only through this machine's chain). The
# podman settings this host needs: runc (crun rejects its cgroup layout), and lower default
# rlimits than podman's (which are refused here), in a containers.conf under the cache dir.
set -euo pipefail

CACHE=${STAND_INS_CACHE:-build/container-cache}
BASE=docker.io/library/python:3.12-slim-bookworm
mkdir -p "$CACHE"

engine_env() {
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    echo "export CONTAINER_ENGINE=docker"
    return
  fi
  local conf
  conf=$(cd "$CACHE" && pwd)/containers.conf
  printf '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=8192:8192"]\n' > "$conf"
  echo "export CONTAINERS_CONF=$conf"
  echo "export CONTAINER_ENGINE='podman --runtime runc'"
}

eval "$(engine_env)"
ENGINE=($CONTAINER_ENGINE)

base() {
  if "${ENGINE[@]}" image exists "$BASE" 2>/dev/null \
      || "${ENGINE[@]}" image inspect "$BASE" >/dev/null 2>&1; then
    return
  fi
  if [ "${ENGINE[0]}" = docker ] && docker pull -q "$BASE" >/dev/null 2>&1; then
    return  # the real one
  fi
  if [ ! -s "$CACHE/debian-bookworm.tar" ]; then
    mmdebstrap --quiet --variant=minbase --format=tar \
      --include=python3,python3-pip,python3-venv,ca-certificates,passwd,wget \
      bookworm "$CACHE/debian-bookworm.tar.partial"
    mv "$CACHE/debian-bookworm.tar.partial" "$CACHE/debian-bookworm.tar"
  fi
  "${ENGINE[@]}" import -q "$CACHE/debian-bookworm.tar" localhost/dfine-standin/debian:bookworm \
    >/dev/null
  local context
  context=$(mktemp -d)
  cp /etc/ssl/certs/ca-certificates.crt "$context/host-ca.crt"
  cat > "$context/Containerfile" <<'EOF'
FROM localhost/dfine-standin/debian:bookworm
COPY host-ca.crt /etc/ssl/certs/host-ca.crt
RUN ln -sf /usr/bin/python3 /usr/local/bin/python && ln -sf /usr/bin/pip3 /usr/local/bin/pip \
 && rm -f /usr/lib/python3.*/EXTERNALLY-MANAGED
ENV PIP_CERT=/etc/ssl/certs/host-ca.crt \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
EOF
  "${ENGINE[@]}" build -q --format docker --network host -t "$BASE" "$context" >/dev/null
  rm -rf "$context"
}

# Prometheus and Alertmanager from Debian's packages, tagged as the compose file's images, with
# the upstream images' entrypoints, working directories and user (nobody), and wget for the
# compose healthchecks. Grafana has no Debian package: it is not stood in.
monitoring() {
  local prometheus alertmanager
  prometheus=$(sed -n 's/^ *image: \(prom\/prometheus:.*\)$/\1/p' docker-compose.yml)
  alertmanager=$(sed -n 's/^ *image: \(prom\/alertmanager:.*\)$/\1/p' docker-compose.yml)
  if "${ENGINE[@]}" image inspect "docker.io/$prometheus" >/dev/null 2>&1 \
      && "${ENGINE[@]}" image inspect "docker.io/$alertmanager" >/dev/null 2>&1; then
    return
  fi
  if [ "${ENGINE[0]}" = docker ] && docker pull -q "$prometheus" >/dev/null 2>&1 \
      && docker pull -q "$alertmanager" >/dev/null 2>&1; then
    return
  fi
  if [ ! -s "$CACHE/debian-monitoring.tar" ]; then
    mmdebstrap --quiet --variant=minbase --format=tar \
      --include=prometheus,prometheus-alertmanager,wget,ca-certificates \
      bookworm "$CACHE/debian-monitoring.tar.partial"
    mv "$CACHE/debian-monitoring.tar.partial" "$CACHE/debian-monitoring.tar"
  fi
  "${ENGINE[@]}" import -q "$CACHE/debian-monitoring.tar" \
    localhost/dfine-standin/monitoring:bookworm >/dev/null
  local context
  context=$(mktemp -d)
  printf '%s\n' "FROM localhost/dfine-standin/monitoring:bookworm" \
    "RUN mkdir -p /prometheus && chown nobody:nogroup /prometheus" \
    "USER nobody" "WORKDIR /prometheus" "EXPOSE 9090" \
    'ENTRYPOINT ["/usr/bin/prometheus"]' \
    'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]' \
    > "$context/Containerfile.prometheus"
  printf '%s\n' "FROM localhost/dfine-standin/monitoring:bookworm" \
    "RUN mkdir -p /alertmanager && chown nobody:nogroup /alertmanager" \
    "USER nobody" "WORKDIR /alertmanager" "EXPOSE 9093" \
    'ENTRYPOINT ["/usr/bin/prometheus-alertmanager"]' \
    'CMD ["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager"]' \
    > "$context/Containerfile.alertmanager"
  "${ENGINE[@]}" build -q --format docker -f "$context/Containerfile.prometheus" \
    -t "docker.io/$prometheus" "$context" >/dev/null
  "${ENGINE[@]}" build -q --format docker -f "$context/Containerfile.alertmanager" \
    -t "docker.io/$alertmanager" "$context" >/dev/null
  rm -rf "$context"
}

case "${1:-}" in
  env) engine_env ;;
  base) base ;;
  monitoring) monitoring ;;
  *) echo "usage: $0 env|base|monitoring" >&2; exit 2 ;;
esac
