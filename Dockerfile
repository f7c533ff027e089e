# tidings in a container (docker build -t tidings . / podman build -t tidings .): docs/deploy.md.
#
# Stage 1 builds the wheel from this checkout; stage 2 installs it (with its dependencies from PyPI) into
# a slim Python image and runs it as an unprivileged user. History, the generated API key and the VAPID
# key live in the volume /var/lib/tidings. tests/test_deploy.py runs the same commands outside a
# container (build, pip install of the wheel, this ENV and CMD, the HEALTHCHECK command).

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md MANIFEST.in ./
COPY src ./src
RUN pip install --no-cache-dir 'build>=1.0' && python -m build --wheel --outdir /dist

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 tidings \
 && useradd --system --uid 10001 --gid tidings --home-dir /var/lib/tidings --create-home \
        --shell /usr/sbin/nologin tidings
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-cache-dir /tmp/dist/*.whl && rm -rf /tmp/dist
ENV PYTHONUNBUFFERED=1 \
    TIDINGS_HOST=0.0.0.0 \
    TIDINGS_PORT=8888 \
    TIDINGS_DATA_DIR=/var/lib/tidings
USER tidings
WORKDIR /var/lib/tidings
VOLUME ["/var/lib/tidings"]
EXPOSE 8888
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TIDINGS_PORT', '8888'), timeout=4)"]
CMD ["tidings", "serve"]
