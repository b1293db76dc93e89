"""Adapters from framework objects (torch, safetensors) to NumPy tensor dicts and back."""
