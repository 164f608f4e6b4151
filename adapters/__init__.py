"""Framework adapters: each converts one framework's training state to ckptkit's tree.

Import the one you need (``ckptkit.adapters.torch``, ``ckptkit.adapters.keras``); importing
this package imports no framework.
"""
