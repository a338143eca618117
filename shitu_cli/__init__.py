"""shitu: PP-ShiTu image recognition on ordinary CPUs.

Importing this package only defines names; paddle, ppdet and faiss load lazily inside
the functions that need them, so `shitu --help` answers at once.
"""

__version__ = "0.1.0"
