"""Registered torch.library ops (fake kernels, autograd) and the backend choice."""
