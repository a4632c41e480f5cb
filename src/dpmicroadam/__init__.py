"""dpmicroadam: differentially private training with DP-MicroAdam."""

__version__ = "0.1.0"
