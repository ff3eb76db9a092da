"""Level 0: plumbing every other part uses — how a batch is called, temporary hooks and modes,
atomic files, wall-clock timing. Imports nothing else of tdnn."""
