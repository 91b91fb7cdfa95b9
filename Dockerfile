# buildkit-gateway: one BuildKit endpoint in front of a pool of buildkitd replicas.
#   docker build -t buildkit-gateway:0.1.0 .
# The build stage installs exactly the locked set of the README's run command (requirements.txt,
# made by hack/lock; --no-deps, so nothing outside the lock comes in), then the project itself,
# into a virtual environment that has no pip of its own, and checks the set is consistent. The
# runtime stage is the same Python image with that environment only, and without the image's
# own pip, setuptools and wheel: no installer, no compiler, no sources. It runs as an
# unprivileged numeric user (Kubernetes' runAsNonRoot checks it).
# Both stages must use one image: the environment refers to its interpreter by path.
# tests/integration/test_deploy.py checks that every COPY source exists and that this installs
# the lock the README's install command installs.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv --without-pip /opt/buildkit-gateway
WORKDIR /src
COPY requirements.txt ./
RUN pip --python /opt/buildkit-gateway/bin/python install --no-deps -r requirements.txt
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip --python /opt/buildkit-gateway/bin/python install --no-deps . \
 && pip --python /opt/buildkit-gateway/bin/python check \
 && /opt/buildkit-gateway/bin/buildkit-gateway --help >/dev/null

FROM ${PYTHON_IMAGE}
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
 && rm -rf /root/.cache
COPY --from=build /opt/buildkit-gateway /opt/buildkit-gateway
ENV PATH=/opt/buildkit-gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
# 1234: the BuildKit port (--listen); 9180: the admin server (--admin-listen: /metrics,
# /healthz, /readyz, /status). deploy/base/gateway.yaml passes both.
EXPOSE 1234 9180
ENTRYPOINT ["buildkit-gateway"]
CMD ["--listen", "tcp://0.0.0.0:1234", "--admin-listen", "0.0.0.0:9180"]
