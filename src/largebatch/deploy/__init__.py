"""Getting a trained model out of a run.

``load`` rebuilds the model of a run folder, a checkpoint set or a folder of sets; ``export``
writes it as a plain state_dict, ONNX, a ``torch.export`` program and TorchScript; ``parity``
runs every file against the torch model; ``spec`` reads what the model takes from the data
pipeline that trained it; ``pipeline`` is ``largebatch export`` end to end (files, checks,
JSON sidecar). Nothing is imported here: each command imports the modules it uses, so none
pays for another's (``onnxruntime`` and ``onnxscript`` are imported only by an ONNX export).
"""
