"""Benchmark support shared by ``python -m selfattn bench``, ``python -m selfattn dashboard``, the asv suite
and the measurement scripts in the checkout's ``tools/`` folder.

Nothing here is imported by ``import selfattn``.
"""
