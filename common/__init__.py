"""What every layer uses, whatever it computes.

- `common.cli`: settings dataclasses whose fields are also command-line flags, and checked number types;
- `common.errors`: one sentence and exit code 1 for every error a user can cause; the test hook that
  interrupts a run;
- `common.files`: atomic writes, JSON and JSONL, the journal of finished work, content hashes;
- `common.charts`: matplotlib drawing to files;
- `common.progress`: the stderr log line and the progress line with its ETA.

Nothing here imports a module outside `common`.
"""
