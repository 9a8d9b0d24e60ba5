# One image for every service role (migrate, api, worker): the compose file picks the command.

# The dashboard's one browser dependency (uPlot), pinned by ui/package-lock.json; only its files travel on.
FROM node:20-slim AS ui-assets
WORKDIR /ui
COPY ui/package.json ui/package-lock.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    RD_VAR_DIR=/var/lib/rd

WORKDIR /app

# torch first and pinned, in its own layer: it is by far the largest and changes least often.
RUN pip install torch==2.14.1 torchvision==0.29.1

# Dependencies next, from pyproject alone, so editing the source does not reinstall them.
COPY pyproject.toml ./
RUN mkdir -p core api worker service \
    && touch core/__init__.py api/__init__.py worker/__init__.py service/__init__.py \
    && pip install '.[service]' \
    && pip uninstall -y robust-distill \
    && rm -rf core api worker service build *.egg-info

# The source; PYTHONPATH=/app makes every package (service/ and migrations/ included) importable.
COPY . .
COPY --from=ui-assets /ui/node_modules ./ui/node_modules
RUN pip install --no-deps . \
    && useradd --create-home --uid 1000 rd \
    && mkdir -p /var/lib/rd /scratch \
    && chown -R rd:rd /var/lib/rd /scratch
USER rd

EXPOSE 8000
CMD ["uvicorn", "api.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
