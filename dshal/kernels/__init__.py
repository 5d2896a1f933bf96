"""Compute kernels shared by vendor plugins.

``dshal.kernels.triton`` holds portable Triton kernels. Nothing here is imported by
``import dshal`` or by plugin discovery: a plugin imports a kernel module only when its
``ops()`` are built or used, so ``triton`` stays an optional dependency.
"""
