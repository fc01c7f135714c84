"""Batch jobs: the OpenAI Files and Batches APIs, run on idle private capacity."""
