"""Tests of ``opacus_dmaudit.score``."""
