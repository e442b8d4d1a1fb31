"""Tests of ``opacus_dmaudit.checks``."""
