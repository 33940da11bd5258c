"""Encoder weights: the frozen encoder and its variables, Flax variable files, PyTorch
checkpoints read without torch and converted to Flax."""
