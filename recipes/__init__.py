"""Task recipes (Alpaca, ScienceQA, VTAB-1k, SQuAD): one file per task. Filled in by the trainer issues."""
