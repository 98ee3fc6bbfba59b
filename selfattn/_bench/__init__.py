"""Benchmark support shared by ``python -m selfattn bench``, the asv suite and the target tables.

Nothing here is imported by ``import selfattn``.
"""
