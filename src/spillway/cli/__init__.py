"""The ``spillway`` command line."""
