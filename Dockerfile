# The objstream workers: a slim Python, the runtime dependencies only, a non-root user.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 objstream \
    && mkdir /data \
    && chown objstream:objstream /data

WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY producer ./producer
COPY consumer ./consumer
COPY jobs ./jobs
COPY objstream ./objstream
RUN pip install . && rm -rf /src

USER objstream
WORKDIR /data
# Credentials and the broker URL come from the environment (OBJSTREAM_URL), never the image.
CMD ["objstream", "--help"]
