"""
C{python -m mailstack} is the C{mailstack} command.
"""

from mailstack.cli import main

main()
