"""Tests of ``opacus_dmaudit.sinks``."""
