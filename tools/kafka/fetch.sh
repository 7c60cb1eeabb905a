#!/usr/bin/env bash
# Fetch Apache Kafka (org.apache.kafka:kafka_2.13) and its runtime dependencies from
# Maven Central into .cache/kafka/libs, for the test broker (testing/local_kafka.py).
# Idempotent: a stamp naming the pom's hash skips the work when nothing changed.
# Needs mvn and a Java 17 runtime; reuses ~/.m2 when present.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
POM="$ROOT/tools/kafka/pom.xml"
CACHE="${SYNPREF_KAFKA_HOME:-$ROOT/.cache/kafka}"
LIBS="$CACHE/libs"
STAMP="$CACHE/stamp"

version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM")"
want="kafka_2.13 $version pom $(sha256sum "$POM" | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -f "$LIBS/kafka_2.13-$version.jar" ]]; then
  echo "kafka: Apache Kafka $version already in $LIBS"
  exit 0
fi

command -v mvn >/dev/null || { echo "kafka: mvn not found (apt-get install maven)" >&2; exit 1; }
command -v java >/dev/null || { echo "kafka: java not found (apt-get install openjdk-17-jre-headless)" >&2; exit 1; }

echo "kafka: resolving Apache Kafka $version with mvn into $LIBS"
# Copy into a fresh folder and swap it in, so an interrupted run never leaves a half set of jars.
mkdir -p "$(dirname "$CACHE")"
tmp="$(mktemp -d "$CACHE.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
mvn -q -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp/libs"
test -f "$tmp/libs/kafka_2.13-$version.jar" || { echo "kafka: kafka_2.13-$version.jar missing after mvn" >&2; exit 1; }

mkdir -p "$CACHE"
rm -rf "$LIBS"
mv "$tmp/libs" "$LIBS"
echo "$version" > "$CACHE/version"
echo "$want" > "$STAMP"
echo "kafka: Apache Kafka $version ready ($(ls "$LIBS" | wc -l) jars)"
