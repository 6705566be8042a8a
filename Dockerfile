# The kernelbox service image: `kernelbox serve --backend docker`, for docker-compose.yml.
#
# Build both images (this one and Dockerfile.kernel's) with `scripts/build-images.sh`. Like the
# kernel image, the base is a build argument:
#   - default: the public python:3.12-slim (python at /usr/local/bin);
#   - machines without a registry: the Debian bookworm base the script makes with mmdebstrap
#     (python3 + python3-venv + ca-certificates + tini), passed as BASE=kernelbox-base:bookworm.
# Build context: the repository root, filtered by .dockerignore (an allow-list).
#
# Lean on purpose: this image runs the Docker backend only, so it holds the service's own
# libraries (FastAPI, uvicorn, jupyter_client, pyzmq, docker, ...) and not the kernels' data
# stack (ipykernel, numpy, pandas, matplotlib), which lives in the kernel image. The `server`
# extra lists both because the local backend runs kernels with the service's interpreter; the
# packages only kernels import are dropped from it below (KERNEL_ONLY).
#
# At run time (see docs/deployment.md): the Docker socket is mounted, the data directory
# (KERNELBOX_DATA_DIR, /var/lib/kernelbox) is a volume the engine can bind into kernel
# containers, and the entrypoint drops from root to the `kernelbox` user (uid 1000) with the
# socket's group.
#
# The same file builds the LOCAL variant (`scripts/build-images.sh local` -> kernelbox-local:latest),
# for where the service runs kernels itself: the local backend (bubblewrap) and the Ray mode's
# pods (deploy/kubernetes/service/ and ray/). Its build arguments: KERNEL_ONLY= (keep the data
# stack the kernels import), EXTRA_APT_PACKAGES=bubblewrap, EXTRAS=ray with EXTRA_PINS=ray==<the
# RayCluster's rayVersion>, and SERVICE_BACKEND=local (KERNELBOX_BACKEND's default). With none of
# them given, this is the Docker backend's lean image above.
ARG BASE=python:3.12-slim
FROM ${BASE}

# --- OS packages (rarely change: first) ----------------------------------------------------
# tini as PID 1 (signals, zombies); util-linux gives setpriv and flock (Essential in Debian).
# The mmdebstrap base has tini already: no apt run (and no network) needed then, unless
# EXTRA_APT_PACKAGES (space-separated; the local variant's: bubblewrap) asks for more.
ARG DEBIAN_FRONTEND=noninteractive
ARG EXTRA_APT_PACKAGES=""
RUN set -eu; \
    packages="$EXTRA_APT_PACKAGES"; \
    if ! command -v tini >/dev/null; then packages="ca-certificates tini $packages"; fi; \
    if [ -n "$(echo $packages)" ]; then \
        apt-get update; \
        apt-get install -y --no-install-recommends $packages; \
        rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/cache/apt/*.bin; \
    fi; \
    command -v setpriv >/dev/null && command -v flock >/dev/null

# --- The service user --------------------------------------------------------------------------
# uid/gid 1000: the kernel image's `sandbox` user. A non-root service starts kernels under its
# own uid, so files in a session's directory have one owner on both sides. Written directly:
# the mmdebstrap base has no useradd.
RUN set -eu; \
    echo 'kernelbox:x:1000:1000:kernelbox service:/home/kernelbox:/usr/sbin/nologin' >> /etc/passwd; \
    echo 'kernelbox:x:1000:' >> /etc/group; \
    mkdir -p /home/kernelbox /var/lib/kernelbox; \
    chown 1000:1000 /home/kernelbox /var/lib/kernelbox

# --- Python dependencies (change when pyproject.toml does) -----------------------------------
# Read from both pyproject.toml (the client's and the server's dependencies, minus KERNEL_ONLY), so
# this layer is rebuilt only when they change, never for a source edit. The protocol libraries
# are pinned to the kernel image's versions. hatchling is installed here so that the project
# itself installs without network below. EXTRA_CA_CERTS: see Dockerfile.kernel.
# EXTRAS: optional-dependency groups of pyproject.toml to add (space-separated; the local
# variant's: ray); EXTRA_PINS: more constraints, as requirement specifiers (ray==2.60.0).
ARG KERNEL_ONLY="ipykernel numpy pandas matplotlib"
ARG EXTRAS=""
ARG EXTRA_PINS=""
ARG EXTRA_CA_CERTS=""
COPY pyproject.toml /tmp/kernelbox-deps/pyproject.toml
COPY client/pyproject.toml /tmp/kernelbox-deps/client/pyproject.toml
RUN set -eu; \
    python3 -m venv /opt/venv; \
    if [ -n "$EXTRA_CA_CERTS" ]; then \
        cat /etc/ssl/certs/ca-certificates.crt > /tmp/build-ca.pem; \
        printf '%s\n' "$EXTRA_CA_CERTS" >> /tmp/build-ca.pem; \
        export PIP_CERT=/tmp/build-ca.pem; \
    fi; \
    cd /tmp/kernelbox-deps; \
    /opt/venv/bin/python -c 'import re, sys, tomllib;\
        load = lambda path: tomllib.load(open(path, "rb"))["project"]["dependencies"];\
        extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"];\
        skip = set(sys.argv[1].split()) | {"kernelbox-client"};\
        reqs = load("client/pyproject.toml") + load("pyproject.toml");\
        reqs += [r for extra in sys.argv[2].split() for r in extras[extra]];\
        name = lambda r: re.split(r"[^A-Za-z0-9._-]", r, maxsplit=1)[0].lower().replace("_", "-");\
        print("\n".join(r for r in reqs if name(r) not in skip))' \
        "$KERNEL_ONLY" "$EXTRAS" > requirements.txt; \
    printf 'jupyter_client==8.10.0\npyzmq==27.3.0\n' > constraints.txt; \
    for pin in $EXTRA_PINS; do printf '%s\n' "$pin" >> constraints.txt; done; \
    cat requirements.txt constraints.txt; \
    /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        -c constraints.txt -r requirements.txt 'hatchling>=1.21'; \
    cd /; rm -rf /tmp/build-ca.pem /tmp/kernelbox-deps

# --- How it runs (metadata: no layer to rebuild) ---------------------------------------------
# SERVICE_BACKEND: KERNELBOX_BACKEND's default (docker here; local in the local variant).
ARG SERVICE_BACKEND=docker
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    KERNELBOX_HOST=0.0.0.0 \
    KERNELBOX_PORT=8000 \
    KERNELBOX_BACKEND=${SERVICE_BACKEND} \
    KERNELBOX_DATA_DIR=/var/lib/kernelbox

EXPOSE 8000
# /healthz: the process is up and serving (its lifespan, which reaps orphans, has finished).
# Python, not curl: the image has no curl. start-period covers a first start on a slow machine.
HEALTHCHECK --interval=5s --timeout=4s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KERNELBOX_PORT', '8000'), timeout=3)"]

ENTRYPOINT ["/usr/bin/tini", "--", "/opt/kernelbox/entrypoint.sh"]
CMD ["serve"]

# --- The project (changes most often: last, two steps) ------------------------------------------
# The context is exactly what .dockerignore lets through: the two distributions (pyproject.toml,
# client/, README.md, the packages and kernelbox_server's links to them) and the entrypoint.
# The import check proves the lean dependency set is enough (and, in the local variant, that the
# kernels' stack, bwrap and the Ray mode's engine are there).
COPY . /opt/kernelbox/src/
RUN set -eu; \
    /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps \
        --no-build-isolation /opt/kernelbox/src/client /opt/kernelbox/src; \
    install -m 0755 /opt/kernelbox/src/scripts/service-entrypoint.sh /opt/kernelbox/entrypoint.sh; \
    /opt/venv/bin/python -c "import kernelbox_server.service.main, kernelbox_server.service.app, kernelbox_server.sandbox.backends.docker"; \
    if [ "$SERVICE_BACKEND" = local ]; then \
        command -v bwrap >/dev/null; \
        /opt/venv/bin/python -c "import ipykernel, numpy, pandas, matplotlib, kernelbox_server.sandbox.backends.local"; \
    fi; \
    case " $EXTRAS " in \
        *" ray "*) /opt/venv/bin/python -c "import ray, kernelbox_server.service.cluster.engine" ;; \
    esac
