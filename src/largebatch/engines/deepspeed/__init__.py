"""DeepSpeed behind the ``Engine`` interface: the engine, its config and its state."""
