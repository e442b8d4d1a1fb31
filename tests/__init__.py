"""The tests of opacus_dmaudit: one folder per wing of the package, whole-run tests at the top."""
