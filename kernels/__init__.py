"""Triton kernels for fastgen (installed as ``fastgen.kernels``): one module per op, each with its launcher and
its plain-PyTorch reference (``<op>_ref``)."""
