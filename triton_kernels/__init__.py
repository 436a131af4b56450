"""Triton GPU kernels (installed as ``mdlm_ctc.triton_kernels``): the vocabulary pass, the banded
lattice and the gradient pass. Importing this package does not import Triton; the kernel modules do."""
