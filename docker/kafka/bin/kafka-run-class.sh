#!/bin/sh
# Runs a Kafka main class on the jars in /opt/kafka/libs in the foreground, like Apache
# Kafka's bin/kafka-run-class.sh, and honours the same environment: KAFKA_HEAP_OPTS,
# KAFKA_JVM_PERFORMANCE_OPTS, KAFKA_GC_LOG_OPTS, KAFKA_JMX_OPTS, KAFKA_LOG4J_OPTS,
# KAFKA_OPTS, LOG_DIR, JAVA_HOME, CLASSPATH.
#   kafka-run-class.sh [-name NAME] [-loggc] CLASS [ARG...]
set -eu
base_dir="$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)"
name=""
gc_log=false
while [ $# -gt 0 ]; do
  case "$1" in
    -name) name="$2"; shift 2 ;;
    -loggc) gc_log=true; shift ;;
    -daemon) echo "kafka-run-class.sh: -daemon is not supported here; the broker runs in the foreground" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 1 ]; then
  echo "USAGE: $0 [-name NAME] [-loggc] CLASS [ARG...]" >&2
  exit 1
fi

LOG_DIR="${LOG_DIR:-/tmp/kafka-logs}"
mkdir -p "$LOG_DIR"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx256M}"
KAFKA_JVM_PERFORMANCE_OPTS="${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true}"
KAFKA_LOG4J_OPTS="${KAFKA_LOG4J_OPTS:--Dlog4j2.configurationFile=$base_dir/config/tools-log4j2.properties}"
if $gc_log && [ -n "$name" ]; then
  KAFKA_GC_LOG_OPTS="${KAFKA_GC_LOG_OPTS:--Xlog:gc*:file=$LOG_DIR/$name-gc.log:time,tags:filecount=10,filesize=100M}"
fi
classpath="$base_dir/libs/*${CLASSPATH:+:$CLASSPATH}"
java="${JAVA_HOME:+$JAVA_HOME/bin/}java"

# The *_OPTS variables hold several options each: split on spaces, as Kafka's script does.
# shellcheck disable=SC2086
exec "$java" $KAFKA_HEAP_OPTS $KAFKA_JVM_PERFORMANCE_OPTS ${KAFKA_GC_LOG_OPTS:-} ${KAFKA_JMX_OPTS:-} \
  "-Dkafka.logs.dir=$LOG_DIR" $KAFKA_LOG4J_OPTS -cp "$classpath" ${KAFKA_OPTS:-} "$@"
