# One image for the web front end and the GPU workers.
#   docker build -t stylequeue .                       (web: no weights needed)
#   docker build --target worker -t stylequeue-worker . (worker: VGG19 weights baked in)
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini gunicorn.conf.py ./
COPY shared ./shared
COPY web ./web
COPY worker ./worker
COPY stylequeue ./stylequeue
COPY migrations ./migrations
# The CUDA build of torch (the default wheel on PyPI for x86_64).
RUN pip install -e '.[worker]'
RUN useradd --create-home stylequeue && mkdir -p /data && chown stylequeue /data
USER stylequeue
ENV STYLEQUEUE_DATA_DIR=/data
EXPOSE 8000
# gunicorn.conf.py: 2 gthread workers of 16 threads, one SO_REUSEPORT socket each.
CMD ["gunicorn"]

FROM base AS worker
# Bake the ImageNet VGG19 weights (checksum verified by torch.hub) into the image, so a
# worker never downloads at start-up.
ENV STYLEQUEUE_WEIGHTS_DIR=/opt/weights
USER root
RUN mkdir -p /opt/weights && STYLEQUEUE_WEIGHTS_DIR=/opt/weights stylequeue weights fetch vgg19
USER stylequeue
CMD ["stylequeue", "worker"]
