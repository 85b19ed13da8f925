"""
Benchmarks for mailstack; see benchmarks/README.rst.
"""
