# syntax=docker/dockerfile:1
# Runtime image: onnxruntime, the shipped model repository, no PyTorch. It needs API keys: it binds
# 0.0.0.0, so it refuses to start without them (set LSTM_SERVE_API_KEYS_FILE= to run open on purpose).
#   docker build -t lstm-serve .
#   python -c "import secrets; print(secrets.token_urlsafe(32))" > api_keys    # one key per line
#   docker run -p 8000:8000 -v "$PWD/api_keys:/run/secrets/api_keys:ro" lstm-serve
#   curl -H "Authorization: Bearer $(head -1 api_keys)" http://localhost:8000/v1/models

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model/ model/
COPY export/ export/
COPY service/ service/
# the runtime dependencies only: the train extra (torch) is never installed here
RUN pip install --no-cache-dir --prefix=/install .

FROM python:${PYTHON_VERSION}-slim AS runtime
# the ENV holds the path of the key file, never a key
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LSTM_SERVE_HOST=0.0.0.0 \
    LSTM_SERVE_PORT=8000 \
    LSTM_SERVE_MODEL_REPOSITORY=/app/models \
    LSTM_SERVE_API_KEYS_FILE=/run/secrets/api_keys \
    LSTM_SERVE_MAX_SESSIONS_PER_KEY=1000
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin lstm
COPY --from=build /install /usr/local
COPY --chown=10001:10001 models/ /app/models/
WORKDIR /app
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["lstm-serve"]
CMD ["serve"]
