"""Utilities every layer may use: errors, config validation, I/O with provenance, runtime
setup, statistics, text metrics and plots. Imports nothing else from fdpipe."""
