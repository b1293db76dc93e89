"""Framework adapters: torch tensors <-> NumPy arrays with the same bits, safetensors files as NumPy
dicts, the training-loop checkpoint hook (and its asynchronous committer), and progressive evaluation
of a PyTorch classifier from a snapshot's top byte planes."""
