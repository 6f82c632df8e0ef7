# The project's one image: every service is `python -m services.<name>`, so a service
# picks its module with `command` (docker-compose.yml: `command: ["services.gateway"]`).

# The explorer's and the console's pages (web/), built once: the gateway serves them.
FROM node:20-slim AS web
WORKDIR /web
COPY web/package.json web/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY web/build.mjs ./
COPY web/src ./src
RUN npm run build

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# The dependencies first, from pyproject.toml alone (with empty packages in place of the
# code), so that a change of the code reuses this layer.
COPY pyproject.toml README.md ./
RUN mkdir constellation services \
    && touch constellation/__init__.py services/__init__.py \
    && pip install . \
    && pip uninstall --yes constellation \
    && rm -rf constellation services build ./*.egg-info

COPY constellation ./constellation
COPY services ./services
RUN pip install --no-deps . && rm -rf build ./*.egg-info
COPY --from=web /web/dist /srv/web
ENV GATEWAY_WEB_DIR=/srv/web

# Not root. The state folders exist in the image, owned by the service's user, so that a
# new named volume mounted on one of them starts with that owner (docker-compose.yml
# mounts its volumes on these paths).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/constellation constellation \
    && mkdir -p /var/lib/constellation/state /var/lib/constellation/guild \
        /var/lib/constellation/lightning /var/lib/constellation/signer-0 \
        /var/lib/constellation/signer-1 /var/lib/constellation/signer-2 \
    && chown -R constellation:constellation /var/lib/constellation
USER constellation
WORKDIR /var/lib/constellation

ENTRYPOINT ["python", "-m"]
CMD ["services.cli", "--help"]
