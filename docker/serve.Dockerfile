# Serving image: `socialrec serve` with ONNX Runtime + FAISS + gRPC + Redis, and NO torch.
#   docker build -f docker/serve.Dockerfile -t socialrec-serve .
#   docker run --rm -p 50051:50051 -v bundles:/bundles:ro socialrec-serve \
#     serve --bundle /bundles --redis-url redis://redis:6379/0 --host 0.0.0.0 --workers 2
# The package's modules are all copied as source (a few hundred KB): `socialrec`'s argument
# parser reads socialrec.training.split (numpy only), and rollout/rollback/publish-bundle run
# here too. Only `.[serve]` is installed, so training/compression code that needs torch fails to
# import instead of bloating the image (checked in a throwaway venv, see docs/operations.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1

WORKDIR /app

COPY pyproject.toml README.md ./
COPY socialrec/ socialrec/
COPY serving/ serving/
COPY training/ training/
COPY compression/ compression/
COPY loadtest/ loadtest/

RUN pip install "./[serve]" \
    && useradd --system --uid 10001 socialrec

# numeric, so the host side (volume ownership, runAsNonRoot) can check it
USER 10001
EXPOSE 50051 9100
ENTRYPOINT ["socialrec"]
CMD ["serve", "--bundle", "/bundles", "--redis-url", "redis://redis:6379/0", "--host", "0.0.0.0", "--workers", "2", "--metrics-port", "9100"]
