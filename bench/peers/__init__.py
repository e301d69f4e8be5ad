"""Servers that eva-ws is measured against; each reads its port and Redis URL from the command line."""
