"""Data: the datasets (registered by name here), rank-sharded loaders, MNIST and faces."""
from largebatch.data.loaders import (BatchLoader, MemoryLoader, TorchLoader, build_eval_loader,
                                     build_train_loader, shard_indices)
from largebatch.data.mnist import load_mnist_tensors, mnist_size, prepare_data
from largebatch.registry import DATASETS

# ``data.name`` values: each a factory of its ``DatasetSpec`` (imported when first used).
DATASETS.register("mnist", "largebatch.data.registry:mnist_spec")
# synthetic: the data generates its own images (face.image_size) and held-out pairs.
DATASETS.register("synthetic_faces", "largebatch.data.faces:synthetic_faces_spec",
                  synthetic=True)
DATASETS.register("recordio", "largebatch.data.recordio:recordio_spec")
DATASETS.register("imagefolder", "largebatch.data.imagefolder:imagefolder_spec")

__all__ = ["BatchLoader", "MemoryLoader", "TorchLoader", "build_eval_loader",
           "build_train_loader", "load_mnist_tensors", "mnist_size", "prepare_data",
           "shard_indices"]
