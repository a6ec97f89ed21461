"""Triton kernels: the `triton` attention backend's (engine/layers/attention/triton_backend.py).

Plain Triton, written for CUDA; CI runs the same kernels on CPU tensors through Triton's
interpreter (`TRITON_INTERPRET=1`, set before triton is first imported). common.py holds what the
kernels share (paged addressing, block sizes, the interpreter's one workaround); kv_store.py writes
a step's K/V into the pages; decode_attention.py and extend_attention.py attend.
"""
