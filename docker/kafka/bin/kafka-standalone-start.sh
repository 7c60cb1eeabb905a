#!/bin/sh
# The image's default command: a single-node KRaft broker with config/server.properties,
# formatted on first start (CLUSTER_ID, or a random one; a formatted folder is kept).
set -eu
base_dir="$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)"
config="${1:-$base_dir/config/server.properties}"
cluster_id="${CLUSTER_ID:-$("$base_dir/bin/kafka-storage.sh" random-uuid)}"
"$base_dir/bin/kafka-storage.sh" format --standalone --ignore-formatted -t "$cluster_id" -c "$config"
exec "$base_dir/bin/kafka-server-start.sh" "$config"
