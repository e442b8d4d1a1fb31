"""Tests of ``opacus_dmaudit.reconstruct``."""
