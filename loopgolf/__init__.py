"""loopgolf: do looped shared blocks with routed refinement beat unique layers under a byte cap?"""

__version__ = "0.1.0"
