# syntax=docker/dockerfile:1
# A single-node Apache Kafka broker image for the chart's devKafka StatefulSet (and for
# `docker run`), built from the Apache Kafka jars on Maven Central instead of the
# distribution tarball. Build from the repository root:
#   docker build -f docker/kafka.Dockerfile -t synpref-kafka .
# The Kafka version is the one in tools/kafka/pom.xml, the pom the test broker uses too.
# Laid out like apache/kafka where the chart needs it: /opt/kafka/bin/kafka-storage.sh and
# /opt/kafka/bin/kafka-server-start.sh (small sh versions of Kafka's scripts, which are
# not in the jars), /opt/kafka/libs, /opt/kafka/config.

# Any image with Maven and a JDK 17, and any image with a Java 17 runtime, sh and useradd.
ARG MAVEN_IMAGE=maven:3.9-eclipse-temurin-17
ARG JRE_IMAGE=eclipse-temurin:17-jre

# --- build: resolve kafka_2.13 and its runtime dependencies from Maven Central -------------
FROM ${MAVEN_IMAGE} AS build
WORKDIR /build
COPY tools/kafka/pom.xml pom.xml
RUN mvn -q -B -Dstyle.color=never dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory=/opt/kafka/libs \
 && version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' pom.xml)" \
 && test -f "/opt/kafka/libs/kafka_2.13-$version.jar" \
 && echo "$version" > /opt/kafka/version
# The scripts (Kafka's own are not in the jars) and the default config, next to the jars, so
# the runtime stage copies one finished tree from this stage and nothing from the context.
COPY docker/kafka/ /opt/kafka/
RUN chmod 0755 /opt/kafka/bin/*.sh && chmod 0644 /opt/kafka/config/*

# --- runtime: a JRE, the jars, the scripts, a non-root user --------------------------------
FROM ${JRE_IMAGE} AS runtime
ARG UID=10001
# The data folder belongs to the broker's user, so a plain `docker run` can format it; in
# Kubernetes a volume is mounted there (the chart's fsGroup makes it writable).
RUN groupadd --system --gid ${UID} kafka \
 && useradd --system --uid ${UID} --gid ${UID} --home-dir /tmp --shell /usr/sbin/nologin kafka \
 && mkdir -p /var/lib/kafka/data \
 && chown ${UID}:${UID} /var/lib/kafka/data
COPY --from=build /opt/kafka/ /opt/kafka/
# Logs go to stdout; LOG_DIR (GC logs) defaults to /tmp, the writable folder when the root
# filesystem is read-only.
ENV PATH=/opt/kafka/bin:$PATH \
    LOG_DIR=/tmp/kafka-logs \
    HOME=/tmp
WORKDIR /tmp
# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER ${UID}:${UID}
EXPOSE 9092
# Without a command: a standalone broker with config/server.properties (localhost:9092).
CMD ["/opt/kafka/bin/kafka-standalone-start.sh"]
