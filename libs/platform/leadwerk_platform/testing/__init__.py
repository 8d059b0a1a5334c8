"""Test support shared by every service's suite (a pytest plugin and helpers)."""
