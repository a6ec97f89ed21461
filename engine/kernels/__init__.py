"""Native CPU kernels, compiled on first use with the system C compiler.

csrc/ holds the C sources; each has a Python module of its name that binds it (lm_head.py,
lm_head_q8.py, decode_attention.py, decode_layer.py) and build.py compiles and loads them.
"""
