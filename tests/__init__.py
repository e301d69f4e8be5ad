"""eva-ws tests."""
