# buildkit-gateway: one BuildKit endpoint in front of a pool of buildkitd replicas.
# Installs exactly the locked versions (requirements.txt, made by hack/lock).
FROM python:3.11-slim AS build
WORKDIR /src
COPY requirements.txt pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --prefix=/install -r requirements.txt .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 65532 gateway
USER 65532
EXPOSE 1234
ENTRYPOINT ["buildkit-gateway"]
CMD ["--listen", "tcp://0.0.0.0:1234"]
