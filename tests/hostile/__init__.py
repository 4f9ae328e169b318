"""Hostile DICOM inputs for the tests: files that claim or hold far more than they should."""
