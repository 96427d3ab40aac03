#!/bin/sh
# Grafana without a default admin password: GRAFANA_ADMIN_PASSWORD when set; otherwise a random
# one, made on the first start, kept in Grafana's data volume (Grafana applies the password
# only when it creates its database) and printed to the log on every start.
set -eu
data=${GF_PATHS_DATA:-/var/lib/grafana}
kept="$data/.dfine-admin-password"
if [ -n "${GRAFANA_ADMIN_PASSWORD:-}" ]; then
  password=$GRAFANA_ADMIN_PASSWORD
elif [ -s "$kept" ]; then
  password=$(cat "$kept")
  echo "grafana: admin password (made on the first start) is in $kept: $password"
else
  password=$(head -c 24 /dev/urandom | base64 | tr -d '/+=\n' | cut -c1-24)
  (umask 077 && printf '%s' "$password" > "$kept")
  echo "grafana: no GRAFANA_ADMIN_PASSWORD set; made the admin password: $password"
fi
export GF_SECURITY_ADMIN_PASSWORD="$password"
exec "${GRAFANA_RUN:-/run.sh}" "$@"
