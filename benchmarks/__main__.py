"""
C{python -m benchmarks}: the comparison with Postfix (L{benchmarks.run}).
"""

from benchmarks.run import main

main()
