"""Exported model directories: the loader and its backends (jax.export, ONNX Runtime,
OpenVINO), the jaxpr -> ONNX translator, and the service's web page."""
