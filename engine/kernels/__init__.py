"""Kernels: native CPU kernels, compiled on first use with the system C compiler, and Triton
kernels for the GPU path.

csrc/ holds the C sources; each has a Python module of its name that binds it (lm_head.py,
lm_head_q8.py, decode_attention.py, decode_layer.py) and build.py compiles and loads them.
triton/ holds the attention backend's Triton kernels and triton_moe.py the fused MoE; without a
GPU they run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1), which is how the tests
check them.
"""
