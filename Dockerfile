# One image for every server-side Kernex process (api, ingest, broker via `kernex broker run`).
FROM python:3.11-slim-bookworm

# Mosquitto for `kernex broker run`; the same binary the tests use (Debian's 2.0.x).
RUN apt-get update \
    && apt-get install -y --no-install-recommends mosquitto \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md mosquitto.conf ./
COPY kernex ./kernex
RUN pip install --no-cache-dir '.[server]'

# An unprivileged user owns the data dir (PKI keys are 0600 and must stay readable to it).
RUN useradd --system --uid 10001 --home-dir /data kernex && mkdir /data && chown kernex /data
USER kernex
ENV KERNEX_DATA_DIR=/data
VOLUME ["/data"]
ENTRYPOINT ["kernex"]
