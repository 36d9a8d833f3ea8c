# largebatch on a CUDA PyTorch image.
#
#   docker build -t largebatch .
#   docker run --rm --gpus all -v "$PWD/data:/workspace/data" -v "$PWD/runs:/workspace/runs" \
#       largebatch train configs/mnist/seed.yaml
#   # several GPUs: the same image with torchrun as the entrypoint
#   docker run --rm --gpus all --ipc=host --entrypoint torchrun largebatch \
#       --standalone --nproc_per_node 8 -m largebatch train configs/mnist/seed.yaml
#
# torch >= 2.9 so that torchrun forwards Slurm's USR1 to its workers (slurm/train.sbatch).
# The runtime image has no compiler: DeepSpeed ops that JIT-build (CPU Adam for offload) need
# the devel image: docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel .
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The package (torch and torchvision come with the base image and satisfy pyproject's bounds).
WORKDIR /opt/largebatch
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m pip install --no-cache-dir . && rm -rf /root/.cache

# Configs and launch scripts where the docs' relative paths expect them.
WORKDIR /workspace
COPY configs ./configs
COPY launch ./launch
COPY slurm ./slurm

# A non-root user owning the work dir (data/, runs/ and caches are written there or in $HOME).
RUN useradd --create-home --shell /bin/bash largebatch \
    && chown largebatch:largebatch /workspace
USER largebatch

ENTRYPOINT ["largebatch"]
CMD ["--help"]
