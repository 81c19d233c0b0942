# raw-transfer in a container: the same entry point as on the host.
#   docker build -t rawtransfer .
#   docker run --rm -v /data/raw:/data/raw -v /srv/archive:/archive \
#     -v rawtransfer-state:/var/lib/rawtransfer rawtransfer /data/raw /archive --backfill-only
FROM python:3.11-slim-bookworm

# fpack/funpack come from CFITSIO's command-line tools
RUN apt-get update \
    && apt-get install -y --no-install-recommends libcfitsio-bin=4.2.0-3 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/rawtransfer
COPY pyproject.toml README.md ./
COPY rawtransfer ./rawtransfer
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /var/lib/rawtransfer --create-home rawtransfer

# a numeric user, so that a host with no such name still runs it unprivileged
USER 10001
ENV XDG_STATE_HOME=/var/lib/rawtransfer
ENTRYPOINT ["raw-transfer"]
CMD ["--help"]
