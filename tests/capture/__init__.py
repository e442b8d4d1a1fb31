"""Tests of ``opacus_dmaudit.capture``."""
