"""Native CPU kernels, compiled on first use (torch.utils.cpp_extension); see each module."""
