#!/usr/bin/env bash
# Fetches, once, every jar the Flink and Kafka runs need, with mvn from
# Maven Central, into runners/.jars/ (git-ignored; MLPIPE_JARS overrides):
#
#   beam/   Beam's Java side: the Flink job server, the expansion service
#           with KafkaIO, the Java SDK harness (runners/maven/beam/pom.xml)
#   flink/  a Flink 1.19 session cluster: JobManager + TaskManager
#           (runners/maven/flink/pom.xml)
#   kafka/  a single-node KRaft Kafka broker (runners/maven/kafka/pom.xml)
#   beam-flink-job-server.jar, beam-expansion-service.jar: launchers, jars
#           of a manifest only (Main-Class, Class-Path: beam/*.jar), so that
#           `java -jar` starts them and Beam's --flink_job_server_jar and
#           JavaJarExpansionService take them as they take Beam's own jars.
#
# A folder is fetched again only when its pom is newer than the last fetch.
# Nothing is downloaded when a pipeline runs: the pipelines take these paths.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JARS="${MLPIPE_JARS:-$ROOT/runners/.jars}"
mkdir -p "$JARS"

fetch() {  # fetch NAME: runners/maven/NAME/pom.xml -> $JARS/NAME/
  local name=$1 pom="$ROOT/runners/maven/$1/pom.xml" dest="$JARS/$1"
  if [[ -f "$dest/.fetched" && "$dest/.fetched" -nt "$pom" ]]; then
    echo "jars: $name cached ($(ls "$dest" | wc -l) jars in $dest)"
    return
  fi
  echo "jars: fetching $name with mvn (runners/maven/$name/pom.xml)"
  rm -rf "$dest" "$dest.partial"
  if ! mvn -B -q -f "$pom" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$dest.partial" \
      > "$JARS/$name.mvn.log" 2>&1; then
    echo "jars: mvn could not fetch $name; see $JARS/$name.mvn.log" >&2
    exit 1
  fi
  mv "$dest.partial" "$dest"
  touch "$dest/.fetched"
}

launcher() {  # launcher JAR MAIN_CLASS: a manifest-only jar over beam/
  local jar="$JARS/$1" main=$2
  python3 - "$jar" "$main" "$JARS" <<'PY'
import os, sys, zipfile
jar, main, root = sys.argv[1:]
entries = sorted('beam/' + n for n in os.listdir(os.path.join(root, 'beam'))
                 if n.endswith('.jar'))
manifest = ('Manifest-Version: 1.0\nMain-Class: %s\nClass-Path: %s\n'
            % (main, '\n  '.join(entries)))
tmp = jar + '.partial'
with zipfile.ZipFile(tmp, 'w') as z:
    z.writestr('META-INF/MANIFEST.MF', manifest)
os.replace(tmp, jar)
PY
}

fetch beam
fetch flink
fetch kafka
launcher beam-flink-job-server.jar org.apache.beam.runners.flink.FlinkJobServerDriver
launcher beam-expansion-service.jar org.apache.beam.sdk.expansion.service.ExpansionService
echo "jars: ready in $JARS"
