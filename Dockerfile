FROM python:3.11-slim
WORKDIR /opt/export-pipeline
COPY pyproject.toml README.md ./
COPY export_pipeline ./export_pipeline
RUN pip install --no-cache-dir .
COPY dagster.yaml workspace.yaml ./
ENV DAGSTER_HOME=/opt/dagster_home
RUN mkdir -p $DAGSTER_HOME && cp dagster.yaml $DAGSTER_HOME/
