# Training pipeline image: `socialrec train` / `split` / `compress` / `retrain`, and the Locust
# load generator (compose's locust service) (build context: the repo root).
#   docker build -f docker/pipeline.Dockerfile -t socialrec-pipeline .
#   docker run --rm -v "$PWD/runs:/runs" socialrec-pipeline
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the package build needs: the top-level folders that [tool.setuptools.package-dir]
# in pyproject.toml maps under the one `socialrec` namespace (socialrec.training, ...).
COPY pyproject.toml README.md ./
COPY socialrec/ socialrec/
COPY training/ training/
COPY compression/ compression/
COPY serving/ serving/
COPY loadtest/ loadtest/

# torch first, with the same pin as the train extra, then the package itself ("./[extras]":
# a local path, which hadolint's pin check (DL3013) tells apart from a package name).
RUN pip install torch==2.13.0 \
    && pip install "./[train,loadtest]"

VOLUME ["/runs"]
ENTRYPOINT ["socialrec"]
CMD ["train", "--out", "/runs/synthetic"]
