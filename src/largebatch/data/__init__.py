"""Data loading: MNIST, rank-sharded in-memory and torch DataLoader paths."""
from largebatch.data.loaders import (BatchLoader, MemoryLoader, TorchLoader, build_eval_loader,
                                     build_train_loader, shard_indices)
from largebatch.data.mnist import load_mnist_tensors, mnist_size, prepare_data

__all__ = ["BatchLoader", "MemoryLoader", "TorchLoader", "build_eval_loader",
           "build_train_loader", "load_mnist_tensors", "mnist_size", "prepare_data",
           "shard_indices"]
