"""The OpenAI Batch API: files, batches, and the runner that answers their lines in the background.

``store`` keeps files, batches and each line's state durable (so a restart neither loses nor
repeats a line), ``files`` checks an uploaded JSONL file line by line, ``runner`` answers lines
below interactive traffic through the server's own routes, ``shape`` writes OpenAI's objects and
output lines. The routes are ``api/batch_routes.py``.
"""
