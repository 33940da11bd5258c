"""PyTorch reference of RD + CCL training and scoring, for speed and parity against ccl_jax.

Needs torch (CPU or CUDA); ccl_jax itself never imports this package.
"""
from benchmarks.torch_reference.models import RDCCL
from benchmarks.torch_reference.trainer import (TorchTrainer, build_trainer, jax_gradients,
                                                jax_model, jax_params_tree, jax_variables,
                                                state_dict_numpy)

__all__ = ["RDCCL", "TorchTrainer", "build_trainer", "jax_gradients", "jax_model",
           "jax_params_tree", "jax_variables", "state_dict_numpy"]
