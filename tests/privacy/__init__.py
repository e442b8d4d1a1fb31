"""Tests of ``opacus_dmaudit.privacy``."""
