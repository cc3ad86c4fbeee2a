"""Shared fixtures for hpcckpt's tests."""
