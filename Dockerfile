# The project's image: code server, webserver, daemon, health service and simulator all run it,
# and on Kubernetes each run's pod too (deploy/kubernetes), hence the k8s extra (dagster-k8s).
FROM python:3.11-slim
WORKDIR /opt/export-pipeline
RUN apt-get update && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY export_pipeline ./export_pipeline
RUN pip install --no-cache-dir '.[k8s]'
# Processes started here import the package from this folder (`python -m` and `dagster -m` put
# the working directory first on the path): compile it now, since on Kubernetes the root
# filesystem is read-only and every process, each run's pod included, would compile it again.
RUN python -m compileall -q export_pipeline
COPY dagster.yaml workspace.yaml ./
COPY deploy ./deploy
ENV DAGSTER_HOME=/opt/dagster/home
# One "planned" event per asset run, not one per partition (docs/operations.md: "What a thousand-partition
# run costs").
ENV DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS=true
RUN mkdir -p "$DAGSTER_HOME" && cp dagster.yaml "$DAGSTER_HOME/dagster.yaml"
# The instance with worker hosts (docs/workers.md): compose's EXPORT_DAGSTER_HOME names it.
RUN mkdir -p /opt/dagster/workers && cp deploy/workers/dagster.yaml /opt/dagster/workers/
# uid and gid 10001: the Kubernetes manifests run every container as 10001:10001.
# /opt/dagster/grpc: where compose's code server serves its socket (a volume the daemon and the
# webservers mount; a new volume takes this folder's owner).
RUN groupadd --system --gid 10001 exporter \
    && useradd --system --uid 10001 --gid 10001 exporter && mkdir -p /opt/dagster/grpc \
    && chown -R exporter "$DAGSTER_HOME" /opt/dagster/workers /opt/dagster/grpc
USER exporter
