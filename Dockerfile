# The project's image: code server, webserver, daemon, health service and simulator all run it.
FROM python:3.11-slim
WORKDIR /opt/export-pipeline
RUN apt-get update && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY export_pipeline ./export_pipeline
RUN pip install --no-cache-dir .
COPY dagster.yaml workspace.yaml ./
COPY deploy ./deploy
ENV DAGSTER_HOME=/opt/dagster/home
# One "planned" event per asset run, not one per partition (docs/operations.md: "What a thousand-partition
# run costs").
ENV DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS=true
RUN mkdir -p "$DAGSTER_HOME" && cp dagster.yaml "$DAGSTER_HOME/dagster.yaml"
# /opt/dagster/grpc: where compose's code server serves its socket (a volume the daemon and the
# webservers mount; a new volume takes this folder's owner).
RUN useradd --system --uid 10001 exporter && mkdir -p /opt/dagster/grpc \
    && chown -R exporter "$DAGSTER_HOME" /opt/dagster/grpc
USER exporter
