# rayconv image: the Ray base image rayconv is tested with, plus rayconv installed from this repo with the
# same pinned dependency versions CI uses (requirements/main.lock).
#
#   docker build -t rayconv:0.1.0 .
#   # or, without a local Docker: gcloud builds submit --tag "${IMAGE}" .   (docs/deployment.md step 6)
#
# The same image serves the KubeRay head, the workers and the submitter (k8s/rayjob.yaml) and the single-pod
# Job (k8s/checkpoint-converter.yaml). tests/test_deploy.py checks this file: the base tag pins the Ray
# version of the lock and of rayVersion in k8s/rayjob.yaml, and the install step uses the repo's own files.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-cpu

ARG RAY_VERSION
ENV PYTHONUNBUFFERED=1

# The base image runs as user "ray" with a writable conda Python on PATH; pip builds in the source tree,
# so the tree must belong to that user.
RUN mkdir -p /home/ray/rayconv
WORKDIR /home/ray/rayconv
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users requirements/main.lock requirements/main.lock
COPY --chown=ray:users rayconv/ rayconv/

# gcs: google-cloud-storage for object metadata/compose (tensorstore does the data path).
RUN pip install --no-cache-dir --constraint requirements/main.lock ".[gcs]" \
 && python -c "import ray, sys; v = ray.__version__; sys.exit(0 if v == '${RAY_VERSION}' else f'ray {v} != ${RAY_VERSION}')" \
 && rayconv convert --help > /dev/null
